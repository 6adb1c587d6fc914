"""``python -m cdnsr_plugin.test -opt X.yml`` (console script ``cdnsr-test``): BasicSR testing with
the plugin registered, results/ under the current directory."""
import os

import cdnsr_plugin  # noqa: F401  (registers the plugin before basicsr reads the options)
from cdnsr_plugin.compat import patch_basicsr


def main() -> None:
    patch_basicsr()  # safe YAML, CPU resume, gloo DDP without GPUs (compat.py)
    from basicsr.test import test_pipeline
    test_pipeline(os.getcwd())


if __name__ == '__main__':
    main()
