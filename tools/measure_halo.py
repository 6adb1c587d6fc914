"""How much context the seam-free engine needs: backbone-only PSNR against the whole image, per halo.

    python tools/measure_halo.py --network experiments/cpu_repro/options/ours__joint_branches__oracle_router.yml \\
        --checkpoint <net_g_latest.pth> --lr <LR folder> --hr <HR folder> --halos 0,1,2,4,6,8
    python tools/measure_halo.py --network options/networks/CDNSR_CARN_x4.yml \
        --backbone experiments/halo_CARN/models/net_g_latest.pth --lr <LR folder> --hr <HR folder> --halos 1,2,3,4,6,8

For every LR/HR pair (HR exactly ``scale`` x LR) and every halo: the largest branch on every cell
(``tiling: regions``, the given halo), its PSNR on Y (BasicSR's, ``crop_border = scale``) minus the PSNR of
the same branch on the whole image; and the papers' tiling (32/28, averaged overlaps) beside it. Then, per
halo, the processed / image pixel ratio under a Laplacian 3-class map (the flattest 60% of cells to branch 0,
the next 25% to branch 1, the rest to branch 2, as ``tools/benchmark.py --mix 0.6,0.25,0.15``). The
smallest halo whose mean PSNR difference is within ``--tolerance`` dB (default 0.01) is printed as the default
to use; the measured receptive radius (exact) is printed too. Writes ``--json`` if given.
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from basicsr.metrics import calculate_psnr
from basicsr.utils import tensor2img
from tqdm import tqdm

import cdnsr_plugin  # noqa: F401  (registers the archs)
from cdnsr_plugin.analysis.run import load_routed
from cdnsr_plugin.inference.engine import EngineOptions, RoutedEngine
from cdnsr_plugin.inference.laplacian import laplacian_scores
from cdnsr_plugin.inference.policies import forced_mix_labels
from cdnsr_plugin.inference.regions import receptive_radius
from cdnsr_plugin.tester.config import network_options
from cdnsr_plugin.utils.checkpoint import load_weights
from cdnsr_plugin.utils.image import to_tensor
from cdnsr_plugin.utils.io import list_images, read_image, write_json


def psnr_y(sr: torch.Tensor, gt: np.ndarray, scale: int) -> float:
    return float(calculate_psnr(tensor2img(sr.cpu(), rgb2bgr=True), gt, scale, test_y_channel=True))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--network', type=Path, required=True, help='option file with a CDNSRNet network_g')
    weights = parser.add_mutually_exclusive_group(required=True)
    weights.add_argument('--checkpoint', type=Path, help='weights of the routed network')
    weights.add_argument(
        '--backbone',
        type=Path,
        help='weights of a single network (e.g. BasicSR SRModel training) put as the largest branch; only it is '
        'measured, the other parts stay random')
    parser.add_argument('--lr', type=Path, required=True)
    parser.add_argument('--hr', type=Path, required=True)
    parser.add_argument('--halos', default='0,1,2,4,6,8')
    parser.add_argument('--tolerance', type=float, default=0.01)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--json', type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    net = load_routed(network_options(args.network), args.checkpoint)
    if args.backbone:
        load_weights(net.branches[-1], args.backbone)
    halos = [int(v) for v in args.halos.split(',')]
    engines = {h: RoutedEngine(net, EngineOptions(tiling='regions', halo=h), 'cpu') for h in halos}
    paper = RoutedEngine(net, EngineOptions(tiling='paper'), 'cpu')
    backbone = net.num_classes - 1
    rows = {h: {'delta_db': [], 'pixel_ratio': []} for h in halos}
    paper_delta, full_psnr = [], []
    for path in tqdm(list_images(args.lr), desc='images', unit='image', file=sys.stderr):
        lr_img, _ = read_image(path)
        hr_path = args.hr / path.name
        if not hr_path.is_file():
            parser.error(f'{hr_path}: no HR image of that name for {path}; --hr must hold one per LR image')
        gt, _ = read_image(hr_path)
        if gt.shape[:2] != (net.scale * lr_img.shape[0], net.scale * lr_img.shape[1]):
            parser.error(f'{hr_path} is {gt.shape[1]}x{gt.shape[0]}, not {net.scale}x the LR {path} '
                         f'({lr_img.shape[1]}x{lr_img.shape[0]}); crop the HR to scale x LR')
        lr = to_tensor(lr_img)
        full = psnr_y(paper.backbone_full(lr), gt, net.scale)
        full_psnr.append(full)
        paper_delta.append(psnr_y(paper.backbone_patchwise(lr), gt, net.scale) - full)
        for h, engine in engines.items():
            grid = engine.grid(lr)
            everything = torch.full((len(grid), ), backbone, dtype=torch.long)
            rows[h]['delta_db'].append(psnr_y(engine.render(lr, everything, grid), gt, net.scale) - full)
            scores = engine.map_tiles(lr, lambda tiles: laplacian_scores(tiles.float()).cpu(), grid)
            mix = forced_mix_labels(scores, [0.6, 0.25, 0.15])
            rows[h]['pixel_ratio'].append(engine.plan(lr, mix).pixel_ratio())
    radius = receptive_radius(net.branches[-1], size=128)
    print(f'\n{args.checkpoint or args.backbone}: largest branch, {len(paper_delta)} images, '
          f'{np.mean(full_psnr):.3f} dB (Y) on the whole image; measured receptive radius {radius} px')
    print('| halo | PSNR(Y) - whole image, mean (worst) dB | processed / image pixels, Laplacian 60/25/15 |')
    print('| --- | --- | --- |')
    print(f'| papers\' tiling 32/28 | {np.mean(paper_delta):+.4f} ({min(paper_delta):+.4f}) | 1.31 nominal |')
    chosen = None
    summary = {}
    for h in halos:
        delta, ratio = rows[h]['delta_db'], rows[h]['pixel_ratio']
        summary[h] = {
            'mean_delta_db': float(np.mean(delta)), 'worst_delta_db': float(min(delta)),
            'pixel_ratio': float(np.mean(ratio))
        }
        print(f'| {h} | {np.mean(delta):+.4f} ({min(delta):+.4f}) | {np.mean(ratio):.3f} |')
        if chosen is None and abs(np.mean(delta)) <= args.tolerance and abs(min(delta)) <= 2 * args.tolerance:
            chosen = h
    print(f'smallest halo within {args.tolerance} dB (mean; worst image within twice that): {chosen}')
    if args.json:
        write_json(
            args.json, {
                'radius': radius, 'chosen': chosen, 'halos': summary, 'paper_mean_delta_db': float(
                    np.mean(paper_delta)), 'full_image_psnr_y': float(np.mean(full_psnr))
            })
    return 0


if __name__ == '__main__':
    sys.exit(main())
