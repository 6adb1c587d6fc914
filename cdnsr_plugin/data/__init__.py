"""Data: the prepared-set format (``prepared_set``) and the dataset that reads it for training.

Every ``*_dataset.py`` module here is imported for its registration side effect, as basicsr does. The
offline builders that write prepared sets and test sets live in ``cdnsr_plugin.preparation``.
"""
import importlib
from pathlib import Path

_modules = [
    importlib.import_module(f'{__name__}.{path.stem}') for path in sorted(Path(__file__).parent.glob('*_dataset.py'))
]
