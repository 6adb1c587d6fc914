"""Loading network weights from user-given files, safely and with errors that name the keys.

One place loads a checkpoint into a network (``load_weights``) and one place loads checkpoints into the
named parts of a routed network (``load_parts``: BasicSR's ``path.pretrain_network_<part>`` keys), for
training, validation and the tester alike.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping, Optional

import torch

PART_PREFIX = 'pretrain_network_'  # BasicSR's key convention: its option parsing expands ~ in these paths


def read_state_dict(path: str | Path, param_key: Optional[str] = None) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint, loaded with ``weights_only=True`` (no code runs from the file).

    BasicSR checkpoints hold ``{'params': ...}`` and/or ``{'params_ema': ...}``; ``param_key`` picks
    one, default ``params_ema`` if present, else ``params``, else the file's top level.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'checkpoint {path} does not exist; pass the path of a .pth file')
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as exc:
        raise ValueError(f'cannot read checkpoint {path} as a weights-only PyTorch file ({exc})') from exc
    if not isinstance(state, dict):
        raise ValueError(f'checkpoint {path} holds a {type(state).__name__}, not a state dict')
    if param_key is not None:
        if param_key not in state:
            raise KeyError(f'checkpoint {path} has no {param_key!r}; it has {sorted(state)[:8]}')
        return state[param_key]
    for key in ('params_ema', 'params'):
        if isinstance(state.get(key), dict):
            return state[key]
    return state


def load_weights(net: torch.nn.Module, path: str | Path, param_key: Optional[str] = None, strict: bool = True) -> None:
    """Load ``path`` into ``net``; a mismatch names the missing and unexpected keys.

    Keys saved from a ``DataParallel``/``DistributedDataParallel`` wrapper (``module.`` prefix) load too.
    """
    state = {k[7:] if k.startswith('module.') else k: v for k, v in read_state_dict(path, param_key).items()}
    own = net.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong_shape = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if wrong_shape or (strict and (missing or unexpected)):
        raise ValueError(f'checkpoint {path} does not fit {type(net).__name__}: '
                         f'missing keys {missing[:6]}{"..." if len(missing) > 6 else ""}, '
                         f'unexpected keys {unexpected[:6]}{"..." if len(unexpected) > 6 else ""}, '
                         f'wrong shapes {wrong_shape[:6]}')
    net.load_state_dict(state, strict=strict)


def part_paths(path_opt: Mapping) -> dict[str, str]:
    """The ``path.pretrain_network_<part>`` entries of an option section that are set, except BasicSR's own
    ``pretrain_network_g`` (the whole network)."""
    return {
        key: value
        for key, value in path_opt.items() if key.startswith(PART_PREFIX) and key != 'pretrain_network_g' and value
    }


def load_parts(parts: Mapping[str, torch.nn.Module],
               paths: Mapping[str, str | Path],
               param_key: Optional[str] = None,
               strict: bool = True,
               log: Optional[Callable[[str], None]] = None) -> None:
    """Load ``paths[pretrain_network_<name>]`` into ``parts[<name>]`` for every entry of ``paths``.

    Args:
        parts: the network's loadable parts by name, e.g. ``CDNSRNet.named_parts()`` (``classifier``,
            ``branch0``, ...).
        paths: checkpoint per key ``pretrain_network_<name>``.
        param_key, strict: as for ``load_weights``.
        log: told ``Loaded <name> from <path>`` per part.

    Raises:
        ValueError: a key names no part (the message lists the parts), or a checkpoint does not fit.
    """
    known = {PART_PREFIX + name: module for name, module in parts.items()}
    unknown = sorted(set(paths) - set(known))
    if unknown:
        raise ValueError(f'path.{unknown[0]}: the network has parts {sorted(known)} only')
    for key, path in paths.items():
        load_weights(known[key], path, param_key, strict)
        if log is not None:
            log(f'Loaded {key[len(PART_PREFIX):]} from {path}')
