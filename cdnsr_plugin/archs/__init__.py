"""Architectures. Every ``*_arch.py`` module here is imported for its registration side effect,
as basicsr does for its own archs."""
import importlib
from pathlib import Path

_modules = [
    importlib.import_module(f'{__name__}.{path.stem}') for path in sorted(Path(__file__).parent.glob('*_arch.py'))
]
