"""Every error of a training option file, found before BasicSR creates ``experiments/<name>/``.

BasicSR's ``train_pipeline`` parses the options, creates the experiment folders, then builds the datasets and
the model: an option error surfaces one at a time, as a traceback, after an empty experiment folder was left
behind (and a second run is renamed ``<name>_archived_<time>``). ``check_training_options`` runs the checks
that need no training (the network and its scale, the losses, the stages and what feeds their losses, the
numbers, the data folders, the pretrained checkpoints) and returns every problem at once;
``check_before_folders`` wraps BasicSR's ``parse_options`` so that both entries (``python -m
cdnsr_plugin.train`` and BasicSR's stock ``basicsr/train.py`` through the start-up hook) stop with one message
and exit status 2 before anything is written.

The checks build the network on the CPU (small: the same network the run builds) and read the pretrained files
with ``weights_only=True``; they do not build the datasets, only check that their folders and files exist (a
prepared set's labels are read, so a label outside the classes is named with its file and line). BasicSR's
root logger is left untouched (it is configured later, with the run's log file).
"""
from __future__ import annotations

import contextlib
import copy
import math
import sys
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from cdnsr_plugin.models.stages import STAGE_NAMES, parse_stages
from cdnsr_plugin.utils.checkpoint import load_parts, load_tensors, load_weights, part_paths

ROUTED_MODELS = ('CDNSRModel', )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@contextlib.contextmanager
def _basicsr_logger_untouched() -> Iterator[None]:
    """Let ``build_network`` and friends log during the checks without fixing BasicSR's root logger: its
    ``get_root_logger`` configures the logger once, and the run must still attach its log file."""
    import logging

    from basicsr.utils import logger as basicsr_logger
    initialized = dict(basicsr_logger.initialized_logger)
    log = logging.getLogger('basicsr')
    handlers, level, propagate = list(log.handlers), log.level, log.propagate
    log.disabled = True
    try:
        yield
    finally:
        log.disabled = False
        basicsr_logger.initialized_logger.clear()
        basicsr_logger.initialized_logger.update(initialized)
        log.handlers[:] = handlers
        log.setLevel(level)
        log.propagate = propagate


def _network_errors(opt: dict) -> tuple[Optional[torch.nn.Module], list[str]]:
    from basicsr.archs import build_network
    from basicsr.utils.registry import ARCH_REGISTRY
    net_opt = opt.get('network_g')
    if not isinstance(net_opt, dict) or 'type' not in net_opt:
        return None, [
            'network_g is missing (or has no type): name the network to train, e.g. '
            'network_g: {type: CDNSRNet, ...} (see options/networks/)'
        ]
    if net_opt['type'] not in ARCH_REGISTRY:
        return None, [f"network_g.type: no arch named {net_opt['type']!r} in basicsr's ARCH registry"]
    try:
        with torch.device('cpu'):
            net = build_network(copy.deepcopy(dict(net_opt)))
    except Exception as exc:  # noqa: BLE001 (any constructor error is the option file's)
        return None, [f"network_g ({net_opt['type']}): {exc}"]
    errors = []
    scale = getattr(net, 'scale', None)
    if _is_int(scale) and opt.get('scale') != scale:
        errors.append(f"scale is {opt.get('scale')!r} but network_g upscales x{scale}: make them equal")
    return net, errors


def _pretrained_errors(opt: dict, net: Optional[torch.nn.Module]) -> list[str]:
    path_opt = opt.get('path') or {}
    if net is None or path_opt.get('resume_state') or opt.get('auto_resume'):
        return []
    errors = []
    if path_opt.get('pretrain_network_g'):
        try:
            load_weights(net, path_opt['pretrain_network_g'], path_opt.get('param_key_g', 'params'),
                         path_opt.get('strict_load_g', True))
        except Exception as exc:  # noqa: BLE001 (missing file, not a checkpoint, wrong layout)
            errors.append(f'path.pretrain_network_g: {exc}')
    parts = part_paths(path_opt)
    if parts and hasattr(net, 'named_parts'):
        try:
            load_parts(net.named_parts(), parts, path_opt.get('param_key_parts'),
                       path_opt.get('strict_load_parts', True))
        except Exception as exc:  # noqa: BLE001
            errors.append(f'path: {exc}')
    return errors


def _dataset_errors(opt: dict) -> list[str]:
    datasets = opt.get('datasets')
    if not isinstance(datasets, dict) or not isinstance(datasets.get('train'), dict):
        return ['datasets.train is missing: name the training data (see options/train_*.yml)']
    errors = []
    for phase, dataset in datasets.items():
        if not isinstance(dataset, dict):
            errors.append(f'datasets.{phase} must be a mapping, got {dataset!r}')
            continue
        for key, value in dataset.items():
            if key.startswith('dataroot_') or key in ('meta_info_file', 'label_file'):
                if value is None:
                    continue
                if not Path(str(value)).exists():
                    errors.append(f'datasets.{phase}.{key}: {value} does not exist (prepare the data first: '
                                  'tools/prepare_data.py, tools/make_test_sets.py)')
        if dataset.get('type') == 'DifficultyPairedDataset' and not errors:
            errors += _label_errors(phase, dataset, opt)
    train = datasets['train']
    for key in ('batch_size_per_gpu', 'gt_size'):
        if key in train and not (_is_int(train[key]) and train[key] > 0):
            errors.append(f'datasets.train.{key} must be a positive integer, got {train[key]!r}')
    return errors


def _label_errors(phase: str, dataset: dict, opt: dict) -> list[str]:
    from cdnsr_plugin.data.prepared_set import PreparedSet, read_labels
    try:
        prepared = PreparedSet(Path(str(dataset['dataroot_lq'])).parent)
        label_path = Path(dataset['label_file']) if dataset.get('label_file') else prepared.labels_path
        read_labels(label_path, prepared.num_classes)
    except Exception as exc:  # noqa: BLE001
        return [f'datasets.{phase}: {exc}']
    classes = (opt.get('network_g') or {}).get('classifier', {}) or {}
    wanted = classes.get('num_classes') if isinstance(classes, dict) else None
    if _is_int(wanted) and wanted != prepared.num_classes:
        return [
            f'datasets.{phase}: the prepared set at {prepared.root} has {prepared.num_classes} classes but '
            f'network_g.classifier.num_classes is {wanted}'
        ]
    return []


SCHEDULERS = ('MultiStepLR', 'MultiStepRestartLR', 'CosineAnnealingRestartLR')  # BasicSR 1.4.2's setup_schedulers


def _optimizer_error(opt: dict, optim: dict) -> Optional[str]:
    """Whether the model class builds ``optim.type``: asked of its own ``get_optimizer`` on a dummy parameter (BasicSR
    1.4.2 builds only Adam; a model or a later BasicSR may build more), so the check never drifts from the run."""
    from basicsr.utils.registry import MODEL_REGISTRY
    try:
        model_cls = MODEL_REGISTRY.get(opt.get('model_type', 'SRModel'))
    except KeyError:
        return None  # BasicSR names the unknown model itself
    kwargs = {k: v for k, v in optim.items() if k not in ('type', 'lr')}
    try:
        model_cls.get_optimizer(None, optim['type'], [torch.zeros(1, requires_grad=True)], 1e-3, **kwargs)
    except NotImplementedError:
        return (f"train.optim_g.type: {optim['type']!r} is not an optimizer {model_cls.__name__} builds "
                '(BasicSR 1.4.2 builds Adam)')
    except Exception as exc:  # noqa: BLE001 (a wrong keyword, a bad value)
        return f"train.optim_g ({optim['type']}): {' '.join(str(exc).split())}"
    return None


def _schedule_errors(opt: dict, train: dict) -> list[str]:
    errors = []
    total = train.get('total_iter')
    if not (_is_int(total) and total > 0):
        errors.append(f'train.total_iter must be a positive integer, got {total!r}')
    optim = train.get('optim_g')
    if isinstance(optim, dict) and 'lr' in optim and not (_is_finite_number(optim['lr']) and optim['lr'] > 0):
        errors.append(f"train.optim_g.lr must be a positive number, got {optim['lr']!r} (write 1.0e-3, not '1e-3': "
                      'YAML reads 1e-3 as text)')
    if not isinstance(optim, dict) or 'type' not in optim:
        errors.append('train.optim_g is missing (or has no type): e.g. optim_g: {type: Adam, lr: !!float 2e-4}')
    else:
        error = _optimizer_error(opt, optim)
        errors += [error] if error else []
    scheduler = train.get('scheduler')
    if scheduler is not None and not (isinstance(scheduler, dict) and scheduler.get('type') in SCHEDULERS):
        got = scheduler.get('type') if isinstance(scheduler, dict) else scheduler
        errors.append(f"train.scheduler.type must be one of {', '.join(SCHEDULERS)} (BasicSR's schedulers), "
                      f'got {got!r}')
    return errors


def _resume_errors(opt: dict, net: Optional[torch.nn.Module]) -> list[str]:
    """``path.resume_state``: a state these tools can load safely, of this experiment, before the end of the schedule,
    whose network checkpoint (the one BasicSR's ``check_resume`` will load) fits the network."""
    path = (opt.get('path') or {}).get('resume_state')
    if not path:
        return []
    state_path = Path(str(path))
    if not state_path.is_file():
        return [f'path.resume_state: {path} does not exist']
    try:
        state = load_tensors(state_path, 'training state')
        resume_iter = int(state['iter'])
    except ValueError as exc:  # a pickle with code, a truncated file (one line, utils.checkpoint.load_error)
        return [f'path.resume_state: {exc}. Give a <iter>.state file that BasicSR saved']
    except Exception as exc:  # noqa: BLE001 (loads, but is not a state: no iter)
        return [f'path.resume_state: {path} is not a training state of BasicSR ({type(exc).__name__}: {exc})']
    errors = []
    name = opt.get('name')
    if state_path.parent.name == 'training_states' and state_path.parent.parent.name != name:
        errors.append(f'path.resume_state: {path} belongs to the experiment {state_path.parent.parent.name!r}, '
                      f'not to name: {name!r}; BasicSR would resume into experiments/{name}/ without its models. '
                      f'Set name: {state_path.parent.parent.name} to continue that run, or start a new one from its '
                      'weights with path.pretrain_network_g')
        return errors
    total = (opt.get('train') or {}).get('total_iter')
    if _is_int(total) and resume_iter > total:
        errors.append(f'path.resume_state: {path} is at iteration {resume_iter}, past train.total_iter {total}: '
                      'nothing would be trained and models/net_g_latest.pth would be overwritten with the weights of '
                      f'iteration {resume_iter}. Raise total_iter to continue, or leave resume_state out')
    models = state_path.parent.parent / 'models'
    network = models / f'net_g_{resume_iter}.pth'
    if net is not None and not network.is_file():
        errors.append(f'path.resume_state: {path} needs its network checkpoint {network}, which does not exist')
    elif net is not None:
        try:
            load_weights(net, network, 'params', True)
        except Exception as exc:  # noqa: BLE001
            errors.append(f'path.resume_state: {exc} (a state from another network? network_g must be the one '
                          'the state was trained with)')
    return errors


def _routed_errors(opt: dict, train: dict, net: Optional[torch.nn.Module]) -> list[str]:
    from basicsr.losses import build_loss

    from cdnsr_plugin.models.cdnsr_model import cache_errors, floor_errors, stage_input_errors
    loss_opts = train.get('losses')
    if not isinstance(loss_opts, dict) or not loss_opts:
        return ['train.losses must map loss names to their options, e.g. losses: {pixel: {type: L1Loss}}']
    losses, errors = {}, []
    for name, loss_opt in loss_opts.items():
        if not isinstance(loss_opt, dict) or 'type' not in loss_opt:
            errors.append(f'train.losses.{name} must be a mapping with a type, e.g. {{type: L1Loss}}')
            continue
        weight = loss_opt.get('loss_weight', 1.0)
        if not _is_finite_number(weight):
            errors.append(f'train.losses.{name}.loss_weight must be a finite number, got {weight!r}')
            continue
        try:
            losses[name] = build_loss(copy.deepcopy(dict(loss_opt)))
        except Exception as exc:  # noqa: BLE001
            errors.append(f'train.losses.{name}: {exc}')
    stages, stage_errors = parse_stages(train, set(loss_opts))  # failed losses are configured: not "missing"
    errors += stage_errors + cache_errors(train) + floor_errors(train)
    if not stage_errors and net is not None and set(losses) == set(loss_opts):
        errors += stage_input_errors(opt, losses, stages, net)
    return errors


def check_training_options(opt: dict) -> list[str]:
    """Every problem found in the parsed training options ``opt`` (empty when none); see the module doc."""
    with _basicsr_logger_untouched():
        net, errors = _network_errors(opt)
        errors += _dataset_errors(opt)
        train = opt.get('train')
        if not isinstance(train, dict):
            return errors + ['train is missing: give total_iter, optim_g and the losses']
        errors += _schedule_errors(opt, train)
        if opt.get('model_type') in ROUTED_MODELS:
            errors += _routed_errors(opt, train, net)
        elif train.get('stages') is not None:
            errors.append(f"train.stages ({', '.join(STAGE_NAMES)}) need model_type: CDNSRModel, got "
                          f"{opt.get('model_type')!r}")
        errors += _pretrained_errors(opt, net) + _resume_errors(opt, net)
    return errors


def format_errors(source: str, errors: list[str]) -> str:
    return (f'{source}: {len(errors)} problem(s) in the training options; nothing was created or trained:\n  - ' +
            '\n  - '.join(errors))


def check_before_folders() -> None:
    """Wrap BasicSR's ``parse_options`` (in ``basicsr.utils.options`` and where ``basicsr.train`` imported it) so
    that training options are checked before ``train_pipeline`` creates any folder; on errors print them all
    and exit with status 2. Idempotent."""
    import basicsr.train as basicsr_train
    from basicsr.utils import options

    original = options.parse_options
    if getattr(original, '_cdnsr_checked', False):
        return

    def parse_options(root_path: str, is_train: bool = True) -> tuple[dict, Any]:
        opt, args = original(root_path, is_train)
        if is_train:
            errors = check_training_options(opt)
            if errors:
                print(format_errors(getattr(args, 'opt', 'options'), errors), file=sys.stderr)
                raise SystemExit(2)
            lock_experiment(opt)
        return opt, args

    parse_options._cdnsr_checked = True  # type: ignore[attr-defined]
    options.parse_options = parse_options
    basicsr_train.parse_options = parse_options


def lock_experiment(opt: dict) -> None:
    """Hold ``experiments/<name>.lock`` (``utils.locks``) for the rest of this process, taken by rank 0 before
    BasicSR creates, archives or resumes ``experiments/<name>/``: a second run of the same name would archive the
    first run's folder while the first keeps saving into the second's, and one overwrites the other's final
    weights. It fails at once with one line naming the running process, exit 2. A dead run's lock is taken over
    with a note; the lock file is removed when this process exits."""
    import atexit

    from cdnsr_plugin.utils.locks import RunLock
    if opt.get('rank', 0) != 0:
        return
    root = (opt.get('path') or {}).get('experiments_root')
    if not root:
        return
    lock = RunLock(root, 'experiment', 'give this run another name: in the option file')
    try:
        lock.acquire()
    except FileExistsError as exc:
        print(f'error: {exc}', file=sys.stderr)
        raise SystemExit(2) from None
    atexit.register(lock.release)
