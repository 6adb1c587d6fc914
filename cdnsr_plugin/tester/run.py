"""Run a ``TestConfig``: every image of every set under every routing setting, then the reports.

Steps per image (each a function below): read LR (and GT, checked to be exactly ``scale`` x LR) ->
classify every tile once -> per setting: decide classes (argmax / eta / budget / set budget / Laplacian
router / backbone), render, time it, score it (BasicSR's PSNR/SSIM, RGB and Y, ``crop_border = scale``),
count its FLOPs -> write the SR image and class map of the first setting. A file that cannot be used
is recorded in ``failures`` with the reason and the run goes on; the exit status is non-zero if any
image failed.

Set budget (``--set-budget B``). Before a set's images run, every image is classified (timed, and its logits
kept for the image's run, so no image is classified twice); one ``eta`` is solved (``policies.solve_shared_eta``)
at which the FLOPs the routed run executes on all the set's images (as the record counts them: regions with
halos and promotions, classifier included) are at most ``B`` x the backbone's on the whole images. Each
image's routed time includes its classification and its share of the solve. An image that fails to load (with
its ground truth) or to classify in that pass is left out of the budget and reported when its turn comes; where
one that was counted fails later (e.g. out of memory in another setting), so that the images that ran spent
more than ``B``, a note says so.

Tiling. The default, ``--tiling regions``: routed settings classify non-overlapping 32x32 cells and run
rectangles of cells with real context (``inference.regions``); ``backbone patch-wise`` stays the papers'
comparison (every 32x32 tile at stride 28 through the largest branch, zero padding, overlaps averaged),
``backbone full image`` the honest baseline of quality, and ``backbone tiled`` (the same network on
non-overlapping tiles with its exact receptive radius of context, ``inference.tiled``: the same image, and on a
CPU faster than the whole image) the baseline of speed: the summary compares the routed time with the faster
of the two. ``--tiling paper`` runs the routed settings as the papers do.

FLOPs accounting (per image, both conventions). Regions: a routed setting costs what ran
(``inference.costs.executed_cost``: each branch's cost per pixel x the pixels its regions processed, halos
included, plus the classifier or router on every cell); each record holds ``pixel_ratio``, the processed /
image pixels. Paper tiling: ``sum_j counts_j * (C_cls + C_j)`` (the classifier runs on every tile; the
Laplacian router's ~8 MACs per pixel replace it). ``backbone patch-wise`` costs ``N * C_largest``;
``backbone full image`` costs the largest branch on the whole image, extrapolated exactly from two probe
sizes (``inference.costs.full_image_cost``); ``backbone tiled`` the same per tile input (with its context).
Per record: ``per_patch`` = total / the setting's tile count (cells or papers' tiles), ``percent_of_largest`` =
that per tile in % of the largest branch on one tile (the papers' tables), ``percent_of_full_image`` = total
in % of ``backbone full image`` (the honest figure).
Comparisons divide totals over the same images.

Backend ``onnxruntime`` (``--onnx``): the export of ``tools/export_onnx.py`` is loaded as
``deploy.onnx_runtime.ExportedNet`` and run by the same engine on the CPU; its per-tile costs, cost coefficients
and halos are those measured on the torch network at export (the manifest), so reports compare across backends.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from basicsr.archs import build_network
from basicsr.metrics import calculate_psnr, calculate_ssim
from basicsr.utils import tensor2img
from tqdm import tqdm

from cdnsr_plugin.deploy.onnx_runtime import load_exported, require_onnxruntime
from cdnsr_plugin.inference.costs import CONVENTIONS, CostTable, cost_table, executed_cost, full_image_cost
from cdnsr_plugin.inference.engine import RoutedEngine
from cdnsr_plugin.inference.laplacian import LAPLACIAN_MACS_PER_PIXEL, LaplacianRouter
from cdnsr_plugin.inference.policies import SharedEta, cost_aware_labels, eta_limit, solve_budget, solve_shared_eta
from cdnsr_plugin.inference.regions import Plan, plan_regions
from cdnsr_plugin.inference.tiled import TileChoice, tiled_input_sizes
from cdnsr_plugin.inference.tiling import PatchGrid
from cdnsr_plugin.tester.config import ONNXRUNTIME, DatasetSpec, Setting, TestConfig
from cdnsr_plugin.tester.records import Failure, Flops, ImageRecord, Report, SettingResult
from cdnsr_plugin.tester.safety import (Progress, check_finite_weights, check_free_space, check_memory,
                                        check_out_contents, check_out_location, check_output_names, lock_out,
                                        replace_earlier_run, sr_names)
from cdnsr_plugin.tester.shard import Shard
from cdnsr_plugin.utils.checkpoint import load_parts, load_weights
from cdnsr_plugin.utils.image import to_tensor
from cdnsr_plugin.utils.io import SkipImage, Skipped, list_images, read_image, write_image
from cdnsr_plugin.utils.timing import Measurement, measure
from cdnsr_plugin.utils.viz import draw_class_map, draw_region_map


class ImageFailure(Exception):
    """An image that cannot be processed; the message says why and what to do."""


@dataclass
class LoadedPair:
    path: Path
    lr: torch.Tensor  # (3, h, w) RGB in [0, 1]
    gt: Optional[np.ndarray]  # uint8 BGR, exactly scale x LR
    notes: list[str]


# ---------------------------------------------------------------------- set-up
def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA if available, else CPU; a CUDA request without CUDA is an error."""
    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    device = torch.device(name)
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise ValueError(f'device {name} was asked for but CUDA is not available here; use --device cpu')
    return device


def load_network(cfg: TestConfig) -> torch.nn.Module:
    """Build ``network_g`` and load its weights; errors name the option key or checkpoint keys. Backend
    ``onnxruntime``: the export in ``cfg.onnx``, its files checked against the manifest's sha256."""
    if cfg.backend == ONNXRUNTIME:
        net = load_exported(cfg.onnx)
        if cfg.scale is not None and cfg.scale != net.scale:
            raise ValueError(f'scale is {cfg.scale} but the export at {cfg.onnx} upscales x{net.scale}')
        return net
    if cfg.network.get('type') != 'CDNSRNet':
        raise ValueError(f"network_g.type is {cfg.network.get('type')!r}: the tester routes a CDNSRNet "
                         '(classifier + branches); test a single network with basicsr/test.py, or put it '
                         'in a CDNSRNet as its only branch')
    net = build_network(dict(cfg.network))
    if cfg.checkpoint is not None:
        load_weights(net, cfg.checkpoint, cfg.param_key, cfg.strict)
    load_parts(net.named_parts(), cfg.parts)
    sources = [str(cfg.checkpoint)] if cfg.checkpoint is not None else []
    check_finite_weights(net.named_parts(), ', '.join(sources + [str(p) for p in cfg.parts.values()]))
    if cfg.scale is not None and cfg.scale != net.scale:
        raise ValueError(f'scale is {cfg.scale} but network_g upscales x{net.scale}')
    return net


def load_router(cfg: TestConfig, num_classes: int) -> Optional[LaplacianRouter]:
    """The Laplacian router (fitted and saved, or loaded), or ``None`` for the learned classifier."""
    if cfg.router != 'laplacian':
        return None
    if cfg.fit_router is not None:
        router = LaplacianRouter.from_prepared(cfg.fit_router, num_classes=num_classes)
        cfg.out.mkdir(parents=True, exist_ok=True)
        router.save(cfg.out / 'laplacian_router.json')
    else:
        router = LaplacianRouter.load(cfg.router_file)
    if router.num_classes != num_classes:
        raise ValueError(f'the Laplacian router has {router.num_classes} classes but the network has '
                         f'{num_classes} branches')
    return router


# ---------------------------------------------------------------------- reading
def planned_outputs(cfg: TestConfig) -> list[Path]:
    """The SR images and class maps the run will write (``<out>/<set>/<stem>.png``, ``<stem>_classmap.png``)."""
    if not cfg.save_images:
        return []
    paths = []
    for spec in cfg.datasets:
        try:
            images = images_of(spec.lq, Skipped())
        except (FileNotFoundError, ValueError):  # the run lists the folder as a failure
            continue
        paths += [cfg.out / spec.name / name for path in images for name in sr_names(path.stem)]
    return paths


def images_of(lq: Path, skipped: Skipped) -> list[Path]:
    """The images to run: the one file ``--input`` names, or those of its folder (``list_images``)."""
    return [lq] if lq.is_file() else list_images(lq, skipped)


def gt_index(spec: DatasetSpec, failures: list[Failure]) -> dict[str, Path]:
    """LR stem -> GT path, through BasicSR's ``filename_tmpl`` (LR name = tmpl.format(GT name))."""
    if spec.gt is None:
        return {}
    skipped = Skipped()
    paths = list_images(spec.gt, skipped)
    failures.extend(Failure(path, reason) for path, reason in skipped.items)
    return {spec.filename_tmpl.format(path.stem): path for path in paths}


def load_pair(path: Path, gt_path: Optional[Path], scale: int, has_gt: bool) -> LoadedPair:
    try:
        lr_img, notes = read_image(path)
    except SkipImage as exc:
        raise ImageFailure(f'{path}: {exc}') from exc
    gt = None
    if has_gt:
        if gt_path is None:
            raise ImageFailure(f'{path}: no ground truth with the same name in the GT folder; add it or test '
                               'without --gt')
        try:
            gt, gt_notes = read_image(gt_path)
        except SkipImage as exc:
            raise ImageFailure(f'{gt_path}: {exc}') from exc
        notes += [f'GT {note}' for note in gt_notes]
        want = (lr_img.shape[0] * scale, lr_img.shape[1] * scale)
        if gt.shape[:2] != want:
            raise ImageFailure(f'{gt_path}: GT is {gt.shape[1]}x{gt.shape[0]} but {scale} x the LR '
                               f'{path.name} ({lr_img.shape[1]}x{lr_img.shape[0]}) is {want[1]}x{want[0]}; make '
                               'pairs with tools/make_test_sets.py or crop the GT to a multiple of the scale first')
    lr = to_tensor(lr_img)
    return LoadedPair(path, lr, gt, notes)


# ---------------------------------------------------------------------- per setting
def decide(setting: Setting,
           logits: Optional[torch.Tensor],
           router_labels: Optional[torch.Tensor],
           n: int,
           table: CostTable,
           convention: str,
           num_classes: int,
           shared: Optional[SharedEta] = None) -> tuple[torch.Tensor, Optional[float]]:
    """Class of every tile under ``setting`` and the eta used (None where eta does not apply); ``shared``: the
    eta solved for the set (``setting.set_budget``)."""
    if setting.kind != 'routed':
        return torch.full((n, ), num_classes - 1, dtype=torch.long), None
    if router_labels is not None:
        return router_labels, None
    if setting.budget is not None:
        solution = solve_budget(logits, table.per_class(convention), table.largest(convention), setting.budget)
        return solution.labels, float(solution.eta)
    if setting.set_budget is not None and shared is None:
        raise ValueError(f'setting {setting.name!r}: no eta was solved for this set')
    eta = shared.eta if setting.set_budget is not None else (setting.eta or 0.0)
    costs = [branch.value(convention) for branch in table.branches]
    return cost_aware_labels(logits, costs, eta), float(eta)


def flops_of(setting: Setting,
             counts: list[int],
             table: CostTable,
             router_cost: Optional[dict[str, float]],
             full_coefficients: Optional[dict],
             size: tuple[int, int],
             tile: Optional[TileChoice] = None) -> dict[str, Flops]:
    """Whole-image cost, cost per tile and % of the largest branch per tile, both conventions; ``tile``: how
    ``backbone tiled`` ran (each tile's input with its context costs as a whole image of that size)."""
    n = sum(counts)
    tiled_inputs = tiled_input_sizes(*size, tile.tile, tile.halo) if setting.kind == 'backbone-tiled' else []
    result = {}
    for convention in CONVENTIONS:
        largest = table.largest(convention)
        if setting.kind == 'backbone-full':
            total = full_image_cost(full_coefficients, *size)[convention]
        elif setting.kind == 'backbone-tiled':
            total = sum(full_image_cost(full_coefficients, h, w)[convention] for h, w in tiled_inputs)
        elif setting.kind == 'backbone-patch':
            total = n * largest
        elif router_cost is None:  # the learned classifier runs on every tile
            total = table.routed(counts, convention) * n
        else:  # the Laplacian router's cost replaces the classifier's
            total = float(np.dot(counts, [b.value(convention) for b in table.branches])) + n * router_cost[convention]
        result[convention] = Flops(float(total), total / n, 100.0 * total / n / largest)
    return result


def executed_flops(setting: Setting, plan: Plan, tiles: int, table: CostTable, router_cost: Optional[dict[str, float]],
                   coefficients: list[dict]) -> dict[str, Flops]:
    """What a ``regions`` run executed (``inference.costs.executed_cost``); per tile and % of the largest
    branch per tile over the same ``tiles`` as ``flops_of``, so both modes compare in one table."""
    classifier = table.classifier if setting.kind == 'routed' and router_cost is None else None
    totals = executed_cost(
        plan.processed(len(table.branches)), plan.passes(len(table.branches)), coefficients, tiles, classifier)
    result = {}
    for convention, total in totals.items():
        if setting.kind == 'routed' and router_cost is not None:
            total += tiles * router_cost[convention]
        result[convention] = Flops(total, total / tiles, 100.0 * total / tiles / table.largest(convention))
    return result


SSIM_WINDOW = 11  # BasicSR's SSIM uses an 11x11 Gaussian window in 'valid' mode


def metrics(sr_img: np.ndarray, gt: Optional[np.ndarray], crop: int) -> dict[str, Optional[float]]:
    """BasicSR's PSNR/SSIM on uint8 BGR images, RGB and Y, ``crop_border = crop``.

    ``None`` where an image is too small to score after the crop (PSNR needs a pixel, SSIM its window)
    and without ground truth.
    """
    values: dict[str, Optional[float]] = dict.fromkeys(('psnr', 'ssim', 'psnr_y', 'ssim_y'))
    if gt is None:
        return values
    side = min(gt.shape[:2]) - 2 * crop
    for suffix, y in (('', False), ('_y', True)):
        if side >= 1:
            values[f'psnr{suffix}'] = float(calculate_psnr(sr_img, gt, crop, test_y_channel=y))
        if side >= SSIM_WINDOW:
            values[f'ssim{suffix}'] = float(calculate_ssim(sr_img, gt, crop, test_y_channel=y))
    return values


class Mark:
    """Where a set starts in a runner's lists (``Runner.merge``): its records per setting, failures and notes."""

    def __init__(self, runner: 'Runner') -> None:
        self.images = [len(result.images) for result in runner.results]
        self.failures, self.notes = len(runner.failures), len(runner.notes)
        self.set_notes = self.notes


class Runner:
    """Holds the network, engine, costs and results of one run (see the module docstring)."""

    def __init__(self, cfg: TestConfig, command: str = '', shard: Optional[Shard] = None) -> None:
        """Every check before any work (``tester.safety``), then the network. ``--out`` is locked from the first
        write to ``close``: a second run into it fails at once (``utils.locks.Busy``). Under ``torchrun``
        (``shard``), rank 0 alone locks and checks ``--out``; ``start`` then prepares it for every rank."""
        self.cfg, self.command = cfg, command or ' '.join(sys.argv)
        self.shard = shard or Shard()
        self.progress: Optional[Progress] = None
        self.lock = None
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.device = resolve_device(self.shard.device(cfg.device))
        # before any work: nothing of the user's can be overwritten, and the results can be written. A single
        # input image protects itself (no output may be it), a folder of inputs the whole folder
        folders = [spec.lq for spec in cfg.datasets if not spec.lq.is_file()]
        files = [spec.lq for spec in cfg.datasets if spec.lq.is_file()]
        files += [cfg.checkpoint, cfg.router_file, *cfg.parts.values()]
        check_out_location(cfg.out, folders + [spec.gt for spec in cfg.datasets] + [cfg.onnx], files,
                           planned_outputs(cfg))
        if not self.shard.main:  # rank 0 owns --out; this rank only writes its images there after ``start``
            self._set_up()
            return
        self.lock = lock_out(cfg.out)
        created = not cfg.out.exists()
        try:
            check_out_contents(cfg.out, cfg.overwrite)
            self._set_up()
        except BaseException:  # refused (or interrupted) before any image: a folder this run created goes too
            if created and cfg.out.is_dir() and not any(cfg.out.iterdir()):
                cfg.out.rmdir()
            self.close()
            raise

    def _set_up(self) -> None:
        cfg = self.cfg
        if cfg.save_images:
            check_output_names(spec.lq for spec in cfg.datasets if spec.lq.is_dir())
        net = load_network(cfg)
        if cfg.save_images:
            inputs = [p for spec in cfg.datasets for p in images_of(spec.lq, Skipped())]
            warning = check_free_space(cfg.out, inputs, net.scale)
            if warning:
                print(f'warning: {warning}', file=sys.stderr)
        patch = cfg.engine.patch
        self.table = net.cost_table(patch) if cfg.backend == ONNXRUNTIME else cost_table(net, patch=patch)
        self.router = load_router(cfg, net.num_classes)
        macs = LAPLACIAN_MACS_PER_PIXEL * patch * patch
        self.router_cost = {'macs': macs, 'paper': 2 * macs} if self.router else None
        self.regions = cfg.engine.tiling == 'regions'
        self.engine = RoutedEngine(net, cfg.engine, self.device)
        self.full_coefficients = self.engine.coefficients[-1]
        if self.regions:
            self.engine.halo  # resolved now: a network without a default halo is a setup error (exit 2)
        # the papers' patch-wise backbone, whatever the routed tiling (same converted network: no second copy)
        self.paper_engine = (
            RoutedEngine(self.engine.net, dataclasses.replace(cfg.engine, tiling='paper'), self.device)
            if self.regions else self.engine)
        self.results = [SettingResult(s.name, s.kind) for s in cfg.settings]
        self.failures: list[Failure] = []
        self.notes: list[dict] = []
        self.classified: dict[Path, tuple[torch.Tensor, float]] = {}  # set budget: logits, seconds per image
        self.shared: dict[str, SharedEta] = {}  # set budget: the eta of each setting for the current set

    def start(self) -> None:
        """Every check has passed (on every rank): only now is the earlier run's output removed (``--overwrite``)
        and this run's progress list started, by rank 0; the other ranks wait for it. Raises ``ValueError`` (on
        every rank) when ``--overwrite`` is refused."""
        cfg, error = self.cfg, None
        if self.shard.main:
            try:
                if cfg.overwrite:
                    fitted = cfg.out / 'laplacian_router.json' if cfg.fit_router else None  # written by this run
                    replace_earlier_run(cfg.out, [cfg.router_file, fitted, cfg.checkpoint, *cfg.parts.values()])
                self.progress = Progress(cfg.out, self.command)  # what this run writes, listed as it goes
                if self.shard.sharded:  # the other ranks write too: their outputs are listed now, before any is
                    self.progress.add(*planned_outputs(cfg))
            except (ValueError, OSError) as exc:
                error = str(exc)
        error = self.shard.agree(error)
        if error is not None:
            raise ValueError(error)

    def finish(self) -> None:
        """The run's report is written: its progress list goes (the report lists the outputs now) and ``--out``
        is unlocked."""
        if self.progress is not None:
            self.progress.finish()
        self.close()

    def close(self) -> None:
        """Unlock ``--out`` (also after a failure or an interruption; the progress list then stays, for
        ``--overwrite``). Safe to call more than once."""
        lock = getattr(self, 'lock', None)
        if lock is not None:
            lock.release()

    def run(self) -> Report:
        self.warm_up()
        for spec in self.cfg.datasets:
            self.run_dataset(spec)
        return self.build_report()

    def warm_up(self) -> None:
        """One small pass through the classifier and every branch, so that the first image's timings do not
        include one-time set-up (allocator growth, oneDNN primitives, the CUDA context)."""
        p, m = self.cfg.engine.patch, self.engine.num_classes
        lr = torch.rand(3, p, p * m, device=self.device)
        grid = self.engine.grid(lr)
        self.engine.classify(lr, grid)
        self.engine.render(lr, torch.arange(len(grid)) % m, grid)
        if any(setting.kind == 'backbone-tiled' for setting in self.cfg.settings):
            self.engine.tile_choice  # measured now (tiled.choose_tile), not inside the first image's time
            if self.shard.sharded:  # every rank tiles as rank 0 measured: one run, one tile (and one report)
                self.engine._tile_choice = self.shard.gather(self.engine.tile_choice)[0]

    def run_dataset(self, spec: DatasetSpec) -> None:
        """Every image of one set; a bad image or folder is recorded in ``failures`` and the run goes on."""
        skipped = Skipped()
        failures = self.failures if self.shard.main else []  # the set's own failures: rank 0 reports them
        try:
            paths = images_of(spec.lq, skipped)
            gts = gt_index(spec, failures)
        except (FileNotFoundError, ValueError, KeyError, IndexError) as exc:
            failures.append(Failure(str(spec.lq), f'{type(exc).__name__}: {exc}'))
            return
        failures.extend(Failure(path, reason) for path, reason in skipped.items)
        start = Mark(self)
        self.solve_set_budgets(spec, paths, gts)
        start.set_notes = len(self.notes)  # the solve's notes (the same on every rank) come before the images'
        for path in tqdm(
                self.shard.take(paths), desc=f'{spec.name}', unit='image', file=sys.stderr,
                disable=not self.shard.main):
            try:
                pair = load_pair(path, gts.get(path.stem), self.engine.scale, spec.gt is not None)
                self.run_image(spec, pair)
            except ImageFailure as exc:
                self.failures.append(Failure(str(path), str(exc)))
            except Exception as exc:  # noqa: BLE001 (one image must not end a batch run: OOM, I/O, cv2)
                self.failures.append(Failure(str(path), f'{type(exc).__name__}: {exc}'))
                if self.device.type == 'cuda':
                    torch.cuda.empty_cache()
        if self.shard.sharded:
            self.merge(start, paths)
        self.check_set_budgets(spec)

    def merge(self, start: 'Mark', paths: list[Path]) -> None:
        """``torchrun``: rank 0 gathers what every rank recorded for the set since ``start`` and orders it as one
        process would (the set's own failures and the solve's notes first, then each image's records, failures
        and notes in the images' order); the other ranks keep nothing of it."""
        by_path = {str(path): i for i, path in enumerate(paths)}
        by_stem = {path.stem: i for i, path in enumerate(paths)}
        mine = ([result.images[start.images[i]:] for i, result in enumerate(self.results)],
                self.failures[start.failures:], self.notes[start.set_notes:])
        gathered = self.shard.gather(mine)
        for i, result in enumerate(self.results):
            del result.images[start.images[i]:]
        del self.failures[start.failures:]
        del self.notes[start.notes if not self.shard.main else start.set_notes:]
        if not self.shard.main:
            return
        for i, result in enumerate(self.results):
            records = [record for part in gathered for record in part[0][i]]
            result.images.extend(sorted(records, key=lambda r: by_stem.get(r.image, -1)))
        failures = [failure for part in gathered for failure in part[1]]
        self.failures.extend(sorted(failures, key=lambda f: by_path.get(f.file, -1)))
        notes = [note for part in gathered for note in part[2]]
        self.notes.extend(sorted(notes, key=lambda n: by_path.get(n['file'], -1)))

    def check_set_budgets(self, spec: DatasetSpec) -> None:
        """A note where the images of ``spec`` that ran spent more than a set budget: one counted in the solve
        failed later (e.g. out of memory in another setting), or one that could not be classified then ran."""
        convention = self.cfg.convention
        for setting, result in zip(self.cfg.settings, self.results):
            if setting.set_budget is None:
                continue
            records = [r for r in result.images if r.dataset == spec.name]
            full = sum(full_image_cost(self.full_coefficients, *r.lr_size)[convention] for r in records)
            spent = sum(r.flops[convention].total for r in records)
            if full > 0 and spent > setting.set_budget * full * (1 + 1e-9):
                self.note(spec.lq, [
                    f'{setting.name}: the {len(records)} images that ran executed {100 * spent / full:.2f}% of the '
                    f'backbone\'s {convention} FLOPs on their whole images, over the budget: images counted in '
                    'the solve failed later, or images the solve could not classify ran'
                ])

    def run_image(self, spec: DatasetSpec, pair: LoadedPair) -> None:
        if pair.notes:
            self.note(pair.path, pair.notes)
        try:
            check_memory(pair.path, *pair.lr.shape[-2:], self.engine.scale, self.device)
        except ValueError as exc:
            raise ImageFailure(str(exc)) from None
        lr = pair.lr.to(self.device)
        grid = self.engine.grid(lr)
        logits, router_labels = None, None
        if pair.path in self.classified:  # classified for the set budget: not again
            logits, routing_seconds = self.classified.pop(pair.path)
        else:
            with measure(self.device) as routing_time:
                if self.router is not None:
                    router_labels = self.engine.map_tiles(lr, lambda t: self.router(t.float()).cpu(), grid)
                elif any(s.kind == 'routed' for s in self.cfg.settings):
                    logits, _ = self.engine.classify(lr, grid)
            routing_seconds = routing_time.seconds
        records = []  # kept only if every setting succeeds, so all settings compare the same images
        for setting in self.cfg.settings:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter('always')
                labels, eta = decide(setting, logits, router_labels, len(grid), self.table, self.cfg.convention,
                                     self.engine.num_classes, self.shared.get(setting.name))
            for warning in caught:
                self.note(pair.path, [f'{setting.name}: {warning.message}'])
            plan, setting_grid = None, grid
            if setting.kind == 'backbone-patch' and self.regions:
                setting_grid = self.paper_engine.grid(lr)
                labels = torch.full((len(setting_grid), ), self.engine.num_classes - 1, dtype=torch.long)
            with measure(self.device) as timing:
                if setting.kind == 'backbone-full':
                    sr = self.engine.backbone_full(lr)
                elif setting.kind == 'backbone-tiled':
                    sr = self.engine.backbone_tiled(lr)
                elif setting.kind == 'backbone-patch':
                    sr = self.paper_engine.render(lr, labels, setting_grid)
                else:
                    sr = self.engine.render(lr, labels, grid)
                    plan = self.engine.last_plan if self.regions else None
            if not torch.isfinite(sr).all():
                ran = sorted({r.branch for r in plan.regions}) if plan is not None else labels.unique().tolist()
                raise ImageFailure(f'{pair.path}: non-finite values (NaN or inf) in the SR image of setting '
                                   f'{setting.name!r} (branches {ran} ran on it); with --precision fp16 try fp32, '
                                   'else the weights overflow on this input')
            seconds = timing.seconds + (routing_seconds if setting.kind == 'routed' else 0.0)
            sr_img = tensor2img(sr.cpu(), rgb2bgr=True, min_max=(0, 1))
            record = self.record(spec, pair, setting, labels, eta, sr_img, seconds, timing, setting_grid, plan)
            if setting.name == self.cfg.save_setting and self.cfg.save_images:
                self.save_images(spec, pair.path.stem, sr_img, labels, setting_grid, record, plan)
            records.append(record)
        for result, record in zip(self.results, records):
            result.images.append(record)

    def solve_set_budgets(self, spec: DatasetSpec, paths: list[Path], gts: dict[str, Path]) -> None:
        """Settings with a set budget: classify every image of the set that loads (with its ground truth, as its
        own run will load it; timed, logits kept for that run), then solve each setting's eta over the set (see
        the module docstring)."""
        self.classified.clear()
        self.shared.clear()
        settings = [s for s in self.cfg.settings if s.set_budget is not None]
        if not settings:
            return
        sizes = {}
        for path in tqdm(
                self.shard.take(paths),
                desc=f'{spec.name}: classify for the set budget',
                unit='image',
                file=sys.stderr,
                disable=not self.shard.main):
            try:  # whatever fails here is reported when the image's own turn comes, as run_dataset does
                pair = load_pair(path, gts.get(path.stem), self.engine.scale, spec.gt is not None)
                check_memory(pair.path, *pair.lr.shape[-2:], self.engine.scale, self.device)
                lr = pair.lr.to(self.device)
                with measure(self.device) as timing:
                    logits, _ = self.engine.classify(lr)
            except Exception:  # noqa: BLE001 (one image must not end a batch run)
                if self.device.type == 'cuda':
                    torch.cuda.empty_cache()
                continue
            if not torch.isfinite(logits).all():
                continue  # non-finite logits: the image's own run reports it (its SR image is checked)
            self.classified[path] = (logits, timing.seconds)
            sizes[path] = (int(lr.shape[-2]), int(lr.shape[-1]))
        # under torchrun every rank holds its own images; the sizes of all, in the set's order, on every rank
        order = {path: i for i, path in enumerate(paths)}
        every = sorted(
            ((order[p], str(p), size) for part in self.shard.gather(list(sizes.items())) for p, size in part),
            key=lambda item: item[0])
        if not every:
            return
        for setting in settings:
            with warnings.catch_warnings(record=True) as caught, measure(self.device) as timing:
                warnings.simplefilter('always')
                costs = [branch.value(self.cfg.convention) for branch in self.table.branches]
                limits = self.shard.gather(
                    eta_limit([logits for logits, _ in self.classified.values()], costs) if self.classified else None)
                limit = max(value for value in limits if value is not None)
                solution = solve_shared_eta(
                    self.set_fraction(setting, sizes, [size for _, _, size in every], order), setting.set_budget, limit)
            self.shared[setting.name] = solution
            if caught:
                self.note(spec.lq, [f'{setting.name}: {warning.message}' for warning in caught])
            share = timing.seconds / max(len(self.classified), 1)  # the solve, spread over the images it routed
            self.classified = {path: (logits, seconds + share) for path, (logits, seconds) in self.classified.items()}
            self.note(spec.lq, [
                f'{setting.name}: eta {solution.eta:.4g} over {len(every)} images: '
                f'{100 * solution.fraction:.2f}% of the backbone\'s {self.cfg.convention} FLOPs on the '
                f'whole images ({timing.seconds:.3f} s to solve)'
            ])

    def set_fraction(self,
                     setting: Setting,
                     sizes: dict[Path, tuple[int, int]],
                     every: Optional[list[tuple[int, int]]] = None,
                     positions: Optional[dict[Path, int]] = None) -> Callable[[float], float]:
        """``eta`` -> the FLOPs the routed run executes on all ``sizes`` images under ``eta`` (as ``record``
        counts them), over the backbone's on the whole images, in the run's convention. Under ``torchrun``,
        ``sizes`` are this rank's images (at ``positions`` in the set), ``every`` the sizes of all ranks' images in the
        set's order: each evaluation gathers every image's FLOPs and sums them in that order, as one process does."""
        convention = self.cfg.convention
        costs = [branch.value(convention) for branch in self.table.branches]
        full = sum(
            full_image_cost(self.full_coefficients, *size)[convention]
            for size in (every if every is not None else sizes.values()))
        options, num_classes = self.cfg.engine, self.engine.num_classes

        def fraction(eta: float) -> float:
            if self.shard.sharded:
                parts = self.shard.gather([(positions[path], value) for path, value in per_image(eta).items()])
                return sum(value for _, value in sorted(item for part in parts for item in part)) / full
            return sum(per_image(eta).values()) / full

        def per_image(eta: float) -> dict[Path, float]:
            values = {}
            for path, size in sizes.items():
                labels = cost_aware_labels(self.classified[path][0], costs, eta)
                if self.regions:
                    plan = plan_regions(labels, *size, options.patch, self.engine.halo, options.max_region,
                                        self.engine.per_pixel)
                    flops = executed_flops(setting, plan, len(labels), self.table, None, self.engine.coefficients)
                else:
                    counts = torch.bincount(labels, minlength=num_classes).tolist()
                    flops = flops_of(setting, counts, self.table, None, self.full_coefficients, size)
                values[path] = flops[convention].total
            return values

        return fraction

    def note(self, path: Path, notes: list[str]) -> None:
        self.notes.append({'file': str(path), 'notes': notes})
        tqdm.write(f'note: {path}: {"; ".join(notes)}', file=sys.stderr)

    def record(self,
               spec: DatasetSpec,
               pair: LoadedPair,
               setting: Setting,
               labels: torch.Tensor,
               eta: Optional[float],
               sr_img: np.ndarray,
               seconds: float,
               timing: Measurement,
               grid: PatchGrid,
               plan: Optional[Plan] = None) -> ImageRecord:
        """The report's record of one image under one setting."""
        counts = torch.bincount(labels, minlength=self.engine.num_classes).tolist()
        lr_size = (int(pair.lr.shape[-2]), int(pair.lr.shape[-1]))
        tile = self.engine.tile_choice if setting.kind == 'backbone-tiled' else None
        flops = flops_of(setting, counts, self.table, self.router_cost, self.full_coefficients, lr_size, tile)
        if plan is not None:
            flops = executed_flops(setting, plan, len(grid), self.table, self.router_cost, self.engine.coefficients)
        full = full_image_cost(self.full_coefficients, *lr_size)
        for convention, cost in flops.items():
            cost.percent_of_full_image = 100.0 * cost.total / full[convention]
        return ImageRecord(
            spec.name,
            pair.path.stem,
            list(lr_size), [int(sr_img.shape[0]), int(sr_img.shape[1])],
            len(grid),
            counts,
            eta,
            **metrics(sr_img, pair.gt, self.engine.scale),
            flops=flops,
            time_s=seconds,
            peak_memory_mb=timing.peak_memory_mb,
            pixel_ratio=None if plan is None else plan.pixel_ratio())

    def save_images(self,
                    spec: DatasetSpec,
                    stem: str,
                    sr_img: np.ndarray,
                    labels: torch.Tensor,
                    grid: PatchGrid,
                    record: ImageRecord,
                    plan: Optional[Plan] = None) -> None:
        """Write the SR image and its class map (atomically) and note their paths in ``record``. Under
        regions the map shows the branch each pixel ran on and the executed regions' outlines."""
        sr_path, overlay_path = (self.cfg.out / spec.name / name for name in sr_names(stem))
        if self.progress is not None:  # listed before written: an interruption leaves nothing unlisted
            self.progress.add(sr_path, overlay_path)
        write_image(sr_path, sr_img)
        if plan is not None:
            overlay = draw_region_map(sr_img, plan.region_map(), [r.branch for r in plan.regions], self.engine.scale,
                                      self.engine.num_classes)
        else:
            overlay = draw_class_map(sr_img,
                                     grid.positions().numpy(), grid.patch, self.engine.scale, labels.numpy(),
                                     self.engine.num_classes)
        write_image(overlay_path, overlay)
        record.sr_path, record.overlay_path = str(sr_path), str(overlay_path)

    # ------------------------------------------------------------------ report
    def build_report(self) -> Report:
        return Report(datetime.datetime.now().astimezone().isoformat(timespec='seconds'), self.command,
                      str(self.device), torch.__version__, torch.get_num_threads(), self.network_info(), self.results,
                      self.failures, self.notes)

    def network_info(self) -> dict[str, Any]:
        cfg = self.cfg
        return {
            'network_g': json.loads(json.dumps(cfg.network, default=str)), 'costs': self.table.to_dict(),
            'checkpoint': str(cfg.checkpoint) if cfg.checkpoint else None,
            'parts': dict(zip(cfg.parts, map(str, cfg.parts.values()))), 'router': cfg.router,
            'router_thresholds': list(self.router.thresholds) if self.router else None, 'patch': cfg.engine.patch,
            'stride': cfg.engine.stride, 'max_batch': self.engine.max_batch, 'channels_last': cfg.engine.channels_last,
            'precision': cfg.engine.precision, 'budget_convention': cfg.convention, 'tiling': cfg.engine.tiling,
            'halo': self.engine.halo if self.regions else None,
            'max_region': cfg.engine.max_region if self.regions else None, 'backend': cfg.backend,
            'backbone_tiled': self._tile_info(), 'onnx': self.onnx_info()
        }

    def _tile_info(self) -> Optional[dict[str, Any]]:
        """How ``backbone tiled`` ran (tile side, context, exact or not, the rule's timings), if it ran."""
        if not any(setting.kind == 'backbone-tiled' for setting in self.cfg.settings):
            return None
        choice = self.engine.tile_choice
        return {
            'tile': choice.tile, 'halo': choice.halo, 'exact': choice.exact,
            'rule_seconds_per_megapixel': {str(k): v
                                           for k, v in choice.seconds_per_megapixel.items()}
        }

    def onnx_info(self) -> Optional[dict[str, Any]]:
        """Backend ``onnxruntime``: the export that ran (folder, format, opset, versions, sha256 per file)."""
        if self.cfg.backend != ONNXRUNTIME:
            return None
        manifest = self.engine.net.manifest
        hashes = {part['file']: part['sha256'] for part in [manifest['classifier'], *manifest['branches']]}
        return {
            'folder': str(self.cfg.onnx), 'format_version': manifest['format_version'], 'opset': manifest['opset'],
            'exported': manifest.get('created'), 'onnxruntime': require_onnxruntime().__version__, 'sha256': hashes
        }
