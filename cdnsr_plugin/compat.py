"""The one place that bridges gaps between the PyPI release basicsr 1.4.2 and current packages.

Nothing else in the plugin monkey-patches third-party code. Importing ``cdnsr_plugin`` applies only the
first bridge below, without which basicsr cannot be imported at all; the others change basicsr's
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
* ``cpu_resume`` (basicsr 1.4.2): basicsr's ``train.load_resume_state`` maps the saved state onto
  ``torch.cuda.current_device()``, which fails without a GPU, and with ``--auto_resume`` takes the newest
  state even when a kill during its direct ``torch.save`` left it truncated (a traceback naming no file).
  The plugin's ``load_resume_state`` loads on the CPU where there is no CUDA (``weights_only=True``) and
  skips a state that does not load, with a warning naming it, for the next newest. Effective for
  ``python -m cdnsr_plugin.train`` (which calls ``basicsr.train``); BasicSR's stock ``basicsr/train.py``
  script carries its own copy of the function, so these need the plugin's entry.
* ``atomic_checkpoints`` (basicsr 1.4.2): ``BaseModel.save_network`` and ``save_training_state`` write with
  ``torch.save`` straight to the final name, so a kill (or a full disk) while saving leaves a truncated
  ``net_g_<iter>.pth`` / ``<iter>.state`` under the name ``--auto_resume`` picks. The ``torch`` that
  ``basicsr.models.base_model`` sees is replaced by a view of torch whose ``save`` writes to a temporary
  name beside the target (``.<name>.<pid>.tmp``, which no BasicSR scan picks up), syncs it and renames it
  over the target: a checkpoint is either the old file or the complete new one (temporary files of killed
  processes are removed at the next save). Everything else is torch.
* ``full_epochs`` (basicsr 1.4.2): ``create_train_val_dataloader`` counts ``ceil(N / batch)`` iterations per
  epoch but its loader drops the last partial batch, so a run whose data is not a multiple of the batch ends
  before ``total_iter``, its last stage cut short, with no warning. ``build_dataloader`` (in ``basicsr.data`` and
  where ``basicsr.train`` imported it) gives the training loader ``utils.batches.IterationBatchSampler``, which
  yields exactly the counted iterations per epoch and sizes each batch by its iteration's stage
  (``train.stages[i].batch_size_per_gpu``; BasicSR's own models have one size). Loaders built without BasicSR's
  ``EnlargedSampler`` and validation loaders are BasicSR's own.
* ``cpu_distributed`` (basicsr 1.4.2, machines without CUDA): basicsr's ``_init_dist_pytorch`` divides
  the rank by the GPU count and sets a CUDA device. Without CUDA, the process group is initialised with
  the ``gloo`` backend instead (``torchrun --nproc_per_node 2 -m cdnsr_plugin.train ... --launcher
  pytorch`` on CPUs).
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import types
import warnings
from collections import OrderedDict
from typing import Optional

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


MAX_EXPANDED_NODES = 1_000_000  # a real option file has a few hundred values


def _expanded_size(value: object, memo: dict[int, int]) -> int:
    """How many values ``value`` holds once every shared (aliased) container is copied out; linear in the
    document's own size (shared containers are counted once and remembered)."""
    if not isinstance(value, (dict, list)):
        return 1
    key = id(value)
    if key not in memo:
        memo[key] = 0  # a self-referencing alias counts as one while it is being counted
        children = value.values() if isinstance(value, dict) else value
        memo[key] = 1 + sum(_expanded_size(child, memo) for child in children)
    return memo[key]


def _safe_ordered_loader() -> type:
    import yaml
    base = getattr(yaml, 'CSafeLoader', yaml.SafeLoader)

    class SafeOrderedLoader(base):  # type: ignore[misc, valid-type]
        """``yaml.SafeLoader`` that returns ``OrderedDict`` mappings, as basicsr expects, and refuses documents
        whose aliases expand to more than ``MAX_EXPANDED_NODES`` values (a "billion laughs" file: YAML shares
        aliased values, and basicsr's option handling then copies them out until memory runs out)."""

        def get_single_data(self):  # type: ignore[no-untyped-def]
            data = super().get_single_data()
            size = _expanded_size(data, {})
            if size > MAX_EXPANDED_NODES:
                raise yaml.YAMLError(f'the document expands to {size:.3g} values through its aliases (more than '
                                     f'{MAX_EXPANDED_NODES:,}): an alias bomb, not an option file')
            return data

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


class OptionFileError(ValueError):
    """An option file that cannot be read: a YAML syntax error, a duplicate key, a tag that would build a Python
    object (``!!python/object``), an alias bomb, bytes that are not UTF-8. The message is one line naming the file
    and the place; every entry prints it and exits with status 2 (a ``ValueError``, so the tools' handlers do)."""


def describe_yaml_error(path: str, exc: BaseException) -> str:
    """One line for a YAML (or decoding) error in ``path``: what, and where (line and column)."""
    problem = getattr(exc, 'problem', None) or getattr(exc, 'context', None) or str(exc).splitlines()[0]
    mark = getattr(exc, 'problem_mark', None) or getattr(exc, 'context_mark', None)
    where = f' (line {mark.line + 1}, column {mark.column + 1})' if mark is not None else ''
    if 'python/' in str(problem) or 'python/' in str(exc):
        problem = ('a !!python/... tag asks YAML to build a Python object; option files are read with a safe loader '
                   'and hold plain values only: ' + str(problem))
    return f'{path}: not a usable option file: {" ".join(str(problem).split())}{where}'


def use_safe_yaml() -> None:
    """Make basicsr's ``parse_options`` read option files with a safe YAML loader, and turn an unreadable option
    file into one line and exit status 2 (``basicsr.train``/``basicsr.test`` and the plugin's entries)."""
    from basicsr.utils import options

    if getattr(options.ordered_yaml, '_cdnsr_safe', False):
        return
    original = options.ordered_yaml

    def ordered_yaml():  # same signature and return shape as basicsr's
        _, dumper = original()
        return _safe_ordered_loader(), dumper

    ordered_yaml._cdnsr_safe = True  # type: ignore[attr-defined]
    options.ordered_yaml = ordered_yaml
    parse = options.parse_options

    def parse_options(root_path: str, is_train: bool = True):  # type: ignore[no-untyped-def]
        import yaml
        try:
            return parse(root_path, is_train)
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            print('error: ' + describe_yaml_error(_option_argument(), exc), file=sys.stderr)
            raise SystemExit(2) from None

    options.parse_options = parse_options
    for module in ('basicsr.train', 'basicsr.test'):  # they imported the function by name
        imported = sys.modules.get(module)
        if imported is not None and hasattr(imported, 'parse_options'):
            imported.parse_options = parse_options


def _option_argument() -> str:
    """The ``-opt`` value on the command line (how BasicSR's parser names the option file)."""
    argv = sys.argv
    for i, arg in enumerate(argv[:-1]):
        if arg == '-opt':
            return argv[i + 1]
    return next((arg.split('=', 1)[1] for arg in argv if arg.startswith('-opt=')), 'the option file')


def load_yaml(path: str) -> dict:
    """Read an option file with the same safe, order-keeping loader basicsr now uses. Raises ``OptionFileError``
    (one line) when the file is not readable YAML of plain values, ``FileNotFoundError`` when it is missing."""
    import yaml
    try:
        with open(path, encoding='utf-8') as handle:
            return yaml.load(handle, Loader=_safe_ordered_loader())  # noqa: S506 (safe loader)
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise OptionFileError(describe_yaml_error(path, exc)) from None


def resume_candidates(opt: dict) -> list[str]:
    """Training states to resume from, newest first: with ``auto_resume`` every ``<iter>.state`` of the
    experiment, else ``path.resume_state`` (if set)."""
    import os.path as osp

    from basicsr.utils import scandir
    if opt.get('auto_resume'):
        folder = osp.join('experiments', opt['name'], 'training_states')
        names = list(scandir(folder, suffix='state', recursive=False, full_path=False)) if osp.isdir(folder) else []
        iters = sorted((float(name.split('.state')[0]) for name in names), reverse=True)
        return [osp.join(folder, f'{value:.0f}.state') for value in iters]
    path = opt['path'].get('resume_state')
    return [path] if path else []


def load_resume_state(opt: dict) -> Optional[dict]:
    """BasicSR's ``load_resume_state`` with two fixes: it runs without CUDA (states mapped to the CPU), and a
    state that does not load (a kill during BasicSR's direct ``torch.save`` leaves a truncated file) is skipped
    with a warning naming it, falling back to the next newest, whose network checkpoint then resumes. Exits with
    status 2 (one message naming every file tried) when none loads, and when the state lies past
    ``train.total_iter`` (BasicSR would train nothing and save the state's weights over ``net_g_latest.pth``).
    ``weights_only`` loading throughout."""
    import torch
    from basicsr.utils.misc import check_resume
    if torch.cuda.is_available():
        device = torch.cuda.current_device()
        location = lambda storage, loc: storage.cuda(device)  # noqa: E731 (as BasicSR maps states)
    else:
        location = 'cpu'
    skipped = []
    for path in resume_candidates(opt):
        try:
            state = torch.load(path, map_location=location, weights_only=True)
            int(state['iter'])
        except Exception as exc:  # noqa: BLE001 (truncated zip, unpickling error, missing key: all unusable)
            skipped.append(f'{path} ({type(exc).__name__}: {exc})')
            warnings.warn(f'training state {path} does not load ({type(exc).__name__}: {exc}); trying an older one')
            continue
        total = (opt.get('train') or {}).get('total_iter')
        if isinstance(total, int) and int(state['iter']) > total:  # BasicSR would train nothing, then save the
            # state's weights as net_g_latest.pth over the final model
            print(
                f"error: training state {path} is at iteration {int(state['iter'])}, past train.total_iter {total}: "
                'nothing would be trained and models/net_g_latest.pth would be overwritten with its weights. Raise '
                'total_iter to continue the run, or start a new experiment name',
                file=sys.stderr)
            raise SystemExit(2)
        opt['path']['resume_state'] = path
        check_resume(opt, state['iter'])
        return state
    if skipped:
        print(
            'error: no training state could be loaded: ' + '; '.join(skipped) + '. Delete the broken files to '
            'resume from an older one, or start again without --auto_resume / resume_state',
            file=sys.stderr)
        raise SystemExit(2)
    return None


def cpu_resume() -> None:
    """Replace ``basicsr.train.load_resume_state`` by ``load_resume_state`` (CPU resume, broken states skipped)."""
    import basicsr.train as train

    if getattr(train.load_resume_state, '_cdnsr_cpu', False):
        return

    def patched(opt: dict) -> Optional[dict]:
        return load_resume_state(opt)

    patched._cdnsr_cpu = True  # type: ignore[attr-defined]
    train.load_resume_state = patched


def atomic_torch_save(obj: object, path: str | os.PathLike, **kwargs: object) -> None:
    """``torch.save(obj, path)`` through a temporary name beside ``path``, synced, then renamed over it."""
    import torch
    path = os.fspath(path)
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f'.{name}.{os.getpid()}.tmp')
    try:
        with open(tmp, 'wb') as handle:
            torch.save(obj, handle, **kwargs)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    _remove_orphans(folder or '.', name)


def _remove_orphans(folder: str, name: str) -> None:
    """Temporary files of ``name`` left by a killed process (its pid no longer runs)."""
    prefix = f'.{name}.'
    for entry in os.listdir(folder):
        pid = entry[len(prefix):-len('.tmp')] if entry.startswith(prefix) and entry.endswith('.tmp') else ''
        if pid.isdigit() and int(pid) != os.getpid() and not _running(int(pid)):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(folder, entry))


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class _TorchSavingAtomically(types.ModuleType):
    """``torch`` with ``save`` going through ``atomic_torch_save`` when given a path."""

    def __init__(self) -> None:
        super().__init__('torch', 'torch, whose save writes to a temporary name then renames (cdnsr_plugin.compat)')

    def __getattr__(self, name: str) -> object:
        import torch
        return getattr(torch, name)

    @staticmethod
    def save(obj: object, f: object, *args: object, **kwargs: object) -> None:
        import torch
        if isinstance(f, (str, os.PathLike)) and not args:
            return atomic_torch_save(obj, f, **kwargs)
        return torch.save(obj, f, *args, **kwargs)


def atomic_checkpoints() -> None:
    """Make BasicSR's checkpoint and training-state writes atomic (see module doc)."""
    from basicsr.models import base_model
    if not isinstance(base_model.torch, _TorchSavingAtomically):
        base_model.torch = _TorchSavingAtomically()


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


def _loader_kwargs(loader) -> dict:
    """What ``basicsr.data.build_dataloader`` gave ``loader`` besides its dataset, batching and sampler."""
    kwargs = dict(
        num_workers=loader.num_workers,
        worker_init_fn=loader.worker_init_fn,
        pin_memory=loader.pin_memory,
        persistent_workers=loader.persistent_workers)
    if hasattr(loader, 'num_prefetch_queue'):  # basicsr's PrefetchDataLoader (prefetch_mode: cpu)
        kwargs['num_prefetch_queue'] = loader.num_prefetch_queue
    return kwargs


def full_epochs() -> None:
    """Give BasicSR's training loaders ``IterationBatchSampler`` (see module doc; idempotent)."""
    import basicsr.data
    import basicsr.train
    from basicsr.data.data_sampler import EnlargedSampler

    from cdnsr_plugin.utils.batches import IterationBatchSampler, iterations_per_epoch
    if getattr(basicsr.data.build_dataloader, '_cdnsr_full_epochs', False):
        return
    original = basicsr.data.build_dataloader

    def build_dataloader(dataset, dataset_opt, num_gpu=1, dist=False, sampler=None, seed=None):
        loader = original(dataset, dataset_opt, num_gpu=num_gpu, dist=dist, sampler=sampler, seed=seed)
        if dataset_opt.get('phase') != 'train' or not isinstance(sampler, EnlargedSampler):
            return loader
        per_gpu = int(dataset_opt['batch_size_per_gpu'])
        multiplier = 1 if dist or num_gpu == 0 else num_gpu
        batches = IterationBatchSampler(sampler, loader.batch_size, iterations_per_epoch(len(sampler), per_gpu),
                                        multiplier)
        return type(loader)(dataset=dataset, batch_sampler=batches, **_loader_kwargs(loader))

    build_dataloader._cdnsr_full_epochs = True  # type: ignore[attr-defined]
    basicsr.data.build_dataloader = build_dataloader
    basicsr.train.build_dataloader = build_dataloader


def patch_basicsr() -> None:
    """Apply ``use_safe_yaml``, ``cpu_resume``, ``atomic_checkpoints``, ``full_epochs`` and ``cpu_distributed``
    (idempotent). Called by the entries that run basicsr's pipelines and by the start-up hook for BasicSR's own
    scripts; see the module docstring."""
    use_safe_yaml()
    cpu_resume()
    atomic_checkpoints()
    full_epochs()
    cpu_distributed()
