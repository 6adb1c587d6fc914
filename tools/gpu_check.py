"""The device check of issue 26: everything a lent GPU should confirm, in one run of under 8 minutes, one table.

    bash tools/gpu_check.sh --json gpu_check.json       # on one CUDA GPU, from the repository root
    bash tools/gpu_check.sh --dry-run                    # anywhere, on the CPU: tiny sizes, the same code paths
    python tools/gpu_check.py --only backbones,memory-8k --networks RCAN   # a part of it

Sections, in this order; each is timed, and each of its items is one row of the table printed at the end (``--json``
also writes the rows as data). Every timing is ``cdnsr_plugin.utils.timing.measure`` (CUDA synchronised before
and after the block), the median of a few runs after a warm-up, through ``tools/benchmark.py``'s own functions
(``bench_image``, ``timed``, ``labels_for``). The networks are the option files ``options/networks/CDNSR_<name>_x4.yml``
with random weights (seeded): weights do not change timings. Routing is forced to 60/25/15 % of the tiles by
Laplacian rank (``--mix`` of ``tools/benchmark.py``), so speed does not depend on a trained classifier; the
classifier still runs. The input is scikit-image's ``astronaut`` photo resized to the LR size.

1. ``cuda-tests``: ``pytest tests/integration/test_gpu_check.py -k test_cuda_`` with ``CDNSR_CHECK_DEVICE=cuda``: the
   routed engine on the GPU against the CPU (both tilings), batched against per-patch, the tiled backbone against
   the whole image, fp16 and bf16 against fp32, and the CUDA peak-memory clock. The project has no other
   CUDA-only test (``grep -rn cuda tests``, 2026-12-07). Passes when pytest passes and, on CUDA, nothing skipped.
2. ``backbones``: for FSRCNN, CARN, SRResNet and RCAN (x4, branches as in the option files) at fp32 and fp16
   (``EngineOptions.precision``): the routed engine (classifier + regions), the backbone (largest branch) on the
   whole image, in tiles with its receptive radius of context (``backbone_tiled``, tile side by the measured rule)
   and patch-wise on the papers' 32/28 tiles; the FLOPs ratio routed / whole image (executed FLOPs, paper
   convention and MACs). LR 540x960 (a 4K output), median of 5 runs. RCAN's default halo (16 px) makes the regions
   process about 2.2x the image's pixels at this mix, so its routed FLOPs exceed the whole image's (1.2x; computed
   on the CPU from the plan, the same from 48x64 to 1080x1920 LR): the row shows it, the check does not fail on it.
3. ``batching``: the papers' tiling (ClassSR's protocol, 32/28 tiles, overlaps averaged), same labels: the engine's
   batched grouping (one pass per branch per ``max_batch`` tiles; 128 on CUDA) against ClassSR's tester, one tile
   per forward pass (``render_loop``). Fails if the two outputs differ by more than 1e-3 of the output's range
   (compared with TF32 off). fp32, LR 256x256 (81 tiles), median of 3 runs.
4. ``memory-8k``: an 8K output (LR 1080x1920 -> 7680x4320): peak ``torch.cuda.max_memory_allocated`` and time of the
   routed engine (classify + render, regions), the backbone on the whole image and the tiled backbone; fp32 and
   fp16; median of 3 runs, no warm-up (the first run includes kernel selection). On the CPU the peak is the
   process's resident set (``measure``).
5. ``training``: ``options/train_CDNSR_RCAN.yml`` for 200 iterations through BasicSR's own ``basicsr/train.py``
   (the installed file, copied into ``<work>/basicsr/`` as ``tests/integration/test_stage_batches.py`` does, and
   run through the plugin's start-up hook), on a prepared set made by the plugin's data preparation from five
   bundled photos (``cdnsr_plugin.demo.TRAIN_PHOTOS``, at most 480 px a side; ``coffee`` is the validation image).
   A copy of the file is edited: the datasets (paths, ``dataset_enlarge_ratio`` so that one epoch holds the 200
   iterations of batch 64: 72 for the 178 sub-images; the file's batch 64 and ``gt_size`` kept), the schedule (its
   stages' lengths rescaled to sum to 200: 100/40/20/40), logging (every 10 iterations, validation and checkpoint
   at the end, no tensorboard); the network and the stages (routing, losses, tau) are unchanged. Without
   ``experiments/pretrained_models/vgg19-dcbb9e9d.pth`` in the repository (``--vgg-weights``), the contrastive
   loss runs with ``random_weights: true`` (the row says so): its cost is the same. Reports iterations per second
   (from the log's timestamps after iteration 20) and that every stage ran to the last iteration.

Time budget: estimates for one H100 (not yet measured: no GPU was lent when this was written), from each backbone's
MACs per LR pixel (FSRCNN 25k, CARN 0.57M, SRResNet 2.6M, RCAN 16M), about 50 TMAC/s at fp32 (cuDNN's TF32
convolutions, PyTorch's default) and 100 at fp16, and about 5 us per kernel launch, which bounds the small networks,
RCAN's many small passes (about 2,000 kernels each) and the per-patch loop:

* cuda-tests, 30 s: pytest's start-up; 8 tests on small FSRCNN networks.
* backbones, 90 s: per network, FLOPs counted with ptflops (on the GPU here; ``bench_image`` counts the backbone
  again on the CPU, a few seconds for RCAN), each engine's receptive radius (float64) and tile side; then about 30
  timed passes per network and precision: RCAN 8.3 TMAC per whole-image pass (0.2 s at fp32), its routed run
  launch-bound (regions of many shapes).
* batching, 15 s: RCAN's per-patch loop, 81 passes of 2,000 kernels, 4 times.
* memory-8k, 60 s: RCAN 33 TMAC per whole-image pass (0.7 s at fp32, about 20 GB), about 500 regions per routed run;
  3 runs x 3 modes x 2 precisions per network.
* training, 100 s: data preparation (5 s), start-up (20 s), 200 iterations at 0.15-0.3 s (RCAN forward and
  backward at batch 64 are launch-bound: about 6,000 kernels a branch), the final validation.

About 5 minutes in all. ``--max-minutes`` (default 8) guards the lease: once it is spent, every remaining item is a
``BUDGET`` row (not run), and the training subprocess is stopped at the limit. Each row's wall time is printed, so the
first GPU run replaces these estimates.

``--dry-run``: the CPU (``CUDA_VISIBLE_DEVICES`` emptied), every section through the same code, sizes cut: LR 48x64
for sections 2-4 (``memory-8k`` becomes a 64x96 input), one run each, the CUDA tests on the CPU
(``CDNSR_CHECK_DEVICE=cpu``: the fp16/bf16 tests skip), training for 4 iterations (one per stage) at batch 2 with
``gt_size`` 64 on three photos of at most 200 px; fp16 rows read ``SKIP`` (fp16 runs on CUDA only). The dry-run's
networks keep their types and widths but are made shallow (MSRResNet 2 blocks, RCAN 1 group of 2 blocks, in sections
2-5; FSRCNN and CARN as they are), or the full RCAN's measurements alone would take many minutes on a 2-core CPU;
the tiled backbone's side is measured for FSRCNN only (64 for the others: measuring takes 20-35 s a network
there). ``tests/integration/test_gpu_check.py`` runs it (about 2-3 minutes on the project's 2-core machine).

Table: ``section | item | status | wall s | result``; a section's own line gives its wall time (set-up included).
Status: ``PASS``; ``FAIL`` (the result is the error's one line; the traceback goes to stderr and into the JSON);
``SKIP`` (not applicable here, or not selected with ``--only``/``--networks``); ``BUDGET`` (not run: the
``--max-minutes`` budget was spent). Exit status 0 when no row is ``FAIL`` or ``BUDGET``, else 1.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the source tree, also where the plugin is not installed (the tools/ folder is [0])
    sys.path.insert(1, str(REPO))

import cv2  # noqa: E402
import torch  # noqa: E402

SECTIONS = ('cuda-tests', 'backbones', 'batching', 'memory-8k', 'training')
NETWORKS = ('FSRCNN', 'CARN', 'SRResNet', 'RCAN')
PRECISIONS = ('fp32', 'fp16')
MIX = '0.6,0.25,0.15'  # forced class shares (tools/benchmark.py --mix)
PHOTO = 'astronaut'
TRAIN_OPTIONS = REPO / 'options' / 'train_CDNSR_RCAN.yml'
VGG19 = REPO / 'experiments' / 'pretrained_models' / 'vgg19-dcbb9e9d.pth'
CUDA_TESTS = 'tests/integration/test_gpu_check.py'
DEVICE_ENV = 'CDNSR_CHECK_DEVICE'  # read by the CUDA tests
# the dry-run's shallow networks: same types and widths, fewer blocks
DRY_DEPTH = {'MSRResNet': {'num_block': 2}, 'RCAN': {'num_group': 1, 'num_block': 2}}
# BasicSR's stock train.py, run with the plugin's start-up hook loaded (as the installed .pth file does); argv[1:]
LAUNCHER = ('import runpy, sys; import _cdnsr_plugin_autoload; sys.argv = sys.argv[1:]; '
            'runpy.run_path(sys.argv[0], run_name="__main__")')


@dataclasses.dataclass(frozen=True)
class Settings:
    """Sizes and repeats of one mode (see the module docstring)."""

    lr_size: tuple[int, int]  # backbones
    runs: int
    loop_size: tuple[int, int]  # batching
    loop_runs: int
    memory_size: tuple[int, int]  # memory-8k
    memory_runs: int
    train_iters: int
    train_batch: Optional[int]  # None: the option file's
    train_gt_size: Optional[int]  # None: the option file's
    train_photos: int
    train_side: int  # training photos shrunk to at most this many pixels a side
    train_workers: Optional[int]  # None: the option file's
    print_freq: int
    warmup_iters: int  # iterations left out of the it/s figure
    shallow: bool  # DRY_DEPTH
    tiles: dict  # network -> tile side of the tiled backbone; absent: the measured rule (tiled.choose_tile)
    max_minutes: float


GPU = Settings(
    lr_size=(540, 960),
    runs=5,
    loop_size=(256, 256),
    loop_runs=3,
    memory_size=(1080, 1920),
    memory_runs=3,
    train_iters=200,
    train_batch=None,
    train_gt_size=None,
    train_photos=5,
    train_side=480,
    train_workers=None,
    print_freq=10,
    warmup_iters=20,
    shallow=False,
    tiles={},
    max_minutes=8.0)
DRY = Settings(
    lr_size=(48, 64),
    runs=1,
    loop_size=(48, 64),
    loop_runs=1,
    memory_size=(64, 96),
    memory_runs=1,
    train_iters=4,
    train_batch=2,
    train_gt_size=64,
    train_photos=3,
    train_side=200,
    train_workers=0,
    print_freq=1,
    warmup_iters=1,
    shallow=True,
    tiles={'CARN': 64, 'SRResNet': 64, 'RCAN': 64},
    max_minutes=15.0)


class NotApplicable(Exception):
    """An item that does not apply here (a ``SKIP`` row, not a failure)."""


@dataclasses.dataclass
class Row:
    section: str
    item: str
    status: str  # PASS, FAIL, SKIP, BUDGET
    seconds: float
    result: str
    data: dict = dataclasses.field(default_factory=dict)


def one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    message = f'{type(error).__name__}: {text[0]}' if text else type(error).__name__
    return message if len(message) <= 200 else message[:197] + '...'


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--dry-run', action='store_true', help='CPU, tiny sizes, the same code paths')
    parser.add_argument('--json', type=Path, help='also write the rows here')
    parser.add_argument('--max-minutes', type=float, help='budget; default 8 (15 with --dry-run)')
    parser.add_argument('--only', help=f'comma-separated sections (default all): {",".join(SECTIONS)}')
    parser.add_argument('--networks', default=','.join(NETWORKS), help='comma-separated (default all four)')
    parser.add_argument(
        '--train-options', type=Path, default=TRAIN_OPTIONS, help='default options/train_CDNSR_RCAN.yml')
    parser.add_argument('--vgg-weights', type=Path, default=VGG19, help='VGG-19 weights of the contrastive loss')
    parser.add_argument('--work', type=Path, help='working folder (default: a temporary one, removed at the end)')
    args = parser.parse_args(argv)
    args.sections = SECTIONS if not args.only else tuple(s.strip() for s in args.only.split(','))
    args.network_names = tuple(n.strip() for n in args.networks.split(','))
    for value, known, what in ((args.sections, SECTIONS, 'section'), (args.network_names, NETWORKS, 'network')):
        unknown = sorted(set(value) - set(known))
        if unknown:
            parser.error(f'unknown {what}(s) {unknown}; choose from {list(known)}')
    return args


def stage_lengths(lengths: list[int], total: int) -> list[int]:
    """``lengths`` rescaled to sum to ``total`` (largest remainders; every stage at least one iteration)."""
    if total < len(lengths):
        raise ValueError(f'{total} iterations cannot cover {len(lengths)} stages')
    exact = [total * n / sum(lengths) for n in lengths]
    counts = [max(1, math.floor(v)) for v in exact]
    while sum(counts) < total:
        counts[max(range(len(counts)), key=lambda i: exact[i] - counts[i])] += 1
    while sum(counts) > total:
        counts[max((i for i in range(len(counts)) if counts[i] > 1), key=lambda i: counts[i] - exact[i])] -= 1
    return counts


def shallow_network(network: dict) -> dict:
    """``network_g`` with every branch made shallow (``DRY_DEPTH``); types and widths kept."""
    network = copy.deepcopy(network)
    for branch in network['branches']:
        branch.update(DRY_DEPTH.get(branch['type'], {}))
    return network


class Check:
    """Runs the sections and collects the rows."""

    def __init__(self, args: argparse.Namespace, settings: Settings, work: Path) -> None:
        self.args, self.settings, self.work = args, settings, work
        self.budget_s = 60 * (args.max_minutes if args.max_minutes is not None else settings.max_minutes)
        self.started = time.perf_counter()
        self.rows: list[Row] = []
        self.section_seconds: dict[str, float] = {}
        self.device = torch.device('cuda' if not args.dry_run and torch.cuda.is_available() else 'cpu')
        self._networks: dict[str, SimpleNamespace] = {}
        self._engines: dict[tuple, Any] = {}
        self._images: dict[tuple, torch.Tensor] = {}

    # ------------------------------------------------------------------ bookkeeping
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def left(self) -> float:
        return self.budget_s - self.elapsed()

    def item(self, section: str, name: str, fn: Callable[[], tuple[str, dict]]) -> Row:
        if self.left() <= 0:
            row = Row(
                section, name, 'BUDGET', 0.0,
                f'not run: the --max-minutes budget ({self.budget_s / 60:g} min) was spent '
                f'after {self.elapsed() / 60:.1f} min')
        else:
            began = time.perf_counter()
            try:
                result, data = fn()
                status = 'PASS'
            except NotApplicable as reason:
                result, data, status = str(reason), {}, 'SKIP'
            except Exception as error:  # noqa: BLE001  (any failure is a row; the run goes on)
                trace = traceback.format_exc()
                print(f'[gpu_check] {section} / {name} failed:\n{trace}', file=sys.stderr, flush=True)
                result, data, status = one_line(error), {'traceback': trace}, 'FAIL'
            finally:
                if self.device.type == 'cuda':
                    torch.cuda.empty_cache()
            row = Row(section, name, status, time.perf_counter() - began, result, data)
        self.rows.append(row)
        print(
            f'[gpu_check] {row.section} / {row.item}: {row.status} ({row.seconds:.1f} s) {row.result}',
            file=sys.stderr,
            flush=True)
        return row

    def run(self) -> None:
        sections = {
            'cuda-tests': self.cuda_tests, 'backbones': self.backbones, 'batching': self.batching,
            'memory-8k': self.memory, 'training': self.training
        }
        for section in SECTIONS:
            began = time.perf_counter()
            if section not in self.args.sections:
                self.rows.append(Row(section, '-', 'SKIP', 0.0, 'not selected (--only)'))
            else:
                sections[section](section)
            self.section_seconds[section] = time.perf_counter() - began

    @property
    def passed(self) -> bool:
        return all(row.status in ('PASS', 'SKIP') for row in self.rows)

    # ------------------------------------------------------------------ shared pieces
    def network(self, name: str) -> SimpleNamespace:
        """The option file's network (random weights, seeded; shallow on --dry-run), its cost table and its
        branches' whole-image cost coefficients (measured once and carried by the network: every engine reuses
        them), built once."""
        if name not in self._networks:
            from basicsr.archs import build_network

            from cdnsr_plugin.inference.costs import cost_table, full_image_coefficients
            from cdnsr_plugin.tester.config import network_options
            options = network_options(REPO / 'options' / 'networks' / f'CDNSR_{name}_x4.yml')
            if self.settings.shallow:
                options = shallow_network(options)
            torch.manual_seed(0)
            net = build_network(options).eval()
            probe = copy.deepcopy(net).to(self.device)  # ptflops runs the network: on the GPU, for RCAN's sake
            net.cost_coefficients = [full_image_coefficients(branch, 32) for branch in probe.branches]
            self._networks[name] = SimpleNamespace(net=net, table=cost_table(probe, patch=32), options=options)
            del probe
        return self._networks[name]

    def engine(self, name: str, precision: str, tiling: str):
        """One ``RoutedEngine`` per network, precision and tiling (its halo and tile side are measured once)."""
        from cdnsr_plugin.inference.engine import EngineOptions, RoutedEngine
        key = (name, precision, tiling)
        if key not in self._engines:
            options = EngineOptions(precision=precision, tiling=tiling, tile=self.settings.tiles.get(name))
            self._engines[key] = RoutedEngine(self.network(name).net, options, self.device)
        return self._engines[key]

    def image(self, size: tuple[int, int]) -> torch.Tensor:
        """The bundled photo resized to the LR ``size`` (through ``tools/benchmark.py``'s loader), on the device."""
        if size not in self._images:
            import benchmark
            folder = self.work / 'photo'
            if not folder.is_dir():
                from cdnsr_plugin.demo import bundled_photos
                folder.mkdir(parents=True)
                cv2.imwrite(str(folder / f'{PHOTO}.png'), bundled_photos()[PHOTO])
            self._images[size] = benchmark.load_inputs(folder, 1, size)[0][1].to(self.device)
        return self._images[size]

    def precision_applies(self, precision: str) -> None:
        if precision != 'fp32' and self.device.type != 'cuda':
            raise NotApplicable(f'skipped: CPU ({precision} runs on CUDA only)')

    def selected_networks(self, section: str) -> list[str]:
        for name in NETWORKS:
            if name not in self.args.network_names:
                self.rows.append(Row(section, name, 'SKIP', 0.0, 'not selected (--networks)'))
        return [name for name in NETWORKS if name in self.args.network_names]

    # ------------------------------------------------------------------ 1. the CUDA tests
    def cuda_tests(self, section: str) -> None:

        def run() -> tuple[str, dict]:
            device = self.device.type
            env = {**os.environ, DEVICE_ENV: device, 'PYTHONPATH': pythonpath()}
            command = [
                sys.executable, '-m', 'pytest', '-q', '-rs', '-p', 'no:cacheprovider', CUDA_TESTS, '-k', 'test_cuda_'
            ]
            result = subprocess.run(
                command, cwd=REPO, env=env, capture_output=True, text=True, timeout=max(30.0, self.left()))
            counts = {kind: int(n) for n, kind in re.findall(r'(\d+) (passed|failed|skipped|errors?)', result.stdout)}
            data = {'device': device, 'returncode': result.returncode, 'counts': counts, 'command': ' '.join(command)}
            summary = ', '.join(f'{n} {kind}' for kind, n in counts.items()) or 'no summary'
            if result.returncode != 0:
                data['output'] = result.stdout[-4000:] + result.stderr[-2000:]
                failed = re.findall(r'^(?:FAILED|ERROR) (\S+)', result.stdout, re.M)
                raise RuntimeError(f'pytest exit {result.returncode}: {summary}; {" ".join(failed)[:120]}')
            if not counts.get('passed'):
                raise RuntimeError(f'no CUDA test ran: {summary}')
            if device == 'cuda' and counts.get('skipped'):
                raise RuntimeError(f'{summary}: nothing may skip on CUDA ({result.stdout.count("SKIPPED")} skipped)')
            note = '' if device == 'cuda' else ' (dry-run: on the CPU; fp16/bf16 tests need CUDA)'
            return f'{summary} on {device}{note}', data

        self.item(section, 'pytest -k test_cuda_', run)

    # ------------------------------------------------------------------ 2. routed vs whole vs tiled backbone
    def backbones(self, section: str) -> None:
        import benchmark
        size, runs = self.settings.lr_size, self.settings.runs
        for name in self.selected_networks(section):
            for precision in PRECISIONS:

                def run(name=name, precision=precision) -> tuple[str, dict]:
                    self.precision_applies(precision)
                    engine = self.engine(name, precision, 'regions')
                    paper = self.engine(name, precision, 'paper')
                    args = SimpleNamespace(mix=MIX, runs=runs, skip_full=False, loop=False, max_batch_sweep=None)
                    row = benchmark.bench_image(engine, paper,
                                                self.network(name).table, engine.coefficients, self.image(size), args)
                    ratio = row['flops_ratio_full']
                    text = (f"ms: routed {1e3 * row['routed_s']:.1f}, whole {1e3 * row['full_s']:.1f}, tiled "
                            f"{1e3 * row['tiled_s']:.1f} (tile {row['tile']['tile']}), patch-wise "
                            f"{1e3 * row['patch_s']:.1f}; routed/fastest {row['time_ratio_fastest']:.2f}; FLOPs "
                            f"routed/whole {ratio['paper']:.2f} (MACs {ratio['macs']:.2f}; regions process "
                            f"{row['pixel_ratio']:.2f}x the pixels, halo {engine.halo})")
                    return text, {
                        'precision': precision, 'lr_size': list(size), 'runs': runs, 'halo': engine.halo, **row
                    }

                self.item(section, f'{name} {precision}', run)

    # ------------------------------------------------------------------ 3. batched vs per-patch
    def batching(self, section: str) -> None:
        import benchmark
        size = self.settings.loop_size
        for name in self.selected_networks(section):

            def run(name=name) -> tuple[str, dict]:
                paper = self.engine(name, 'fp32', 'paper')
                lr = self.image(size)
                grid = paper.grid(lr)
                labels = benchmark.labels_for(paper, lr, [float(v) for v in MIX.split(',')])
                with exact_fp32():  # also the warm-up of both
                    batched = paper.render(lr, labels, grid)
                    loop = paper.render_loop(lr, labels, grid)
                difference = float((batched - loop).abs().max() / batched.abs().max().clamp_min(1e-12))
                batched_s, _ = benchmark.timed(lambda: paper.render(lr, labels, grid), self.settings.runs, paper.device)
                loop_s, _ = benchmark.timed(lambda: paper.render_loop(lr, labels, grid), self.settings.loop_runs,
                                            paper.device)
                data = {
                    'lr_size': list(size), 'tiles': len(grid), 'max_batch': paper.max_batch, 'batched_s': batched_s,
                    'loop_s': loop_s, 'loop_over_batched': loop_s / batched_s, 'relative_difference': difference
                }
                if difference > 1e-3:
                    raise AssertionError(f'batched and per-patch outputs differ by {difference:.1e} of the range')
                return (f'{len(grid)} tiles, max_batch {paper.max_batch}: batched {1e3 * batched_s:.1f} ms, '
                        f'per-patch {1e3 * loop_s:.1f} ms ({loop_s / batched_s:.1f}x); outputs within '
                        f'{difference:.0e}'), data

            self.item(section, f'{name} fp32', run)

    # ------------------------------------------------------------------ 4. peak memory at 8K
    def memory(self, section: str) -> None:
        import benchmark
        size, runs = self.settings.memory_size, self.settings.memory_runs
        kind = 'CUDA allocated' if self.device.type == 'cuda' else 'process RSS'
        for name in self.selected_networks(section):
            for precision in PRECISIONS:

                def run(name=name, precision=precision) -> tuple[str, dict]:
                    self.precision_applies(precision)
                    engine = self.engine(name, precision, 'regions')
                    lr = self.image(size)
                    grid = engine.grid(lr)
                    labels = benchmark.labels_for(engine, lr, [float(v) for v in MIX.split(',')])

                    def routed() -> None:  # as tools/benchmark.py times it: classify every cell, then render
                        engine.classify(lr, grid)
                        engine.render(lr, labels, grid)

                    runs_of = {
                        'routed': routed, 'whole': lambda: engine.backbone_full(lr),
                        'tiled': lambda: engine.backbone_tiled(lr)
                    }
                    data = {'precision': precision, 'lr_size': list(size), 'runs': runs, 'memory': kind}
                    if self.device.type == 'cuda':  # what was held before (the networks' weights, the input)
                        torch.cuda.empty_cache()
                        data['baseline_mb'] = torch.cuda.memory_allocated(engine.device) / 2**20
                    for what, fn in runs_of.items():
                        if self.device.type == 'cuda':
                            torch.cuda.empty_cache()
                        data[f'{what}_s'], data[f'{what}_peak_mb'] = benchmark.timed(fn, runs, engine.device)
                    sr_size = f'{size[0] * engine.scale}x{size[1] * engine.scale}'
                    text = f'{sr_size}, peak MB ({kind}) / s: ' + ', '.join(
                        f"{what} {data[f'{what}_peak_mb']:.0f} / {data[f'{what}_s']:.2f}" for what in runs_of)
                    if 'baseline_mb' in data:
                        text += f"; {data['baseline_mb']:.0f} MB held before"
                    return text, data

                self.item(section, f'{name} {precision}', run)

    # ------------------------------------------------------------------ 5. training through basicsr/train.py
    def training(self, section: str) -> None:
        state: dict[str, Any] = {}

        def prepare_data() -> tuple[str, dict]:
            state.update(prepare_training_data(self.work / 'training', self.settings))
            return (f"{state['pairs']} sub-image pairs from {self.settings.train_photos} photos (at most "
                    f"{self.settings.train_side} px), validation on {state['val_name']}"), dict(
                        state, pairs=state['pairs'])

        def train() -> tuple[str, dict]:
            if 'train_set' not in state:
                raise RuntimeError('no training data (the row above failed)')
            return run_training(self.work / 'training', self.args, self.settings, state, self.left(), self.device)

        self.item(section, 'prepare data', prepare_data)
        self.item(section, f'{self.args.train_options.name} x{self.settings.train_iters}', train)


# ---------------------------------------------------------------------- helpers of the sections
class exact_fp32:
    """TF32 off for CUDA convolutions and matrix products inside the block (comparisons), restored after."""

    def __enter__(self) -> None:
        self.saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False

    def __exit__(self, *exc) -> None:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = self.saved


def pythonpath() -> str:
    """The source tree first (as ``PYTHONPATH=.``), then what was there."""
    return os.pathsep.join([str(REPO)] + [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p])


def prepare_training_data(root: Path, settings: Settings) -> dict:
    """A prepared (difficulty-labelled LMDB) set from bundled photos, by the plugin's preparation, and the held-out
    photo as a validation pair."""
    from cdnsr_plugin.demo import HELD_OUT, TRAIN_PHOTOS, bundled_photos, shrink
    from cdnsr_plugin.preparation.prepare import PrepareOptions, build_reference, prepare
    from cdnsr_plugin.utils.io import write_bicubic_pair, write_image
    photos = bundled_photos()
    folder, hr_dir, lr_dir = root / 'photos', root / 'val' / 'HR', root / 'val' / 'LR_bicubic' / 'X4'
    folder.mkdir(parents=True)
    for name in TRAIN_PHOTOS[:settings.train_photos]:
        write_image(folder / f'{name}.png', shrink(photos[name], settings.train_side))
    write_bicubic_pair(shrink(photos[HELD_OUT], settings.train_side), HELD_OUT, hr_dir, lr_dir, 4)
    summary = prepare(
        PrepareOptions(input=str(folder), output=str(root / 'train_x4'), workers=0),
        build_reference(4, 'cpu', bicubic=True))
    return {
        'train_set': str(root / 'train_x4'), 'hr_dir': str(hr_dir), 'lr_dir': str(lr_dir), 'val_name': HELD_OUT,
        'pairs': summary['num_pairs']
    }


def training_options(source: Path, settings: Settings, state: dict, vgg_weights: Path) -> tuple[dict, dict]:
    """A copy of ``source`` pointed at the prepared set, its stages rescaled to ``settings.train_iters``; and what
    was changed beyond data and schedule."""
    from cdnsr_plugin.data.prepared_set import GT_LMDB, LQ_LMDB
    from cdnsr_plugin.utils.options import load_options, set_data, set_logging, set_schedule
    opt = load_options(source)
    opt['name'] = f"gpu_check_{opt.get('name', source.stem)}"
    train_set = Path(state['train_set'])
    set_data(
        opt,
        train=(train_set / LQ_LMDB, train_set / GT_LMDB),
        val=(state['lr_dir'], state['hr_dir']),
        batch=settings.train_batch)
    dataset = opt['datasets']['train']
    if settings.train_gt_size is not None:
        dataset['gt_size'] = settings.train_gt_size
    if settings.train_workers is not None:
        dataset['num_worker_per_gpu'] = settings.train_workers
    # one epoch holds every iteration: no loader (and its workers) restarted every few iterations on a small set
    dataset['dataset_enlarge_ratio'] = max(
        int(dataset.get('dataset_enlarge_ratio') or 1),
        math.ceil(settings.train_iters * dataset['batch_size_per_gpu'] / state['pairs']))
    stages = opt['train'].get('stages') or []
    lengths = stage_lengths([s['iters'] for s in stages], settings.train_iters) if stages else settings.train_iters
    total = set_schedule(opt, lengths)
    set_logging(opt, print_freq=settings.print_freq, checkpoint_freq=total, val_freq=total, tensorboard=False)
    changed = {}
    if settings.shallow:
        opt['network_g'] = shallow_network(opt['network_g'])
        changed['network_g'] = f'shallow for the dry-run: {DRY_DEPTH}'
    for name, loss in (opt['train'].get('losses') or {}).items():
        if loss.get('type') == 'ContrastiveKDLoss':
            if vgg_weights.is_file():
                loss['vgg_weights'] = str(vgg_weights.resolve())
            else:
                loss['random_weights'] = True
                changed[f'losses.{name}'] = f'random_weights: true ({vgg_weights} not found)'
    return opt, changed


def run_training(root: Path, args: argparse.Namespace, settings: Settings, state: dict, left_s: float,
                 device: torch.device) -> tuple[str, dict]:
    """BasicSR's stock ``basicsr/train.py`` on a copy of the option file; its log read back."""
    import basicsr
    from benchmark_stage import seconds_per_iteration

    from cdnsr_plugin.utils.options import write_options
    opt, changed = training_options(args.train_options, settings, state, args.vgg_weights)
    total = opt['train']['total_iter']
    options = write_options(root / 'train.yml', opt)
    script = root / 'basicsr' / 'train.py'
    script.parent.mkdir(exist_ok=True)
    shutil.copy(Path(basicsr.__file__).parent / 'train.py', script)
    env = {**os.environ, 'PYTHONPATH': pythonpath(), 'CDNSR_PLUGIN_AUTOLOAD': '1', 'PYTHONUNBUFFERED': '1'}
    if device.type != 'cuda':
        env['CUDA_VISIBLE_DEVICES'] = ''
    command = [sys.executable, '-c', LAUNCHER, str(script), '-opt', str(options)]
    data: dict[str, Any] = {'total_iter': total, 'changed': changed, 'options': str(options)}
    began = time.perf_counter()
    try:
        result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=max(10.0, left_s))
    except subprocess.TimeoutExpired:
        raise RuntimeError(f'stopped after {max(10.0, left_s):.0f} s (the --max-minutes budget)') from None
    data['seconds'] = time.perf_counter() - began
    (root / 'train_stdout.log').write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        lines = [line.strip() for line in result.stderr.splitlines() if line.strip()]
        data['output'] = result.stderr[-4000:]
        raise RuntimeError(f"basicsr/train.py exited with status {result.returncode}: {lines[-1] if lines else ''}")
    experiment = root / 'experiments' / opt['name']
    log = '\n'.join(p.read_text() for p in sorted(experiment.glob('train_*.log')))
    iterations = [int(v.replace(',', '')) for v in re.findall(r'\biter:\s*([\d,]+),', log)]
    stages = sorted({int(v) for v in re.findall(r'Stage (\d+)/\d+ ', log)})
    psnr = re.findall(r'# psnr: ([-\d.inf]+)', log)
    data.update(
        last_iter=max(iterations, default=0),
        stages_run=len(stages),
        stages=len(opt['train'].get('stages') or []),
        finished='End of training' in log and (experiment / 'models' / 'net_g_latest.pth').is_file(),
        val_psnr=float(psnr[-1]) if psnr else None)
    try:
        seconds, counted = seconds_per_iteration(log, settings.warmup_iters)
        data.update(it_per_s=1 / seconds, counted_iters=counted)
    except SystemExit as error:  # benchmark_stage's message: too few logged iterations
        raise RuntimeError(f'no speed: {error}') from None
    if data['last_iter'] != total or not data['finished'] or data['stages_run'] != data['stages']:
        raise RuntimeError(f"training stopped early: last iteration {data['last_iter']} of {total}, stages "
                           f"{data['stages_run']}/{data['stages']}, finished {data['finished']}")
    notes = '; '.join(f'{key}: {value}' for key, value in changed.items())
    return (f"{total} iterations, {data['stages']} stages, {data['it_per_s']:.2f} it/s (after iteration "
            f"{settings.warmup_iters}), {data['seconds']:.0f} s in all, val PSNR {data['val_psnr']}"
            f"{'; ' + notes if notes else ''}"), data


# ---------------------------------------------------------------------- output
def environment(device: torch.device) -> str:
    if device.type == 'cuda':
        return (f'{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}, torch {torch.__version__}, '
                f'cuDNN {torch.backends.cudnn.version()}')
    return f'CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads), torch {torch.__version__}'


def table(check: Check, mode: str) -> str:
    width = max([len(row.item) for row in check.rows] + [4])
    lines = [
        f'gpu_check ({mode}) on {environment(check.device)}: {check.elapsed() / 60:.1f} min of the '
        f'{check.budget_s / 60:g} min budget; {"PASSED" if check.passed else "FAILED"}',
        f"{'section':<12}{'item':<{width + 2}}{'status':<8}{'wall s':>8}  result"
    ]
    for section in SECTIONS:
        rows = [row for row in check.rows if row.section == section]
        status = ('FAIL' if any(row.status in ('FAIL', 'BUDGET')
                                for row in rows) else 'SKIP' if all(row.status == 'SKIP' for row in rows) else 'PASS')
        lines.append(f"{section:<12}{'(section)':<{width + 2}}{status:<8}{check.section_seconds.get(section, 0):>8.1f}")
        for row in rows:
            lines.append(f"{'':<12}{row.item:<{width + 2}}{row.status:<8}{row.seconds:>8.1f}  {row.result}")
    return '\n'.join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        os.environ['CUDA_VISIBLE_DEVICES'] = ''  # before CUDA is initialised: everything here and below on the CPU
    settings = DRY if args.dry_run else GPU
    mode = 'dry-run, CPU' if args.dry_run else 'full'
    work = Path(tempfile.mkdtemp(prefix='gpu_check_')) if args.work is None else args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    check = Check(args, settings, work)
    problems = []
    try:
        import cdnsr_plugin  # noqa: F401  (registers the plugin's networks into basicsr)
    except Exception as error:  # noqa: BLE001  (a missing package: said in the table, nothing else runs)
        problems.append(f'cannot import cdnsr_plugin ({one_line(error)}): install the requirements (docs/install.md)')
    if check.device.type != 'cuda' and not args.dry_run:
        problems.append('no CUDA device: run on a GPU, or use --dry-run')
    try:
        for problem in problems:
            check.rows.append(Row('cuda-tests', 'environment', 'FAIL', 0.0, problem))
        if not problems:
            check.run()
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(table(check, mode), flush=True)
    if args.json:
        report = {
            'mode': mode, 'device': environment(check.device), 'passed': check.passed, 'wall_s': check.elapsed(),
            'budget_s': check.budget_s, 'settings': dataclasses.asdict(settings), 'sections': check.section_seconds,
            'rows': [dataclasses.asdict(row) for row in check.rows]
        }
        args.json.write_text(json.dumps(report, indent=2, default=str))
    return 0 if check.passed else 1


if __name__ == '__main__':
    sys.exit(main())
