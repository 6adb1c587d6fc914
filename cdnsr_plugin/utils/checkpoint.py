"""Loading network weights from user-given files, safely and with errors that name the keys.

One place loads a checkpoint into a network (``load_weights``) and one place loads checkpoints into the
named parts of a routed network (``load_parts``: BasicSR's ``path.pretrain_network_<part>`` keys), for
training, validation and the tester alike. Every file goes through ``load_tensors``: ``weights_only=True``
(no code in the file runs) and, when the file cannot be used, one paragraph naming it and saying why (a pickle
that would run code, a truncated file, not a PyTorch file), instead of torch's multi-line text and its advice
to load the file with ``weights_only=False``.
"""
from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch

PART_PREFIX = 'pretrain_network_'  # BasicSR's key convention: its option parsing expands ~ in these paths


def load_error(path: str | Path, exc: BaseException, what: str = 'checkpoint') -> str:
    """One paragraph (one line) for ``torch.load(path, weights_only=True)`` failing with ``exc``: the file, and
    why in a few words; never torch's advice to retry with ``weights_only=False`` (it would run the file's
    code)."""
    text = ' '.join(str(exc).split())
    called = re.search(r'GLOBAL ([\w.]+)', text)
    if isinstance(exc, pickle.UnpicklingError) and called:
        return (f'{what} {path} is refused: loading it would call {called.group(1)}, and a file that calls '
                'functions when loaded can run any code (only tensors and plain containers are loaded); nothing was '
                'loaded from it. Use weights saved as a state dict of tensors (torch.save(net.state_dict(), path)) '
                'from a source you trust')
    if isinstance(exc, OSError) and exc.strerror:
        return f'{what} {path} cannot be read: {exc.strerror}'
    detail = re.search(r'WeightsUnpickler error: (.+?)(?: Check the documentation|$)', text)
    if detail:  # e.g. 'Unsupported operand 110': not a pickle the weights-only loader reads
        first = detail.group(1)
    else:
        first = re.split(r'(?<=[a-z)])\. ', text, maxsplit=1)[0]
    first = first.rstrip('. ') or repr(exc)
    return (f'{what} {path} cannot be read ({type(exc).__name__}: {first}): the file is truncated or damaged, or '
            'not a PyTorch weights file; use the complete .pth file')


def load_tensors(path: str | Path, what: str = 'checkpoint') -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU: tensors and plain containers only, no code runs from
    the file. ``ValueError`` (one paragraph naming the file, ``load_error``) if it cannot be loaded so."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings('ignore', message='Detected pickle protocol')  # the refusal follows, named
            return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as exc:  # noqa: BLE001 (torch raises many types for a bad file; each becomes one message)
        raise ValueError(load_error(path, exc, what)) from None


def read_state_dict(path: str | Path, param_key: Optional[str] = None) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint, loaded with ``load_tensors`` (``weights_only=True``: no code runs from the file).

    BasicSR checkpoints hold ``{'params': ...}`` and/or ``{'params_ema': ...}``; ``param_key`` picks
    one, default ``params_ema`` if present, else ``params``, else the file's top level.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'checkpoint {path} does not exist; pass the path of a .pth file')
    state = load_tensors(path)
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
