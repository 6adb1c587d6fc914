"""cdnsr_plugin: content-adaptive super-resolution (ClassSR, CDNSR) as a BasicSR plugin.

Importing this package registers every plugin class into basicsr's registries (ARCH, MODEL,
LOSS, DATASET); that import is all an option file needs. See README.md.
"""
from cdnsr_plugin.compat import alias_functional_tensor

alias_functional_tensor()  # must precede the first import of basicsr

import basicsr  # noqa: E402  (after the alias on purpose)

from cdnsr_plugin.compat import cpu_distributed, cpu_resume, use_safe_yaml  # noqa: E402

use_safe_yaml()
cpu_resume()
cpu_distributed()

from cdnsr_plugin import archs, data, losses, models  # noqa: E402,F401  (registration side effects)
from cdnsr_plugin.registry import registered_names  # noqa: E402

__version__ = '0.1.0'
__all__ = ['archs', 'data', 'losses', 'models', 'registered_names', '__version__']
