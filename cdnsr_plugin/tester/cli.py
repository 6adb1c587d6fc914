"""``python tools/test_patches.py`` (console script ``cdnsr-test-patches``): see ``tester.config`` for the
options and ``tester.run`` for what a run does.

Exit status: 0 when every image was processed, 1 when some failed (they are listed at the end and in
report.json), 2 when the options, network or checkpoint are wrong (nothing was processed).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import cdnsr_plugin  # noqa: F401  (registers the plugin's archs before the network is built)
from cdnsr_plugin.tester.config import from_args
from cdnsr_plugin.tester.report import FULL_IMAGE_XLABEL, format_summary, sweep_series, write_report
from cdnsr_plugin.tester.run import Runner
from cdnsr_plugin.utils.viz import plot_psnr_flops


def printable(text: str) -> str:
    """``text`` with file-name bytes that are not valid UTF-8 shown as U+FFFD (printing them would fail)."""
    return text.encode('utf-8', 'surrogateescape').decode('utf-8', 'replace')


def main(argv: Optional[list[str]] = None) -> int:
    try:
        cfg = from_args(argv)
        runner = Runner(cfg, command=' '.join(['test_patches.py', *(sys.argv[1:] if argv is None else argv)]))
    except (ValueError, FileNotFoundError, KeyError) as exc:
        print(f'error: {exc}', file=sys.stderr)
        return 2
    report = runner.run()
    written = list(write_report(cfg.out, report))
    if sum(s.kind == 'routed' for s in report.settings) > 1:
        series = sweep_series(report, cfg.convention)
        if series:
            written.append(
                plot_psnr_flops(
                    series,
                    cfg.out / 'psnr_flops.png',
                    cfg.convention,
                    title=f'{cfg.name}: PSNR (Y) vs FLOPs executed',
                    xlabel=FULL_IMAGE_XLABEL))
        else:
            print('No PSNR-FLOPs plot: no image had ground truth to score (give --gt or dataroot_gt).')
    print(printable(format_summary(report)))
    saved = next((s.images for s in report.settings if s.name == cfg.save_setting), [])
    if saved and saved[0].sr_path:
        print(printable(f'SR images and class maps: {Path(saved[0].sr_path).parent}/ (e.g. {saved[0].overlay_path})'))
    print(printable('Reports: ' + ', '.join(str(path) for path in written)))
    return 1 if report.failures else 0


if __name__ == '__main__':
    sys.exit(main())
