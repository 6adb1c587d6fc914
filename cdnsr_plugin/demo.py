"""``cdnsr-demo`` (``python -m cdnsr_plugin.demo``): from install to a routed SR result in one command.

Runs the whole pipeline on photos that ship with scikit-image (nothing is downloaded):

1. photos: astronaut, chelsea, rocket, hubble_deep_field and the left motorcycle view train; ``coffee``
   is held out for testing;
2. ``prepare``: the training photos become difficulty-classified LR/HR sub-image LMDBs
   (``tools/prepare_data.py``'s pipeline; the difficulty reference is bicubic upsampling, since no
   pretrained network can be assumed on a fresh machine);
3. ``train``: a small CDNSR-FSRCNN through the real staged pipeline (``python -m cdnsr_plugin.train`` with
   ``options/demo/train_CDNSR_FSRCNN_demo.yml``'s schedule: the backbone, branches pruned from it, classifier,
   distill, finetune);
4. ``test``: ``tools/test_patches.py`` on the held-out photo with ``--compare-backbone`` and a budget
   sweep, which writes the SR image, the class map, report.json/csv and the PSNR-FLOPs plot.

``--quick`` shrinks the training photos and the schedule (550 iterations instead of 2,400): 31 s instead of
3 min 15 s on 2 CPU cores (measured 2026-11-29, README); CI runs it. Everything is written
under ``--work`` (default ``cdnsr_demo``); a folder left by an earlier demo is replaced, any other existing
folder is refused.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import cv2
import numpy as np

MARKER = '.cdnsr_demo'
QUICK_ENV = 'CDNSR_DEMO_QUICK'
TRAIN_PHOTOS = ('astronaut', 'chelsea', 'rocket', 'hubble_deep_field', 'motorcycle_left')
HELD_OUT = 'coffee'
DEMO_OPTIONS = 'train_CDNSR_FSRCNN_demo.yml'  # options/demo/; installed into cdnsr_plugin/options/ by setup.py
SWEEP = '0.35,0.5,0.65,0.8'
SAVED = 'budget=0.50'  # the setting whose SR image and class map are written


@dataclass(frozen=True)
class Schedule:
    """Size of one demo run."""

    max_side: int  # photos are shrunk to at most this many pixels per side
    stages: tuple[int,
                  ...]  # iterations of the demo file's stages: backbone, pruned branches, classifier, distill, finetune
    batch: int


FULL = Schedule(max_side=1000, stages=(800, 400, 500, 200, 500), batch=16)
QUICK = Schedule(max_side=320, stages=(200, 100, 100, 50, 100), batch=8)


def bundled_photos() -> dict[str, np.ndarray]:
    """scikit-image's bundled colour photos as uint8 BGR arrays."""
    from skimage import data
    photos = {name: getattr(data, name)() for name in TRAIN_PHOTOS + (HELD_OUT, ) if hasattr(data, name)}
    if 'motorcycle_left' not in photos:  # older and newer scikit-image name it differently
        photos['motorcycle_left'] = data.stereo_motorcycle()[0]
    return {name: np.ascontiguousarray(img[..., ::-1]) for name, img in photos.items()}


def shrink(img: np.ndarray, max_side: int) -> np.ndarray:
    factor = max_side / max(img.shape[:2])
    return img if factor >= 1 else cv2.resize(img, None, fx=factor, fy=factor, interpolation=cv2.INTER_AREA)


def start(work: Path) -> None:
    """Create ``work``; replace it only if an earlier demo made it."""
    if work.exists():
        if not (work / MARKER).is_file():
            raise FileExistsError(f'{work} exists and was not made by the demo; pass another --work folder')
        shutil.rmtree(work)
    work.mkdir(parents=True)
    (work / MARKER).write_text('made by cdnsr_plugin.demo; safe to delete\n')


def write_photos(work: Path, schedule: Schedule) -> tuple[Path, Path, Path]:
    """Training photos, and the held-out photo as an LR/HR pair (HR cropped to a multiple of 4)."""
    from cdnsr_plugin.utils.image import bicubic_resize, mod_crop
    from cdnsr_plugin.utils.io import write_image
    train, hr_dir, lr_dir = work / 'photos', work / 'test' / 'HR', work / 'test' / 'LR_bicubic' / 'X4'
    for folder in (train, hr_dir, lr_dir):
        folder.mkdir(parents=True)
    photos = bundled_photos()
    for name in TRAIN_PHOTOS:
        write_image(train / f'{name}.png', shrink(photos[name], schedule.max_side))
    hr = mod_crop(photos[HELD_OUT], 4)  # 600x400 at most: tested at full size in both modes
    write_image(hr_dir / f'{HELD_OUT}.png', hr)
    write_image(lr_dir / f'{HELD_OUT}.png', bicubic_resize(hr, 0.25))
    return train, hr_dir, lr_dir


def prepare_set(photos: Path, out: Path) -> dict:
    from cdnsr_plugin.preparation.prepare import PrepareOptions, build_reference, prepare
    return prepare(
        PrepareOptions(input=str(photos), output=str(out), workers=0),
        build_reference(4, 'cpu', bicubic=True),
        montage=True)


def demo_options_file() -> Path:
    """options/demo/train_CDNSR_FSRCNN_demo.yml: in the installed package, or in the source tree."""
    here = Path(__file__).resolve().parent
    for candidate in (here / 'options' / DEMO_OPTIONS, here.parent / 'options' / DEMO_OPTIONS):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f'{DEMO_OPTIONS} is neither in {here / "options"} nor in the source tree; reinstall '
                            'with pip install .')


def training_options(work: Path, train_set: Path, hr_dir: Path, lr_dir: Path, schedule: Schedule) -> Path:
    """The demo option file with this run's data, schedule and batch size."""
    from cdnsr_plugin.data.prepared_set import GT_LMDB, LQ_LMDB
    from cdnsr_plugin.utils.options import load_options, set_data, set_logging, set_schedule, write_options
    opt = load_options(demo_options_file())
    opt['name'] = 'CDNSR_FSRCNN_x4_demo'
    set_data(opt, train=(train_set / LQ_LMDB, train_set / GT_LMDB), val=(lr_dir, hr_dir), batch=schedule.batch)
    total = set_schedule(opt, schedule.stages)
    set_logging(opt, print_freq=max(10, total // 20), checkpoint_freq=total, val_freq=total)
    return write_options(work / 'train_CDNSR_FSRCNN_demo.yml', opt)


def train(options: Path, work: Path) -> Path:
    """Train through BasicSR's pipeline (as ``python -m cdnsr_plugin.train -opt``); the latest checkpoint."""
    subprocess.run([sys.executable, '-m', 'cdnsr_plugin.train', '-opt', str(options)], cwd=work, check=True)
    checkpoint = work / 'experiments' / 'CDNSR_FSRCNN_x4_demo' / 'models' / 'net_g_latest.pth'
    if not checkpoint.is_file():
        raise RuntimeError(f'training finished without writing {checkpoint}; see the log above')
    return checkpoint


def test(checkpoint: Path, hr_dir: Path, lr_dir: Path, out: Path) -> int:
    """``tools/test_patches.py`` on the held-out photo (the network is read from the experiment folder)."""
    from cdnsr_plugin.tester.cli import main as test_patches
    return test_patches([
        '--input',
        str(lr_dir), '--gt',
        str(hr_dir), '--checkpoint',
        str(checkpoint), '--scale', '4', '--name', 'demo', '--out',
        str(out), '--compare-backbone', '--sweep', SWEEP, '--save-setting', SAVED
    ])


def run(work: Path, schedule: Schedule) -> dict[str, Path]:
    """The four steps; returns the files a user looks at."""
    timings: dict[str, float] = {}

    def step(name: str, fn, *args):
        print(f'\n=== {name} ===', flush=True)
        began = time.perf_counter()
        result = fn(*args)
        timings[name] = time.perf_counter() - began
        return result

    work = work.resolve()  # training runs in a subprocess with work as its cwd
    start(work)
    photos, hr_dir, lr_dir = step('photos', write_photos, work, schedule)
    summary = step('prepare', prepare_set, photos, work / 'demo_x4')
    print(f"{summary['num_pairs']} sub-image pairs in {work / 'demo_x4'}")
    options = training_options(work, work / 'demo_x4', hr_dir, lr_dir, schedule)
    checkpoint = step('train', train, options, work)
    out = work / 'results'
    code = step('test', test, checkpoint, hr_dir, lr_dir, out)
    if code != 0:
        raise RuntimeError(f'test_patches.py exited with status {code}; see above')
    saved = next(s for s in json.loads((out / 'report.json').read_text())['settings'] if s['name'] == SAVED)
    files = {
        'SR image': Path(saved['images'][0]['sr_path']), 'class map': Path(saved['images'][0]['overlay_path']),
        'report': out / 'report.json', 'PSNR-FLOPs plot': out / 'psnr_flops.png', 'checkpoint': checkpoint,
        'training options': options, 'difficulty montage': work / 'demo_x4' / 'montage.png'
    }
    steps = ', '.join(f'{name} {seconds:.0f}s' for name, seconds in timings.items())
    print(f'\n=== done in {steps} (total {sum(timings.values()):.0f}s) ===')
    for label, path in files.items():
        print(f'{label:>20}: {path}')
    return files


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--work', type=Path, default=Path('cdnsr_demo'), help='output folder (default cdnsr_demo)')
    parser.add_argument(
        '--quick',
        action='store_true',
        help='small photos and a short schedule (under a minute); '
        f'also set by {QUICK_ENV}=1, which CI uses to run README\'s first command quickly')
    args = parser.parse_args(argv)
    args.quick = args.quick or os.environ.get(QUICK_ENV) == '1'
    import cdnsr_plugin  # noqa: F401  (registers the plugin; torchvision alias before basicsr)
    try:
        run(args.work, QUICK if args.quick else FULL)
    except (FileExistsError, RuntimeError, subprocess.CalledProcessError) as exc:
        print(f'error: {exc}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
