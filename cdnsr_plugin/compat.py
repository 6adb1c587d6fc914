"""The one place that bridges gaps between the PyPI release basicsr 1.4.2 and current packages.

Nothing else in the plugin monkey-patches third-party code. Importing ``cdnsr_plugin`` applies only the
first bridge below, without which basicsr cannot be imported at all; the other three change basicsr's
behaviour and are applied by ``patch_basicsr()``, which only the places that run basicsr's pipelines call:
the plugin's entries (``python -m cdnsr_plugin.train`` / ``.test``, ``cdnsr-train``, ``cdnsr-test``) and the
start-up hook when the program is BasicSR's own ``basicsr/train.py`` or ``basicsr/test.py``
(``_cdnsr_plugin_autoload.py``). A program that merely imports the plugin (or basicsr, with the hook
installed) gets basicsr unchanged apart from the registrations.

* ``alias_functional_tensor`` (basicsr 1.4.2, torchvision >= 0.17): basicsr imports
  ``torchvision.transforms.functional_tensor``, removed in torchvision 0.17. Its one use
  (``rgb_to_grayscale``) lives on in ``torchvision.transforms.functional``, so that module is registered
  under the old name, but only when the old module really is missing. Must run before basicsr is imported.
* ``use_safe_yaml`` (basicsr 1.4.2, security): basicsr's ``parse_options`` reads option files with PyYAML's
  full ``Loader``, which constructs arbitrary Python objects from tags such as
  ``!!python/object/apply``. It is replaced by a safe loader that keeps basicsr's ordered-dict behaviour,
  so an option file can never execute code. Standard tags (``!!float 2e-4``) still work.
* ``cpu_resume`` (basicsr 1.4.2, machines without CUDA): basicsr's ``train.load_resume_state`` maps the
  saved state onto ``torch.cuda.current_device()``, which fails without a GPU. On a machine without CUDA
  the plugin's ``load_resume_state`` loads it on the CPU (``weights_only=True``); with CUDA, basicsr's
  own runs. Effective for ``python -m cdnsr_plugin.train`` (which calls ``basicsr.train``); BasicSR's
  stock ``basicsr/train.py`` script carries its own copy of the function, so CPU resume needs the
  plugin's entry.
* ``cpu_distributed`` (basicsr 1.4.2, machines without CUDA): basicsr's ``_init_dist_pytorch`` divides
  the rank by the GPU count and sets a CUDA device. Without CUDA, the process group is initialised with
  the ``gloo`` backend instead (``torchrun --nproc_per_node 2 -m cdnsr_plugin.train ... --launcher
  pytorch`` on CPUs).
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
        pairs = loader.construct_pairs(node)
        seen = set()
        for (key, _), (key_node, _) in zip(pairs, node.value):
            if key in seen:  # PyYAML keeps the last one silently: a typo-level mistake that changes a run
                raise yaml.constructor.ConstructorError(None, None,
                                                        f'duplicate key {key!r} (the file sets it twice; keep one)',
                                                        key_node.start_mark)
            seen.add(key)
        return OrderedDict(pairs)

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


def cpu_resume() -> None:
    """Let ``basicsr.train.train_pipeline`` resume on machines without CUDA (see module doc)."""
    import basicsr.train as train
    import torch

    if getattr(train.load_resume_state, '_cdnsr_cpu', False):
        return
    original = train.load_resume_state

    def load_resume_state(opt):
        if torch.cuda.is_available():
            return original(opt)
        import os.path as osp

        from basicsr.utils import scandir
        from basicsr.utils.misc import check_resume
        path = opt['path'].get('resume_state')
        if opt['auto_resume']:
            folder = osp.join('experiments', opt['name'], 'training_states')
            states = list(scandir(folder, suffix='state')) if osp.isdir(folder) else []
            if states:
                path = osp.join(folder, f"{max(float(v.split('.state')[0]) for v in states):.0f}.state")
                opt['path']['resume_state'] = path
        if not path:
            return None
        state = torch.load(path, map_location='cpu', weights_only=True)
        check_resume(opt, state['iter'])
        return state

    load_resume_state._cdnsr_cpu = True  # type: ignore[attr-defined]
    train.load_resume_state = load_resume_state


def cpu_distributed() -> None:
    """Initialise ``--launcher pytorch`` runs with gloo when there is no GPU (see module doc)."""
    from basicsr.utils import dist_util

    if getattr(dist_util._init_dist_pytorch, '_cdnsr_cpu', False):
        return
    original = dist_util._init_dist_pytorch

    def _init_dist_pytorch(backend='nccl', **kwargs):
        import torch
        import torch.distributed as dist
        if torch.cuda.is_available() and torch.cuda.device_count() > 0:
            return original(backend, **kwargs)
        dist.init_process_group(backend='gloo', **kwargs)

    _init_dist_pytorch._cdnsr_cpu = True  # type: ignore[attr-defined]
    dist_util._init_dist_pytorch = _init_dist_pytorch


def patch_basicsr() -> None:
    """Apply ``use_safe_yaml``, ``cpu_resume`` and ``cpu_distributed`` (idempotent). Called by the entries that
    run basicsr's pipelines and by the start-up hook for BasicSR's own scripts; see the module docstring."""
    use_safe_yaml()
    cpu_resume()
    cpu_distributed()
