"""Losses. Every ``*_loss.py`` module here is imported for its registration side effect (into basicsr's
LOSS registry), as basicsr does for its own losses."""
import importlib
from pathlib import Path

_modules = [
    importlib.import_module(f'{__name__}.{path.stem}') for path in sorted(Path(__file__).parent.glob('*_loss.py'))
]

from cdnsr_plugin.losses.distill_loss import ContrastiveKDLoss, PixelKDLoss  # noqa: E402
from cdnsr_plugin.losses.routing_loss import AverageLoss, ClassLoss, FLOPsRegLoss  # noqa: E402

__all__ = ['AverageLoss', 'ClassLoss', 'ContrastiveKDLoss', 'FLOPsRegLoss', 'PixelKDLoss']
