"""Shared test helpers: small routed networks, a small prepared set from real photos, demo option files,
subprocess runs."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import torch
from basicsr.archs import build_network

from cdnsr_plugin.data.prepared_set import GT_LMDB, LQ_LMDB
from cdnsr_plugin.preparation.prepare import PrepareOptions, build_reference, prepare
from cdnsr_plugin.utils.image import bicubic_resize
from cdnsr_plugin.utils.options import load_options, set_data, set_logging, set_schedule

REPO = Path(__file__).resolve().parents[1]
# a four-stage CDNSRModel schedule of 2 iterations per stage, with every kind of loss
# yapf: disable
FOUR_STAGES = {
    'optim_g': {'type': 'Adam', 'lr': 1e-3}, 'total_iter': 8,
    'scheduler': {'type': 'CosineAnnealingRestartLR', 'eta_min': 1e-7},
    'losses': {'pixel': {'type': 'L1Loss'}, 'flops': {'type': 'FLOPsRegLoss', 'alpha': 0.5},
               'kd': {'type': 'PixelKDLoss'}, 'class': {'type': 'ClassLoss'}, 'average': {'type': 'AverageLoss'}},
    'stages': [{'name': 'pretrain', 'iters': 2, 'losses': {'pixel': 1}},
               {'name': 'classifier', 'iters': 2, 'routing': 'gumbel', 'losses': {'pixel': 1, 'flops': 1}},
               {'name': 'distill', 'iters': 2, 'losses': {'pixel': 1, 'kd': 1}},
               {'name': 'finetune', 'iters': 2, 'losses': {'pixel': 2000, 'class': 1, 'average': 6}}],
}
# yapf: enable
# the tester's test network and LR sizes: odd, one tile, a single pixel, several rows of tiles, too small for
# SSIM after the crop
TESTER_NETWORK = {
    'type': 'CDNSRNet', 'scale': 4, 'classifier': {'type': 'PatchClassifier', 'num_classes': 3},
    'branches': [{'type': 'FSRCNN', 'd': d, 'upscale': 4} for d in (16, 36, 56)]
}
TESTER_LR_SIZES = {
    'a_97x250': (97, 250), 'b_33x31': (33, 31), 'c_1x1': (1, 1), 'd_200x260': (200, 260), 'e_4x4': (4, 4)
}
# tools/make_test_sets.py: tiers and (height, width) crops: 7 images -> sequential groups of 3, 2, 2. Image 4
# is narrower than 240 (kept as is); images 5 and 6 (8K tier, original size) are not multiples of 4
# (mod-cropped).
TIERS = '2K=160,4K=240,8K=0'
WIDTHS = {'2K': 160, '4K': 240, '8K': 0}
TIER_CROPS = [(300, 400), (300, 400), (240, 360), (300, 400), (150, 200), (303, 322), (300, 401)]

PHOTO_NAMES = ('astronaut', 'coffee', 'chelsea', 'rocket')  # 512x512, 400x600, 300x451, 427x640


def load_photos(limit: int = 4) -> list[np.ndarray]:
    """scikit-image's bundled colour photos as uint8 BGR arrays (OpenCV order, as BasicSR reads them)."""
    from skimage import data
    return [getattr(data, name)()[..., ::-1].copy() for name in PHOTO_NAMES[:limit]]


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    """Uniform [0, 1) values from a seeded generator."""
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def make_net(scale: int = 4, branches: list | None = None) -> torch.nn.Module:
    """A CDNSRNet in eval mode, seeded: FSRCNN 16/36/56 branches unless ``branches`` are given."""
    torch.manual_seed(0)
    branches = branches or [{'type': 'FSRCNN', 'd': d, 'upscale': scale} for d in (16, 36, 56)]
    return build_network({
        'type': 'CDNSRNet', 'classifier': {'type': 'PatchClassifier', 'num_classes': len(branches)},
        'branches': branches
    }).eval()


def brightness_router(net: torch.nn.Module, x: torch.Tensor) -> torch.nn.Module:
    """Set the classifier's weights so that it sends the brightest third of ``x`` to class 0, the
    darkest third to class 2 and the rest to class 1 (a deterministic stand-in for training)."""
    cls = net.classifier
    with torch.no_grad():
        for layer in cls.CondNet:
            if isinstance(layer, torch.nn.Conv2d):
                layer.weight.fill_(1.0 / layer.weight[0].numel())
                layer.bias.zero_()
        feature = cls.CondNet(x).mean(dim=(2, 3))[:, 0]  # every channel holds the same value
        lo, hi = torch.quantile(feature, 1 / 3), torch.quantile(feature, 2 / 3)
        cls.lastOut.weight.copy_(
            torch.tensor([[2.0], [1.0], [0.0]]).expand(3, cls.lastOut.in_features) / cls.lastOut.in_features)
        cls.lastOut.bias.copy_(torch.stack([-lo - hi, -lo, torch.zeros(())]))
    return net


def make_train_set(root: Path, photos: list) -> Path:
    """Difficulty-labelled LMDBs (bicubic reference, 3 classes) from crops of at most 300x400 of three photos."""
    hr = root / 'hr'
    hr.mkdir(parents=True)
    for i, photo in enumerate(photos[:3]):
        y, x = photo.shape[0] // 3, photo.shape[1] // 3
        cv2.imwrite(str(hr / f'{i}.png'), photo[y:y + 300, x:x + 400])
    out = root / 'train_x4'
    prepare(PrepareOptions(input=str(hr), output=str(out), workers=0), build_reference(4, 'cpu', bicubic=True))
    return out


def make_val_set(root: Path, photos: list) -> Path:
    """Two 96x120 HR crops and their x4 bicubic LR, in the layout tools/make_test_sets.py writes."""
    (root / 'HR').mkdir(parents=True)
    (root / 'LR_bicubic' / 'X4').mkdir(parents=True)
    for i, photo in enumerate(photos[-2:]):
        y, x = photo.shape[0] // 2, photo.shape[1] // 2
        gt = photo[y:y + 96, x:x + 120]
        cv2.imwrite(str(root / 'HR' / f'v{i}.png'), gt)
        cv2.imwrite(str(root / 'LR_bicubic' / 'X4' / f'v{i}.png'), bicubic_resize(gt, 0.25))
    return root


def demo_options(name: str,
                 run_name: str,
                 train_set: Path,
                 val_set: Path,
                 stage_iters: int = 2,
                 checkpoint_every: int = 1000) -> dict:
    """``options/demo/<name>`` pointed at the test data, with ``stage_iters`` iterations per stage (two
    stages' worth for a single-stage file), batch 8 in every stage, one validation at the end, no tensorboard."""
    opt = load_options(REPO / 'options' / 'demo' / name)
    opt['name'] = run_name
    lmdb = opt['datasets']['train']['io_backend']['type'] == 'lmdb'
    set_data(
        opt,
        train=(train_set / LQ_LMDB, train_set / GT_LMDB) if lmdb else None,
        val=(val_set / 'LR_bicubic' / 'X4', val_set / 'HR'),
        batch=8)
    for stage in opt['train'].get('stages') or []:
        stage.pop('batch_size_per_gpu', None)
    set_schedule(opt, stage_iters if opt['train'].get('stages') else stage_iters * 2)
    # validate once, at the end (BasicSR always does)
    set_logging(opt, print_freq=1, checkpoint_freq=checkpoint_every, val_freq=10**6, tensorboard=False)
    return opt


def run(args: list, cwd: Path, timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, 'CUDA_VISIBLE_DEVICES': '', 'OMP_NUM_THREADS': '1'}
    result = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=timeout)
    if check:
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result


def read_log(folder: Path) -> str:
    return '\n'.join(path.read_text() for path in sorted(folder.glob('*.log')))


def read_png(path: Path) -> np.ndarray:
    """An 8-bit 3-channel image as written (asserts that it is one)."""
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert img is not None and img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3, path
    return img


def matlab_bicubic(img: np.ndarray, factor: float) -> np.ndarray:
    """Independent oracle: basicsr's imresize, uint8 -> float [0, 1] -> uint8."""
    from basicsr.utils.matlab_functions import imresize
    out = imresize(img.astype(np.float64) / 255.0, factor)
    return np.clip(np.round(out * 255.0), 0, 255).astype(np.uint8)


def write_tester_pairs(root: Path, photos: list) -> tuple[Path, torch.nn.Module]:
    """``root/net.pth`` and ``net.yml`` (TESTER_NETWORK, seeded) and LR/HR pairs of TESTER_LR_SIZES in
    ``root/lr`` and ``root/hr``; returns ``root`` and the network."""
    import yaml
    torch.manual_seed(0)
    net = build_network(dict(TESTER_NETWORK))
    torch.save({'params': net.state_dict()}, root / 'net.pth')
    (root / 'net.yml').write_text(yaml.safe_dump({'network_g': TESTER_NETWORK}))
    lr_dir, hr_dir = root / 'lr', root / 'hr'
    lr_dir.mkdir()
    hr_dir.mkdir()
    for i, (name, (h, w)) in enumerate(TESTER_LR_SIZES.items()):
        photo = photos[i % len(photos)]
        grow = max(1.0, (4 * h + 100) / photo.shape[0], (4 * w + 100) / photo.shape[1])
        photo = cv2.resize(photo, None, fx=grow, fy=grow, interpolation=cv2.INTER_CUBIC) if grow > 1 else photo
        hr = photo[100:100 + 4 * h, 100:100 + 4 * w]
        cv2.imwrite(str(hr_dir / f'{name}.png'), hr)
        # basicsr's MATLAB imresize needs a few pixels of support; the tiny images use OpenCV's area filter
        lr = bicubic_resize(hr, 0.25) if min(h, w) >= 8 else cv2.resize(hr, (w, h), interpolation=cv2.INTER_AREA)
        cv2.imwrite(str(lr_dir / f'{name}.png'), lr)
    return root, net
