"""``python -m cdnsr_plugin.train -opt X.yml`` (console script ``cdnsr-train``): BasicSR training
with the plugin registered, experiments/ and tb_logger/ under the current directory.

Accepts every flag of BasicSR's ``basicsr/train.py`` (``--launcher``, ``--auto_resume``, ...).
"""
import os

import cdnsr_plugin  # noqa: F401  (registers the plugin before basicsr reads the options)
from cdnsr_plugin.compat import patch_basicsr


def main() -> None:
    patch_basicsr()  # safe YAML, CPU resume, gloo DDP without GPUs (compat.py)
    from basicsr.train import train_pipeline
    train_pipeline(os.getcwd())


if __name__ == '__main__':
    main()
