"""Time routed SR against the backbone on real images; print one table of ratios measured in one run.

    python tools/benchmark.py --network options/networks/CDNSR_SRResNet_x4.yml --images ../shared/data/photos \
        --lr-size 320x480 --mix 0.6,0.25,0.15 --runs 5 --threads 2 --loop

For each image (a photo resized to ``--lr-size`` and used as the LR input), every measurement is the
median of ``--runs`` runs, in this order, on the same input and labels:

* ``routed``: classify every tile + the engine (tiles grouped by class, one batched pass per branch per
  ``--max-batch``, streamed merge). With ``--mix`` the classes are forced (patches ranked by their
  Laplacian edge score: the flattest ``mix[0]`` share goes to branch 0, ...), so engine speed is
  measured independently of how well a classifier was trained; the classifier still runs, as it would.
* ``backbone patch-wise``: every tile through the largest branch, no classifier; always the papers' tiling
  (32/28, overlaps averaged), whatever ``--tiling`` the routed run uses.
* ``backbone full``: the largest branch on the whole image (``--skip-full`` for 8K inputs: its feature
  maps need tens of GB).
* ``backbone tiled``: the largest branch on non-overlapping tiles with its exact receptive radius of context
  (``inference.tiled``: the same image as ``backbone full``); tile side by the measured rule, or ``--tile``.
  The speed baseline is the faster of ``backbone full`` and ``backbone tiled`` (column ``t/fast``).
* ``per-patch loop`` (``--loop``): ClassSR's tester, one tile per forward pass, same labels;
* the classifier alone (its share of the routed time is printed: where the time goes).

With ``--tiling regions`` (the default: cells classified, rectangles executed with ``--halo`` pixels of real
context; ``cdnsr_plugin.inference.regions``) the routed FLOPs are what ran (each branch's cost per pixel x the pixels
its regions processed, halos included, plus the classifier), and the processed / image pixel ratio is printed.

Ratios printed: routed / backbone time and FLOPs (paper convention and MACs, classifier included), and
the engine efficiency = time ratio / FLOPs ratio (1.0 = wall-clock tracks FLOPs exactly). Peak memory is
the process's peak resident set (CPU) or CUDA allocation during the routed run.
``--max-batch-sweep 16,32,64,128`` times the routed run at each batch limit (to choose the default).

Weights do not change timings; without ``--checkpoint`` the network is randomly initialised.
"""
import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path

import cv2
import torch
from basicsr.archs import build_network

import cdnsr_plugin  # noqa: F401
from cdnsr_plugin.inference.costs import CONVENTIONS, cost_table, executed_cost, full_image_cost
from cdnsr_plugin.inference.engine import EngineOptions, RoutedEngine
from cdnsr_plugin.inference.laplacian import laplacian_scores
from cdnsr_plugin.inference.policies import forced_mix_labels
from cdnsr_plugin.tester.config import halo_type, network_options
from cdnsr_plugin.utils.checkpoint import load_weights
from cdnsr_plugin.utils.image import to_tensor
from cdnsr_plugin.utils.io import Skipped, list_images, read_image
from cdnsr_plugin.utils.timing import measure


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--network', type=Path, required=True, help='option file with network_g (a CDNSRNet)')
    parser.add_argument('--tile', type=int, help='LR tile side of the tiled backbone (default: the measured rule)')
    parser.add_argument('--checkpoint', type=Path, help='weights (default: random; timings do not depend on them)')
    parser.add_argument('--images', type=Path, required=True, help='folder of photos')
    parser.add_argument('--limit', type=int, default=2, help='number of photos (default 2)')
    parser.add_argument(
        '--lr-size', default='320x480', help='HxW of the LR input (default 320x480; 1080x1920 '
        'gives an 8K output)')
    parser.add_argument('--mix', help='forced class shares, e.g. 0.6,0.25,0.15 (default: the classifier\'s argmax)')
    parser.add_argument('--runs', type=int, default=5, help='runs per measurement; the median is reported')
    parser.add_argument('--threads', type=int, default=2, help='torch CPU threads (default 2)')
    parser.add_argument('--max-batch', type=int, help='default: 16 on CPU, 128 on CUDA')
    parser.add_argument('--max-batch-sweep', help='comma-separated batch limits to time the routed run at')
    parser.add_argument('--no-channels-last', action='store_true')
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--loop', action='store_true', help='also time the one-tile-per-pass loop')
    parser.add_argument('--skip-full', action='store_true', help='skip the full-image backbone (huge inputs)')
    parser.add_argument(
        '--tiling', choices=('paper', 'regions'), default='regions', help='routed run (default regions)')
    parser.add_argument(
        '--halo', type=halo_type, help='regions: context per side or "exact" (default: the backbone\'s default)')
    parser.add_argument('--json', type=Path, help='also write the results here')
    return parser.parse_args(argv)


def load_inputs(folder: Path, limit: int, size: tuple[int, int]) -> list[tuple[str, torch.Tensor]]:
    skipped = Skipped()
    inputs = []
    for path in list_images(folder, skipped)[:limit]:
        img, _ = read_image(path)
        img = cv2.resize(img, (size[1], size[0]), interpolation=cv2.INTER_AREA)
        inputs.append((path.stem, to_tensor(img)))
    if not inputs:
        raise SystemExit(f'no usable images in {folder}')
    return inputs


def timed(fn, runs: int, device: torch.device) -> tuple[float, float]:
    """Median seconds over ``runs`` and the peak memory (MB) seen in any run."""
    seconds, peak = [], 0.0
    for _ in range(runs):
        with measure(device) as m:
            fn()
        seconds.append(m.seconds)
        peak = max(peak, m.peak_memory_mb or 0.0)
    return statistics.median(seconds), peak


def labels_for(engine: RoutedEngine, lr: torch.Tensor, mix) -> torch.Tensor:
    if mix is None:
        return engine.classify(lr)[0].argmax(1)
    scores = engine.map_tiles(lr, lambda tiles: laplacian_scores(tiles.float()).cpu())
    return forced_mix_labels(scores, mix)


def costs(table, labels: torch.Tensor, engine: RoutedEngine, coefficients) -> dict[str, float]:
    """Routed cost of the last render: per tile (paper tiling) or what ran (regions)."""
    if engine.options.tiling == 'regions':
        plan, m = engine.last_plan, engine.num_classes
        return executed_cost(plan.processed(m), plan.passes(m), coefficients, len(labels), table.classifier)
    counts = torch.bincount(labels, minlength=engine.num_classes).tolist()
    return {c: table.routed(counts, c) * len(labels) for c in CONVENTIONS}


def bench_image(engine: RoutedEngine, paper: RoutedEngine, table, coefficients, lr: torch.Tensor, args) -> dict:
    mix = [float(v) for v in args.mix.split(',')] if args.mix else None
    grid = engine.grid(lr)
    labels = labels_for(engine, lr, mix)
    device, runs = engine.device, args.runs

    def routed():
        engine.classify(lr, grid)
        engine.render(lr, labels, grid)

    row = {
        'lr_size': list(lr.shape[-2:]), 'patches': len(grid),
        'counts': torch.bincount(labels, minlength=engine.num_classes).tolist()
    }
    routed()  # warm-up (allocator, one-time kernels)
    row['routed_s'], row['routed_peak_mb'] = timed(routed, runs, device)
    routed_flops = costs(table, labels, engine, coefficients)
    if engine.last_plan is not None and engine.options.tiling == 'regions':
        row['pixel_ratio'] = engine.last_plan.pixel_ratio()
        row['regions'] = len(engine.last_plan.regions)
    # where the routed time goes: the classifier alone (the rest is the branches, the planning and the merge)
    row['classify_s'], _ = timed(lambda: engine.classify(lr, grid), runs, device)
    paper_grid = paper.grid(lr)
    row['patch_s'], row['patch_peak_mb'] = timed(lambda: paper.backbone_patchwise(lr, paper_grid), runs, device)
    largest = {c: table.largest(c) * len(paper_grid) for c in CONVENTIONS}
    row['flops_ratio_patch'] = {c: routed_flops[c] / largest[c] for c in CONVENTIONS}
    if not args.skip_full:
        row['full_s'], row['full_peak_mb'] = timed(lambda: engine.backbone_full(lr), runs, device)
        full = full_image_cost(build_network(dict(engine.net.branch_opts[-1])), *lr.shape[-2:], probe=table.patch)
        row['flops_ratio_full'] = {c: routed_flops[c] / full[c] for c in CONVENTIONS}
    engine.backbone_tiled(lr)  # warm-up (and the tile rule, measured once per engine)
    row['tiled_s'], row['tiled_peak_mb'] = timed(lambda: engine.backbone_tiled(lr), runs, device)
    row['tile'] = dataclasses.asdict(engine.tile_choice)
    row['fastest_backbone'] = 'tiled' if 'full_s' not in row or row['tiled_s'] <= row['full_s'] else 'full'
    row['time_ratio_fastest'] = row['routed_s'] / min(row['tiled_s'], row.get('full_s', float('inf')))
    if args.loop:
        row['loop_s'], _ = timed(lambda: engine.render_loop(lr, labels, grid), max(1, runs // 2), device)
    if args.max_batch_sweep:
        row['max_batch_sweep'] = {}
        chosen = engine.max_batch
        for size in (int(v) for v in args.max_batch_sweep.split(',')):
            engine.max_batch = size
            row['max_batch_sweep'][size], _ = timed(lambda: engine.render(lr, labels, grid), runs, device)
        engine.max_batch = chosen
    return row


def print_table(rows: dict, args, table) -> None:
    mix = args.mix or 'classifier argmax'
    print(f'\n{args.network.name}: LR {args.lr_size}, {args.threads} threads, median of {args.runs}, max_batch '
          f'{args.max_batch or "default"}, channels_last {not args.no_channels_last}, mix {mix}, tiling {args.tiling}')
    header = (f"{'image':<18}{'tiles':>6}{'routed s':>10}{'patch s':>9}{'t ratio':>9}{'F ratio':>9}{'eff.':>7}"
              f"{'full s':>9}{'t/full':>8}{'F/full':>8}{'tiled s':>9}{'t/fast':>8}{'loop s':>9}{'loop/rt':>8}"
              f"{'peak MB':>9}")
    print(header)
    for name, r in rows.items():
        t_patch = r['routed_s'] / r['patch_s']
        f_patch = r['flops_ratio_patch']['paper']
        line = (f"{name[:17]:<18}{r['patches']:>6}{r['routed_s']:>10.3f}{r['patch_s']:>9.3f}{t_patch:>9.3f}"
                f"{f_patch:>9.3f}{t_patch / f_patch:>7.2f}")
        if 'full_s' in r:
            line += f"{r['full_s']:>9.3f}{r['routed_s'] / r['full_s']:>8.3f}{r['flops_ratio_full']['paper']:>8.3f}"
        else:
            line += f"{'-':>9}{'-':>8}{'-':>8}"
        line += f"{r['tiled_s']:>9.3f}{r['time_ratio_fastest']:>8.3f}"
        line += f"{r['loop_s']:>9.2f}{r['loop_s'] / r['routed_s']:>8.1f}" if 'loop_s' in r else f"{'-':>9}{'-':>8}"
        print(line + f"{r['routed_peak_mb']:>9.0f}" + f"  classifier {100 * r['classify_s'] / r['routed_s']:.0f}%" +
              (f", pixels x{r['pixel_ratio']:.2f} in {r['regions']} regions" if 'pixel_ratio' in r else ''))
        if 'max_batch_sweep' in r:
            sweep = ', '.join(f'{size}: {seconds:.3f}s' for size, seconds in r['max_batch_sweep'].items())
            print(f'   render time by max_batch: {sweep}')
    print('t ratio = routed / backbone patch-wise time; F ratio = the same for FLOPs (paper convention, classifier '
          'included); eff. = t ratio / F ratio; t/full, F/full: against the backbone on the whole image; tiled s: '
          'the backbone in tiles with exact context (the same image); t/fast: routed / the faster of full and tiled; '
          f'MACs ratios are in --json. Classes per image: {[r["counts"] for r in rows.values()]}')


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    height, width = (int(v) for v in args.lr_size.lower().split('x'))
    net = build_network(network_options(args.network))
    if args.checkpoint:
        load_weights(net, args.checkpoint)
    table = cost_table(net, patch=32)
    options = EngineOptions(
        max_batch=args.max_batch,
        channels_last=not args.no_channels_last,
        tiling=args.tiling,
        halo=args.halo,
        tile=args.tile)
    engine = RoutedEngine(net, options, args.device)
    paper = RoutedEngine(net, dataclasses.replace(options, tiling='paper'), args.device)
    coefficients = engine.coefficients
    rows = {}
    for name, lr in load_inputs(args.images, args.limit, (height, width)):
        rows[name] = bench_image(engine, paper, table, coefficients, lr.to(engine.device), args)
        print(f'{name}: done', file=sys.stderr)
    print_table(rows, args, table)
    if args.json:
        args.json.write_text(json.dumps({'args': {k: str(v) for k, v in vars(args).items()}, 'rows': rows}, indent=2))
    return 0


if __name__ == '__main__':
    sys.exit(main())
