"""Losses. Every ``*_loss.py`` module here is imported for its registration side effect (into basicsr's
LOSS registry), as basicsr does for its own losses."""
import importlib
from pathlib import Path

from cdnsr_plugin.losses.distill_loss import ContrastiveKDLoss, PixelKDLoss
from cdnsr_plugin.losses.routing_loss import AverageLoss, ClassLoss, DualFLOPsLoss, FLOPsRegLoss, OracleLabelLoss

_modules = [
    importlib.import_module(f'{__name__}.{path.stem}') for path in sorted(Path(__file__).parent.glob('*_loss.py'))
]

__all__ = [
    'AverageLoss', 'ClassLoss', 'ContrastiveKDLoss', 'DualFLOPsLoss', 'FLOPsRegLoss', 'OracleLabelLoss', 'PixelKDLoss'
]
