"""Registration into basicsr's registries, with a clear error on a name clash.

basicsr's own ``Registry.register`` fails with a bare ``AssertionError`` when two packages register
the same name. ``register`` below says which module already owns the name, so a user who installs
two plugins knows what clashes. Every name the plugin registers is recorded in ``_REGISTERED`` so
tests and tools can list them.
"""
from __future__ import annotations

from typing import Callable, TypeVar

from basicsr.utils.registry import Registry

T = TypeVar('T')
_REGISTERED: dict[str, list[str]] = {}


def register(registry: Registry) -> Callable[[T], T]:
    """Class decorator: register ``cls`` under ``cls.__name__`` in ``registry``.

    Raises:
        RuntimeError: another object already owns the name; the message names its module.

    Examples:
        >>> from basicsr.utils.registry import ARCH_REGISTRY
        >>> @register(ARCH_REGISTRY)
        ... class MyNet: ...
    """

    def decorate(cls: T) -> T:
        name = cls.__name__
        existing = dict(iter(registry)).get(name)
        if existing is cls:
            return cls
        if existing is not None:
            raise RuntimeError(f"cdnsr_plugin cannot register {name!r} into basicsr's {registry._name!r} registry: "
                               f'{existing.__module__}.{existing.__qualname__} already owns that name. '
                               'Uninstall the other package or import only one of them.')
        registry.register(cls)
        _REGISTERED.setdefault(registry._name, []).append(name)
        return cls

    return decorate


def registered_names() -> dict[str, list[str]]:
    """Names the plugin registered, by registry name (``'arch'``, ``'model'``, ...)."""
    return {key: list(names) for key, names in _REGISTERED.items()}
