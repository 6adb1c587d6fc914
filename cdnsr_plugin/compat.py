"""The one place that bridges gaps between the PyPI release basicsr 1.4.2 and current packages.

Everything here is a small, documented patch applied at import time; nothing else in the plugin
monkey-patches third-party code.

* ``alias_functional_tensor``: basicsr 1.4.2 imports ``torchvision.transforms.functional_tensor``,
  removed in torchvision 0.17. Its one use (``rgb_to_grayscale``) lives on in
  ``torchvision.transforms.functional``, so that module is registered under the old name, but only
  when the old module really is missing. Must run before basicsr is imported.
* ``use_safe_yaml``: basicsr's ``parse_options`` reads option files with PyYAML's full ``Loader``,
  which constructs arbitrary Python objects from tags such as ``!!python/object/apply``. It is
  replaced by a safe loader that keeps basicsr's ordered-dict behaviour, so an option file can
  never execute code. Standard tags (``!!float 2e-4``) still work.
"""
from __future__ import annotations

import importlib.util
import sys
from collections import OrderedDict

_FUNCTIONAL_TENSOR = 'torchvision.transforms.functional_tensor'


def alias_functional_tensor() -> None:
    """Make ``import torchvision.transforms.functional_tensor`` work on torchvision >= 0.17."""
    if _FUNCTIONAL_TENSOR in sys.modules:
        return
    try:
        missing = importlib.util.find_spec(_FUNCTIONAL_TENSOR) is None
    except ModuleNotFoundError:  # torchvision itself is absent: basicsr will say so
        return
    if missing:
        import torchvision.transforms.functional as functional
        sys.modules[_FUNCTIONAL_TENSOR] = functional


def _safe_ordered_loader() -> type:
    import yaml
    base = getattr(yaml, 'CSafeLoader', yaml.SafeLoader)

    class SafeOrderedLoader(base):  # type: ignore[misc, valid-type]
        """``yaml.SafeLoader`` that returns ``OrderedDict`` mappings, as basicsr expects."""

    def construct_ordered(loader: yaml.SafeLoader, node: yaml.Node) -> OrderedDict:
        return OrderedDict(loader.construct_pairs(node))

    SafeOrderedLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_ordered)
    return SafeOrderedLoader


def use_safe_yaml() -> None:
    """Make basicsr's ``parse_options`` read option files with a safe YAML loader."""
    from basicsr.utils import options

    if getattr(options.ordered_yaml, '_cdnsr_safe', False):
        return
    original = options.ordered_yaml

    def ordered_yaml():  # same signature and return shape as basicsr's
        _, dumper = original()
        return _safe_ordered_loader(), dumper

    ordered_yaml._cdnsr_safe = True  # type: ignore[attr-defined]
    options.ordered_yaml = ordered_yaml


def load_yaml(path: str) -> dict:
    """Read an option file with the same safe, order-keeping loader basicsr now uses."""
    import yaml
    with open(path, encoding='utf-8') as handle:
        return yaml.load(handle, Loader=_safe_ordered_loader())  # noqa: S506 (safe loader)
