"""cdnsr_plugin: content-adaptive super-resolution (ClassSR, CDNSR) as a BasicSR plugin.

Importing this package registers every plugin class into basicsr's registries (ARCH, MODEL, LOSS,
DATASET); that import is all an option file needs. It changes nothing else in basicsr: the one bridge it
applies, ``compat.alias_functional_tensor``, only lets basicsr 1.4.2 be imported at all on current
torchvision. The behaviour patches of ``compat.patch_basicsr`` are applied by the entries that run
basicsr's pipelines. See README.md and docs/ARCHITECTURE.md.
"""
from cdnsr_plugin.compat import alias_functional_tensor

alias_functional_tensor()  # must precede the first import of basicsr

from cdnsr_plugin import archs, data, losses, models  # noqa: E402,F401  (registration side effects)
from cdnsr_plugin.registry import registered_names  # noqa: E402

__version__ = '0.1.0'
__all__ = ['archs', 'data', 'losses', 'models', 'registered_names', '__version__']
