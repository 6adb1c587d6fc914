"""``python tools/test_patches.py`` (console script ``cdnsr-test-patches``): see ``tester.config`` for the
options and ``tester.run`` for what a run does.

Exit status: 0 when every image was processed, 1 when some failed (they are listed at the end and in
report.json), 2 when the options, network or checkpoint are wrong or another run is writing into ``--out``
(nothing was processed), 130 when interrupted (Ctrl-C): one line says what was written, no report is written,
and a rerun with ``--overwrite`` removes the interrupted run's outputs (listed in ``run_in_progress.json``).

Under ``torchrun --nproc_per_node N`` the images are split over N processes (``tester.shard``); rank 0 prints
and writes the one report, the other ranks exit 0 once their images are done and merged.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import cdnsr_plugin  # noqa: F401  (registers the plugin's archs before the network is built)
from cdnsr_plugin.tester.config import TestConfig, from_args
from cdnsr_plugin.tester.records import Report
from cdnsr_plugin.tester.report import FULL_IMAGE_XLABEL, format_summary, sweep_series, write_report
from cdnsr_plugin.tester.run import Runner
from cdnsr_plugin.tester.shard import Shard
from cdnsr_plugin.utils.viz import plot_psnr_flops


def printable(text: str) -> str:
    """``text`` with file-name bytes that are not valid UTF-8 shown as U+FFFD (printing them would fail)."""
    return text.encode('utf-8', 'surrogateescape').decode('utf-8', 'replace')


def interrupted(cfg: Optional[TestConfig], runner: Optional[Runner]) -> str:
    """The one line a Ctrl-C prints: what the run left and how to replace it."""
    progress = runner.progress if runner is not None else None
    if progress is None:
        return 'interrupted before any image was written: nothing to clean up'
    return (f'interrupted: no report was written; the {len(progress.outputs)} output file(s) of this run so far are '
            f'listed in {progress.path}: rerun with --overwrite to replace them')


def main(argv: Optional[list[str]] = None) -> int:
    """The tester; under ``torchrun`` one process of several (``tester.shard``): rank 0 reports for all."""
    cfg, runner, shard = None, None, Shard.from_env()
    try:
        error = None
        try:
            cfg = from_args(argv)
            runner = Runner(cfg, ' '.join(['test_patches.py', *(sys.argv[1:] if argv is None else argv)]), shard)
        except (ValueError, FileNotFoundError, FileExistsError, KeyError) as exc:  # FileExistsError: --out is busy
            error = str(exc)
        error = shard.agree(error)
        if error is None:
            try:
                runner.start()
            except ValueError as exc:
                error = str(exc)
        if error is not None:
            if shard.main:
                print(f'error: {error}', file=sys.stderr)
            return 2
        report = runner.run()
        return finish(cfg, runner, report) if shard.main else 0
    except KeyboardInterrupt:
        if shard.main:
            print(printable(interrupted(cfg, runner)), file=sys.stderr)
        return 130
    finally:
        if runner is not None:
            runner.close()
        shard.close()


def finish(cfg: TestConfig, runner: Runner, report: Report) -> int:
    """Write the reports (and the plot of a sweep), print the summary; the run's progress list goes last."""
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
    runner.finish()
    print(printable(format_summary(report)))
    saved = next((s.images for s in report.settings if s.name == cfg.save_setting), [])
    if saved and saved[0].sr_path:
        print(printable(f'SR images and class maps: {Path(saved[0].sr_path).parent}/ (e.g. {saved[0].overlay_path})'))
    print(printable('Reports: ' + ', '.join(str(path) for path in written)))
    return 1 if report.failures else 0


if __name__ == '__main__':
    sys.exit(main())
