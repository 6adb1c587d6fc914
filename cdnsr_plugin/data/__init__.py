"""Data: difficulty-classified sub-image LMDBs (prepare), their dataset, test sets, robust image I/O.

Every ``*_dataset.py`` module here is imported for its registration side effect, as basicsr does.
"""
import importlib
from pathlib import Path

_modules = [importlib.import_module(f'{__name__}.{path.stem}')
            for path in sorted(Path(__file__).parent.glob('*_dataset.py'))]
