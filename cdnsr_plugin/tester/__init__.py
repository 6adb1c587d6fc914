"""``tools/test_patches.py``: options (``config``), the run (``run``), typed records (``records``), their
writers (``report``) and the command line (``cli``). The engine itself is ``cdnsr_plugin.inference.engine``."""
