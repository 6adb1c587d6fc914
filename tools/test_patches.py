"""Routed, full-coverage patch-wise SR with reports, class maps and a cost knob.

    python tools/test_patches.py -opt options/test/test_CDNSR_FSRCNN.yml [--compare-backbone] [--budget 0.5 | --sweep]
    python tools/test_patches.py --input LR_DIR [--gt HR_DIR] --checkpoint CKPT --scale 4

Writes results/<name>/: <set>/<image>.png (exactly scale x the LR), <set>/<image>_classmap.png,
report.json, report.csv and, with --sweep, psnr_flops.png. ``--help`` lists every option.

The results folder is locked while a run writes it (``<out>.lock``): a second run into it fails at once (exit 2)
naming the first one's process. Ctrl-C prints one line and exits 130; what the run wrote is listed in
``<out>/run_in_progress.json`` and a rerun with ``--overwrite`` replaces it.
"""
import sys

from cdnsr_plugin.tester.cli import main

if __name__ == '__main__':
    sys.exit(main())
