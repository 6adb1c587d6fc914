"""``cdnsr-demo`` (``python -m cdnsr_plugin.demo``): from install to a routed SR result in one command.

``cdnsr-demo`` (under a minute, nothing downloaded) super-resolves the colour photos that ship with
scikit-image (astronaut, chelsea, coffee, rocket, hubble_deep_field, motorcycle_left; each x4-downscaled with
MATLAB's bicubic, the original kept as ground truth) with the shipped reference model
(``cdnsr_plugin/weights/``, ``--model``), through ``tools/test_patches.py --compare-backbone`` with the model's
default routing (its manifest's; ``cdnsr_carn_x4``: a set budget of 0.59 over the photos), and prints side by side
the routed result and the same model's backbone (its largest branch) on the whole image: PSNR (Y), executed
FLOPs, wall time; then where the SR images, the class maps and the report are.

``cdnsr-demo --train`` runs the whole training pipeline instead, on the same photos:

1. photos: astronaut, chelsea, rocket, hubble_deep_field and the left motorcycle view train; ``coffee``
   is held out for testing;
2. ``prepare``: the training photos become difficulty-classified LR/HR sub-image LMDBs
   (``tools/prepare_data.py``'s pipeline; the difficulty reference is bicubic upsampling, since no
   pretrained network can be assumed on a fresh machine);
3. ``train``: a small CDNSR-FSRCNN (branches d = 16, 36, 56) through the real staged pipeline (``python -m
   cdnsr_plugin.train``) with this plugin's recipe (``options/demo/train_CDNSR_FSRCNN_oracle_demo.yml``,
   docs/RESULTS.md "How the recipe was chosen"): the three branches trained together on every sub-image, then
   the classifier alone on oracle labels (``OracleLabelLoss``: per sub-image, the branch worth its cost at
   half the backbone's FLOPs);
4. ``test``: ``tools/test_patches.py`` on the held-out photo with ``--compare-backbone`` and a budget
   sweep, which writes the SR image, the class map, report.json/csv and the PSNR-FLOPs plot.

``--train --quick`` shrinks the training photos and the schedule (550 iterations instead of 2,400; times in
README); CI runs it (``CDNSR_DEMO_QUICK=1`` makes
``cdnsr-demo`` run both: the shipped model, then the quick training). Everything is written under ``--work``
(default ``cdnsr_demo``); a folder left by an earlier demo is replaced, any other existing folder is refused.
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
DEMO_OPTIONS = 'train_CDNSR_FSRCNN_oracle_demo.yml'  # options/demo/; installed into cdnsr_plugin/options/ by setup.py
SWEEP = '0.35,0.5,0.65,0.8'
SAVED = 'budget=0.50'  # the setting whose SR image and class map are written


@dataclass(frozen=True)
class Schedule:
    """Size of one demo run."""

    max_side: int  # photos are shrunk to at most this many pixels per side
    stages: tuple[int, int]  # iterations of the demo file's stages: all branches, then the classifier
    batch: int


FULL = Schedule(max_side=1000, stages=(2000, 400), batch=16)
QUICK = Schedule(max_side=320, stages=(450, 100), batch=8)


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
    from cdnsr_plugin.utils.io import write_bicubic_pair, write_image
    train, hr_dir, lr_dir = work / 'photos', work / 'test' / 'HR', work / 'test' / 'LR_bicubic' / 'X4'
    for folder in (train, hr_dir, lr_dir):
        folder.mkdir(parents=True)
    photos = bundled_photos()
    for name in TRAIN_PHOTOS:
        write_image(train / f'{name}.png', shrink(photos[name], schedule.max_side))
    write_bicubic_pair(photos[HELD_OUT], HELD_OUT, hr_dir, lr_dir, 4)  # 600x400 at most: full size in both modes
    return train, hr_dir, lr_dir


def prepare_set(photos: Path, out: Path) -> dict:
    from cdnsr_plugin.preparation.prepare import PrepareOptions, build_reference, prepare
    return prepare(
        PrepareOptions(input=str(photos), output=str(out), workers=0),
        build_reference(4, 'cpu', bicubic=True),
        montage=True)


def demo_options_file() -> Path:
    """options/demo/``DEMO_OPTIONS``: in the installed package, or in the source tree."""
    here = Path(__file__).resolve().parent
    for candidate in (here / 'options' / DEMO_OPTIONS, here.parent / 'options' / 'demo' / DEMO_OPTIONS):
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


def write_pairs(work: Path) -> tuple[Path, Path]:
    """Every bundled photo as ground truth (cropped to a multiple of 4) and its MATLAB-bicubic x4 LR."""
    from cdnsr_plugin.utils.io import write_bicubic_pair
    hr_dir, lr_dir = work / 'photos' / 'HR', work / 'photos' / 'LR_bicubic' / 'X4'
    for name, photo in bundled_photos().items():
        write_bicubic_pair(photo, name, hr_dir, lr_dir, 4)
    return lr_dir, hr_dir


def comparison(report: dict) -> str:
    """The routed result beside the backbone on the whole image, in tiles with exact context (the same image,
    often faster on a CPU) and on the papers' tiles; time against the faster of the first two."""
    rows = []
    for kind, label in (('routed', 'routed (this model)'), ('backbone-full', 'backbone, whole image'),
                        ('backbone-tiled', 'backbone, exact tiles'), ('backbone-patch', "backbone, papers' tiles")):
        setting = next(s for s in report['settings'] if s['kind'] == kind)
        row = setting['sets'][0]
        rows.append((label, row['psnr_y'], row['psnr'], row['flops']['paper']['percent_of_full_image'], row['time_s']))
    lines = [f"{'':<26}{'PSNR Y':>10}{'PSNR RGB':>10}{'FLOPs executed':>16}{'wall time':>11}"]
    lines += [
        f'{label:<26}{psnr:>7.3f} dB{rgb:>7.3f} dB{flops:>15.1f}%{time:>10.2f}s'
        for label, psnr, rgb, flops, time in rows
    ]
    routed, full, tiled = rows[0], rows[1], rows[2]
    fastest = min((full, tiled), key=lambda row: row[4])
    lines.append(f'routed vs whole image: Y {routed[1] - full[1]:+.3f} dB, RGB {routed[2] - full[2]:+.3f} dB, '
                 f'{routed[3] / full[3]:.2f}x the FLOPs; {routed[4] / fastest[4]:.2f}x the time of the faster '
                 f'backbone ({fastest[0]}; {report["threads"]} threads)')
    return '\n'.join(lines)


def run_shipped(work: Path, model: str) -> dict[str, Path]:
    """The shipped model on the bundled photos, against its backbone on the whole image."""
    from cdnsr_plugin import weights
    from cdnsr_plugin.tester.cli import main as test_patches
    began = time.perf_counter()
    work = work.resolve()
    start(work)
    lr_dir, hr_dir = write_pairs(work)
    out = work / 'results'
    code = test_patches([
        '--input',
        str(lr_dir), '--gt',
        str(hr_dir), *weights.tester_args(model), '--compare-backbone', '--name', model, '--out',
        str(out)
    ])
    if code != 0:
        raise RuntimeError(f'test_patches.py exited with status {code}; see above')
    report = json.loads((out / 'report.json').read_text())
    routed = next(s for s in report['settings'] if s['kind'] == 'routed')
    first = routed['images'][0]
    files = {
        'SR images': Path(first['sr_path']).parent, 'class map (e.g.)': Path(first['overlay_path']),
        'report': out / 'report.json'
    }
    print(f'\n=== {model}, routed by {weights.routing(model)}, on {len(routed["images"])} bundled photos (x4), '
          f'{time.perf_counter() - began:.0f}s ===')
    print(comparison(report))
    for label, path in files.items():
        print(f'{label:>20}: {path}')
    return files


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--work', type=Path, default=Path('cdnsr_demo'), help='output folder (default cdnsr_demo)')
    parser.add_argument(
        '--model', default=None, help='shipped model to run (default: cdnsr_plugin.weights.DEFAULT_MODEL)')
    parser.add_argument('--train', action='store_true', help='run the training pipeline instead (minutes)')
    parser.add_argument(
        '--quick',
        action='store_true',
        help='with --train: small photos and a short schedule (under a minute); '
        f'{QUICK_ENV}=1 (CI) runs the shipped model, then the quick training')
    args = parser.parse_args(argv)
    if args.quick and not args.train:
        parser.error('--quick shortens the training demo: use it with --train (cdnsr-demo --train --quick)')
    ci = os.environ.get(QUICK_ENV) == '1'
    import cdnsr_plugin  # noqa: F401  (registers the plugin; torchvision alias before basicsr)
    from cdnsr_plugin import weights
    try:
        if ci:  # both runs go below one folder, which is the demo's too
            start(args.work)
        if not args.train or ci:
            run_shipped(args.work / 'shipped' if ci else args.work, args.model or weights.DEFAULT_MODEL)
        if args.train or ci:
            run(args.work / 'train' if ci else args.work, QUICK if args.quick or ci else FULL)
    except (FileExistsError, RuntimeError, ValueError, subprocess.CalledProcessError) as exc:
        print(f'error: {exc}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
