"""What ``tools/test_patches.py`` runs: read from a BasicSR test option file or from plain flags.

Option-file mode reads BasicSR's test option layout (``datasets.test_*.dataroot_gt/dataroot_lq``,
``network_g``, ``path.pretrain_network_g``/``param_key_g``/``strict_load_g``, ``val``), so one file
serves both ``python tools/test_patches.py -opt X`` and BasicSR's own ``basicsr/test.py``. The
tester's extra keys live under ``val`` (``patch``, ``stride``, ``max_batch``, ``router``,
``router_file``, ``eta``, ``budget``, ``set_budget``, ``sweep``, ``compare_backbone``); a command-line flag overrides
the file.

Direct mode: ``--input LR_DIR [--gt HR_DIR] --checkpoint CKPT --scale 4``. The network comes from
``--network`` (an option file with ``network_g``) or, by default, from the option file BasicSR copied
into the checkpoint's experiment folder (``experiments/<name>/models/x.pth`` -> ``experiments/<name>/*.yml``).

Backends: ``torch`` (default) runs the network built from the options with its checkpoint; ``onnxruntime``
(``--onnx FOLDER``, what ``tools/export_onnx.py`` wrote) runs the exported classifier and branches on the CPU,
the network, scale, costs, halos and default patch coming from the export's manifest (``deploy.onnx_runtime``).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from cdnsr_plugin.compat import load_yaml
from cdnsr_plugin.deploy.onnx_runtime import read_manifest
from cdnsr_plugin.inference.engine import PRECISIONS, EngineOptions
from cdnsr_plugin.inference.regions import DEFAULT_HALO, parse_halo

DEFAULT_SWEEP = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
ROUTERS = ('classifier', 'laplacian')
BACKENDS = ('torch', 'onnxruntime')
ONNXRUNTIME = 'onnxruntime'


@dataclass(frozen=True)
class DatasetSpec:
    """One test set: LR folder, optional GT folder, and how GT names map to LR names."""

    name: str
    lq: Path
    gt: Optional[Path] = None
    filename_tmpl: str = '{}'


@dataclass(frozen=True)
class Setting:
    """One routing decision rule applied to every image.

    ``budget`` is met per image (``policies.solve_budget``: FLOPs per tile, a fraction of the largest branch's);
    ``set_budget`` over each test set as a whole (``tester.set_budget``: FLOPs that run, a fraction of the
    backbone's on the whole images), one ``eta`` for all its images.
    """

    name: str
    kind: str = 'routed'  # routed | backbone-full | backbone-tiled | backbone-patch
    eta: Optional[float] = None
    budget: Optional[float] = None
    set_budget: Optional[float] = None


@dataclass
class TestConfig:
    """Everything a run needs, validated before any image is read."""

    name: str
    out: Path
    scale: Optional[int]
    network: dict
    checkpoint: Optional[Path]
    datasets: list[DatasetSpec]
    parts: dict[str, Path] = field(default_factory=dict)  # pretrain_network_branch<i> / _classifier -> file
    param_key: Optional[str] = None
    strict: bool = True
    engine: EngineOptions = EngineOptions()  # max_batch None: the engine's per-device default
    device: str = 'auto'
    threads: Optional[int] = None
    router: str = 'classifier'
    router_file: Optional[Path] = None
    fit_router: Optional[Path] = None
    settings: list[Setting] = field(default_factory=list)
    compare_backbone: bool = False
    convention: str = 'paper'
    save_images: bool = True
    overwrite: bool = False  # --out may hold an earlier run (its outputs are removed first)
    save_setting: Optional[str] = None
    backend: str = 'torch'  # or onnxruntime: the export in ``onnx`` (tools/export_onnx.py), on the CPU
    onnx: Optional[Path] = None


def halo_type(text: str) -> int | str:
    """argparse type of ``--halo``."""
    try:
        return parse_halo(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``tools/test_patches.py``."""
    parser = argparse.ArgumentParser(
        prog='test_patches.py',
        description='Routed, full-coverage patch-wise SR with reports, class maps and a '
        'cost knob. Either -opt TEST_OPTIONS.yml, or --input LR_DIR [--gt HR_DIR] --checkpoint CKPT --scale S.')
    source = parser.add_argument_group('what to test')
    source.add_argument('-opt', help='BasicSR test option file (datasets, network_g, path, val)')
    source.add_argument('--input', type=Path, help='an LR image, or a folder of LR images (direct mode)')
    source.add_argument('--gt', type=Path, help='folder of HR images named like the LR ones (direct mode)')
    source.add_argument('--checkpoint', type=Path, help='weights (.pth); overrides path.pretrain_network_g')
    source.add_argument(
        '--branches',
        help='comma-separated branch checkpoints, smallest first (e.g. with '
        '--router laplacian when no classifier was trained); loaded after --checkpoint')
    source.add_argument(
        '--network',
        type=Path,
        help='option file with network_g (direct mode; default: the '
        'option file BasicSR saved in the checkpoint\'s experiment folder)')
    source.add_argument('--scale', type=int, help='upscaling factor (checked against the network)')
    source.add_argument(
        '--backend',
        choices=BACKENDS,
        help='torch (default): the network and its checkpoint; onnxruntime: an export of tools/export_onnx.py '
        '(--onnx), on the CPU (default when --onnx is given)')
    source.add_argument(
        '--onnx',
        type=Path,
        help='folder written by tools/export_onnx.py: its manifest gives the network, scale, costs and halo (no '
        '--checkpoint/--network; with -opt only the file\'s datasets and val are read)')
    source.add_argument('--name', help='run name (default: from the option file, else the LR folder name)')
    source.add_argument('--out', type=Path, help='results folder, new or empty (default: results/<name>)')
    source.add_argument(
        '--overwrite',
        action='store_true',
        help='--out may hold an earlier run: its outputs (the files its report.json lists) are removed first')
    engine = parser.add_argument_group('engine')
    engine.add_argument('--patch', type=int, help='LR tile side (default 32)')
    engine.add_argument('--stride', type=int, help='step between tiles (default 28)')
    engine.add_argument('--max-batch', type=int, help='largest batch per branch pass (default 16 on CPU, 128 on CUDA)')
    engine.add_argument('--no-channels-last', action='store_true', help='keep the default memory format')
    engine.add_argument(
        '--tiling',
        choices=('paper', 'regions'),
        help='regions (default): cells classified, rectangles executed with real context (--halo), nothing '
        'averaged; paper: tiles at --stride, zero-padded, overlaps averaged (the papers\' protocol)')
    engine.add_argument(
        '--halo',
        type=halo_type,
        help='regions: LR pixels of context per side, or "exact" (the measured receptive radius); default: '
        'the backbone\'s default (' + ', '.join(f'{k} {v}' for k, v in DEFAULT_HALO.items()) + '), else exact')
    engine.add_argument(
        '--tile',
        type=int,
        help='LR tile side of the "backbone tiled" baseline (--compare-backbone); default: measured once per run '
        '(the fastest per pixel of a few sides on this device)')
    engine.add_argument('--precision', choices=sorted(PRECISIONS), help='fp16/bf16 need CUDA (default fp32)')
    engine.add_argument('--device', help='cpu, cuda, cuda:1 or auto (default: option num_gpu, else auto)')
    engine.add_argument('--threads', type=int, help='CPU threads for torch (default: torch\'s choice)')
    routing = parser.add_argument_group('routing and the cost knob')
    routing.add_argument(
        '--router', choices=ROUTERS, help='learned classifier (default) or the training-free '
        'Laplacian router')
    routing.add_argument('--router-file', type=Path, help='Laplacian router thresholds (JSON from --fit-router)')
    routing.add_argument(
        '--fit-router',
        type=Path,
        help='prepared set (tools/prepare_data.py output) to fit '
        'the Laplacian router on; saved as <out>/laplacian_router.json')
    knob = routing.add_mutually_exclusive_group()
    knob.add_argument('--eta', type=float, help='route by argmax_j(log p_j - eta * C_j / C_max); 0 = argmax')
    knob.add_argument(
        '--budget',
        type=float,
        help='FLOPs per patch as a fraction of the largest branch, '
        'e.g. 0.5; eta is solved per image')
    knob.add_argument(
        '--set-budget',
        type=float,
        help='FLOPs that run on the whole set (folder) as a fraction of the backbone on its whole images, e.g. '
        '0.57; one eta for all images, solved after classifying them all, so harder images get more')
    knob.add_argument(
        '--sweep',
        nargs='?',
        const=','.join(map(str, DEFAULT_SWEEP)),
        help='comma-separated budgets (default %(const)s) plus argmax; draws the PSNR-FLOPs curve')
    routing.add_argument(
        '--convention', choices=('paper', 'macs'), help='FLOPs convention of --budget '
        '(default paper)')
    routing.add_argument(
        '--compare-backbone',
        action='store_true',
        help='also run the largest branch on the whole image, in tiles with exact context (the same image; see '
        '--tile) and patch-wise, and print routed/backbone ratios (time: against the faster of whole and tiles)')
    parser.add_argument('--no-save-images', action='store_true', help='write reports only')
    parser.add_argument(
        '--save-setting',
        help='the setting whose SR images and class maps are written, e.g. '
        'budget=0.50 (default: the first, argmax or the one --eta/--budget names)')
    return parser


def _pick(flag: Any, option: Any, default: Any) -> Any:
    if flag is not None:
        return flag
    return default if option is None else option


def _dataset_specs(opt: dict, source: str) -> list[DatasetSpec]:
    specs = []
    for phase, data in (opt.get('datasets') or {}).items():
        key = f'{source}: datasets.{phase}'
        if not isinstance(data, dict):
            raise ValueError(f'{key} must be a mapping with dataroot_lq (and dataroot_gt)')
        backend = (data.get('io_backend') or {}).get('type', 'disk')
        if backend != 'disk':
            raise ValueError(f'{key}.io_backend is {backend!r}: the tester reads image folders (io_backend: '
                             '{type: disk}); make folders with tools/make_test_sets.py')
        if not data.get('dataroot_lq'):
            raise ValueError(f'{key} has no dataroot_lq (the folder of LR images)')
        gt = data.get('dataroot_gt')
        _check_folder(Path(data['dataroot_lq']).expanduser(), f'{key}.dataroot_lq')
        if gt:
            _check_folder(Path(gt).expanduser(), f'{key}.dataroot_gt')
        specs.append(
            DatasetSpec(
                str(data.get('name', phase)),
                Path(data['dataroot_lq']).expanduser(),
                Path(gt).expanduser() if gt else None, data.get('filename_tmpl', '{}')))
    if not specs:
        raise ValueError(f'{source} has no datasets: add datasets.test_1 with dataroot_lq (and dataroot_gt)')
    return specs


def _check_folder(path: Path, key: str) -> None:
    if not path.is_dir():
        raise FileNotFoundError(f'{key}: {path} is not a folder of images; check the path')


def network_options(path: Path) -> dict:
    """``network_g`` of an option file; a clear error if there is none."""
    if not path.is_file():
        raise FileNotFoundError(f'network option file {path} does not exist')
    opt = load_yaml(str(path))
    if not isinstance(opt, dict) or not isinstance(opt.get('network_g'), dict):
        raise ValueError(f'{path} has no network_g section; pass an option file such as '
                         'options/networks/CDNSR_FSRCNN_x4.yml with --network')
    return dict(opt['network_g'])


def find_experiment_options(checkpoint: Path) -> Path:
    """The option file BasicSR copied into ``experiments/<name>/`` for a checkpoint in ``models/``."""
    folder = checkpoint.resolve().parent
    candidates = sorted(folder.parent.glob('*.yml')) if folder.name == 'models' else []
    for candidate in candidates:
        opt = load_yaml(str(candidate))
        if isinstance(opt, dict) and isinstance(opt.get('network_g'), dict):
            return candidate
    raise FileNotFoundError(f'cannot tell the network of {checkpoint}: it is not in a BasicSR experiment folder '
                            'with its option file; pass --network options/networks/CDNSR_<backbone>_x4.yml (or the '
                            'training option file)')


def _settings(args: argparse.Namespace, val: dict, router: str) -> list[Setting]:
    eta = _pick(args.eta, val.get('eta'), None)
    budget = _pick(args.budget, val.get('budget'), None)
    set_budget = _pick(getattr(args, 'set_budget', None), val.get('set_budget'), None)
    sweep = _pick(args.sweep, val.get('sweep'), None)
    if sum(v is not None for v in (eta, budget, set_budget, sweep)) > 1:
        raise ValueError('choose one of eta, budget, set_budget and sweep (flags or val keys)')
    if router == 'laplacian':
        if any(v is not None for v in (eta, budget, set_budget, sweep)):
            raise ValueError('--eta/--budget/--set-budget/--sweep trade the learned classifier\'s probabilities '
                             'against cost; the Laplacian router has none: drop them or use --router classifier')
        settings = [Setting('laplacian')]
    elif sweep is not None:
        budgets = _parse_budgets(sweep)
        settings = [Setting('argmax', eta=0.0)] + [Setting(f'budget={b:.2f}', budget=b) for b in budgets]
    elif budget is not None:
        if not 0 < float(budget) <= 1.5:
            raise ValueError(f'budget must be a fraction of the largest branch\'s cost such as 0.5, got {budget}')
        settings = [Setting(f'budget={float(budget):.2f}', budget=float(budget))]
    elif set_budget is not None:
        if isinstance(set_budget, bool) or not isinstance(set_budget, (int, float)) or not 0 < set_budget <= 1.5:
            raise ValueError('set_budget must be a fraction in (0, 1.5] of the backbone\'s FLOPs on the whole images, '
                             f'such as 0.57; got {set_budget!r}')
        settings = [Setting(f'set-budget={float(set_budget):g}', set_budget=float(set_budget))]
    elif eta is not None:
        if not math.isfinite(float(eta)):
            raise ValueError(f'eta must be a finite number (0 = the classifier\'s argmax), got {eta}')
        settings = [Setting(f'eta={float(eta):g}', eta=float(eta))]
    else:
        settings = [Setting('argmax', eta=0.0)]
    names = [setting.name for setting in settings]
    if len(set(names)) != len(names):
        raise ValueError(f'sweep budgets must differ at two decimals, got {names}')
    if args.compare_backbone or val.get('compare_backbone'):
        settings += [
            Setting('backbone full image', 'backbone-full'),
            Setting('backbone tiled', 'backbone-tiled'),
            Setting('backbone patch-wise', 'backbone-patch')
        ]
    return settings


def _check_save_setting(name: Optional[str], settings: list[Setting]) -> str:
    names = [setting.name for setting in settings]
    if name is None:
        return names[0]
    if name not in names:
        raise ValueError(f'--save-setting {name!r} is not among this run\'s settings {names}')
    return name


def _parse_budgets(text: Any) -> list[float]:
    values = text if isinstance(text, (list, tuple)) else str(text).split(',')
    try:
        budgets = [float(v) for v in values if str(v).strip()]
    except ValueError as exc:
        raise ValueError(f'sweep must be comma-separated budgets such as 0.3,0.5,0.7, got {text!r}') from exc
    if not budgets or any(not 0 < b <= 1.5 for b in budgets):
        raise ValueError(f'sweep budgets must be fractions in (0, 1.5], got {text!r}')
    return budgets


def _from_option_file(args: argparse.Namespace) -> dict[str, Any]:
    """What a BasicSR test option file (``-opt``) says, with flags taking precedence."""
    opt = load_yaml(args.opt)
    if not isinstance(opt, dict):
        raise ValueError(f'{args.opt} is not a mapping of options')
    network = dict(opt.get('network_g') or {})
    if not network:
        raise ValueError(f'{args.opt} has no network_g section')
    path_opt = opt.get('path') or {}
    checkpoint = args.checkpoint or (Path(path_opt['pretrain_network_g']).expanduser()
                                     if path_opt.get('pretrain_network_g') else None)
    return {
        'datasets': _dataset_specs(opt, args.opt), 'network': network, 'checkpoint': checkpoint, 'name': args.name
        or opt.get('name') or Path(args.opt).stem, 'scale': opt.get('scale'), 'val': opt.get('val') or {},
        'param_key': path_opt.get('param_key_g'), 'strict': path_opt.get('strict_load_g', True), 'parts': {
            k: Path(v).expanduser()
            for k, v in path_opt.items() if k.startswith('pretrain_network_') and k != 'pretrain_network_g' and v
        }, 'device': args.device or ('cpu' if opt.get('num_gpu') == 0 else 'auto')
    }


def _from_flags(args: argparse.Namespace) -> dict[str, Any]:
    """Direct mode: ``--input [--gt] --checkpoint [--network]`` (or ``--onnx``: see ``_use_export``)."""
    if args.onnx is None and args.checkpoint is None and not (args.branches and args.network):
        raise ValueError('direct mode needs --checkpoint CKPT (the trained weights, e.g. '
                         'experiments/<name>/models/net_g_latest.pth), or --network NET.yml with --branches')
    if args.checkpoint is not None and not args.checkpoint.is_file():
        raise FileNotFoundError(f'--checkpoint {args.checkpoint} does not exist; pass the .pth file training '
                                'wrote (experiments/<name>/models/net_g_latest.pth)')
    if not args.input.is_file():
        _check_folder(args.input, '--input')
    if args.gt is not None:
        _check_folder(args.gt, '--gt')
    folder = args.input.resolve().parent if args.input.is_file() else args.input.resolve()
    dataset = DatasetSpec(folder.name or 'input', args.input, args.gt)
    return {
        'datasets': [dataset], 'network': {} if args.onnx is not None else network_options(
            args.network or find_experiment_options(args.checkpoint)), 'checkpoint': args.checkpoint, 'name': args.name
        or dataset.name, 'scale': args.scale, 'val': {}, 'param_key': None, 'strict': True, 'parts': {},
        'device': args.device or 'auto'
    }


def _backend(args: argparse.Namespace) -> str:
    """``--backend``, by default ``onnxruntime`` with ``--onnx`` and ``torch`` without."""
    backend = args.backend or (ONNXRUNTIME if args.onnx is not None else 'torch')
    if backend == ONNXRUNTIME and args.onnx is None:
        raise ValueError('--backend onnxruntime runs an exported network: add --onnx FOLDER (written by '
                         'tools/export_onnx.py)')
    if backend == 'torch' and args.onnx is not None:
        raise ValueError(f'--onnx {args.onnx} is run by --backend onnxruntime, not torch: drop --backend torch')
    return backend


def _use_export(args: argparse.Namespace, base: dict[str, Any]) -> dict:
    """``--backend onnxruntime``: the network comes from the export's manifest (returned), and runs on the CPU."""
    given = [
        flag for flag, value in (('--checkpoint', args.checkpoint), ('--network', args.network),
                                 ('--branches', args.branches)) if value
    ]
    if given:
        raise ValueError(f'--onnx {args.onnx} holds the network and its weights: drop {", ".join(given)}')
    manifest = read_manifest(args.onnx)
    device = base['device']
    if device == 'auto':
        device = 'cpu'
    if str(device).split(':')[0] != 'cpu':
        raise ValueError(f'--backend onnxruntime runs on the CPU (onnxruntime\'s CPU provider), not {device}: drop '
                         '--device (and num_gpu in the option file), or run --backend torch on the GPU')
    base.update(network=dict(manifest['network_g']), checkpoint=None, parts={}, device=device)
    return manifest


def _engine_options(args: argparse.Namespace, val: dict) -> EngineOptions:
    """The ``val`` keys as validation reads them (``EngineOptions.from_val``), then the flags over them."""
    flags = {
        'patch': args.patch, 'stride': args.stride, 'max_batch': args.max_batch, 'precision': args.precision,
        'tiling': args.tiling, 'halo': args.halo, 'tile': args.tile
    }
    options = dataclasses.replace(EngineOptions.from_val(val), **{k: v for k, v in flags.items() if v is not None})
    return dataclasses.replace(options, channels_last=False) if args.no_channels_last else options


def from_args(argv: Optional[list[str]] = None) -> TestConfig:
    """Parse the command line (and the option file it names) into a validated ``TestConfig``."""
    args = build_parser().parse_args(argv)
    if bool(args.opt) == bool(args.input):
        raise ValueError('give either -opt TEST_OPTIONS.yml or --input LR_DIR (direct mode), not both or neither')
    backend = _backend(args)
    base = _from_option_file(args) if args.opt else _from_flags(args)
    manifest = _use_export(args, base) if backend == ONNXRUNTIME else None
    datasets, network, checkpoint, name = base['datasets'], base['network'], base['checkpoint'], base['name']
    scale, val, param_key, strict, parts, device = (
        base[k] for k in ('scale', 'val', 'param_key', 'strict', 'parts', 'device'))
    if args.scale is not None:
        scale = args.scale
    if args.branches:
        parts.update({
            f'pretrain_network_branch{i}': Path(p.strip()).expanduser()
            for i, p in enumerate(args.branches.split(','))
        })
    router = _pick(args.router, val.get('router'), 'classifier')
    if router not in ROUTERS:
        raise ValueError(f'router must be one of {ROUTERS}, got {router!r}')
    router_file = args.router_file or (Path(val['router_file']) if val.get('router_file') else None)
    if router == 'classifier' and (router_file or args.fit_router):
        raise ValueError('--router-file / --fit-router (val.router_file) set the Laplacian router; add --router '
                         'laplacian or drop them')
    convention = _pick(args.convention, val.get('convention'), 'paper')
    if convention not in ('paper', 'macs'):
        raise ValueError(f"val.convention / --convention must be 'paper' or 'macs', got {convention!r}")
    if router == 'laplacian' and not (router_file or args.fit_router):
        raise ValueError('the Laplacian router needs thresholds: --router-file FILE.json, or --fit-router '
                         'PREPARED_SET (the tools/prepare_data.py output with labels.txt)')
    weights = manifest is not None or checkpoint is not None  # an export holds its weights
    if not weights and not parts:
        raise ValueError('no weights: set path.pretrain_network_g in the option file or pass --checkpoint CKPT')
    if not weights and router == 'classifier' and 'pretrain_network_classifier' not in parts:
        raise ValueError('routing by the learned classifier needs its weights: --checkpoint CKPT (or '
                         'path.pretrain_network_classifier); without a trained classifier use --router laplacian')
    if args.threads is not None and args.threads < 1:
        raise ValueError(f'--threads must be a positive number of CPU threads, got {args.threads}; omit it for '
                         'torch\'s choice')
    settings = _settings(args, val, router)
    engine = _engine_options(args, val)
    if manifest is not None:  # the export's patch and stride unless a flag or val key sets them
        exported = {
            k: manifest['engine'][k]
            for k in ('patch', 'stride') if getattr(args, k) is None and val.get(k) is None
        }
        engine = dataclasses.replace(engine, **exported)
        if engine.patch != manifest['engine']['patch']:
            raise ValueError(f"--patch {engine.patch}: the export at {args.onnx} measured its per-tile costs at patch "
                             f"{manifest['engine']['patch']}; drop --patch (val.patch) or export again with "
                             f'--patch {engine.patch}')
    return TestConfig(
        name=str(name),
        out=args.out or Path('results') / str(name),
        scale=scale,
        network=network,
        checkpoint=checkpoint,
        datasets=datasets,
        parts=parts,
        param_key=param_key,
        strict=bool(strict),
        engine=engine,
        device=device,
        threads=args.threads,
        router=router,
        router_file=router_file,
        fit_router=args.fit_router,
        settings=settings,
        compare_backbone=bool(args.compare_backbone or val.get('compare_backbone')),
        convention=convention,
        save_images=not args.no_save_images and val.get('save_img', True) is not False,
        overwrite=bool(args.overwrite),
        save_setting=_check_save_setting(args.save_setting, settings),
        backend=backend,
        onnx=args.onnx)
