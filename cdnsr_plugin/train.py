"""``python -m cdnsr_plugin.train -opt X.yml`` (console script ``cdnsr-train``): BasicSR training
with the plugin registered, experiments/ and tb_logger/ under the current directory.

Accepts every flag of BasicSR's ``basicsr/train.py`` (``--launcher``, ``--auto_resume``, ...).
"""
import os
import sys

import cdnsr_plugin  # noqa: F401  (registers the plugin before basicsr reads the options)
from cdnsr_plugin.compat import patch_basicsr
from cdnsr_plugin.models.option_check import check_before_folders


def main() -> None:
    patch_basicsr()  # safe YAML, CPU resume, atomic checkpoints, gloo DDP without GPUs (compat.py)
    check_before_folders()  # every option error in one message, before experiments/<name>/ is created
    from basicsr.train import train_pipeline
    try:
        train_pipeline(os.getcwd())
    except KeyboardInterrupt:  # one line, not a traceback: what was saved stays, --auto_resume continues from it
        print(
            'cdnsr_plugin.train: interrupted; the checkpoints and training states saved so far are kept: rerun '
            'with --auto_resume to continue from the newest',
            file=sys.stderr)
        raise SystemExit(130) from None
    _close_process_group()


def _close_process_group() -> None:
    """Under DDP, wait for every rank (rank 0 validates last, alone) and close the process group.

    BasicSR's pipeline returns without either; a rank that exits while another still validates has been
    seen to abort in gloo's teardown (SIGABRT, 2 of 12 two-process CPU runs), failing the whole job.
    """
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == '__main__':
    main()
