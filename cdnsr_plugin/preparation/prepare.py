"""Build a difficulty-classified training set of LR/HR sub-images as paired LMDBs.

ClassSR Sec. 3.1 / 3.7 / 4.1.1 and CDNSR Sec. III-D / IV-A: HR photos (optionally reduced to
0.6, 0.7, 0.8, 0.9 of their size) are mod-cropped, downsampled by ``scale`` with MATLAB-compatible
bicubic (basicsr's ``imresize``), cut into LR sub-images (32x32, stride 16) and the matching HR
sub-images; each pair gets the PSNR that a reference SR network reaches on it, and the pairs are
split by rank into M equal classes: class 0 = highest PSNR ("simple", smallest branch), class
M-1 = lowest PSNR ("hard", the backbone).

Output folder (all written under ``<output>.incomplete`` and renamed only when complete, so an
interrupted run is never mistaken for a finished one):

* ``lq.lmdb``, ``gt.lmdb``: written with ``basicsr.utils.lmdb_util.LmdbMaker`` (PNG bytes,
  ``meta_info.txt``), so BasicSR's own ``PairedImageDataset`` with ``io_backend: lmdb`` reads them.
* ``labels.txt``: ``key label psnr`` per pair, in key order.
* ``summary.json``: ``complete: true``, the tool that wrote it, counts and PSNR range per class, the reference used,
  the options, skipped files with reasons, conversions applied.
* ``montage.png`` (``--montage``): sample HR sub-images per class with their PSNR.

Choices where the papers are silent (also in ``--help``):

* PSNR is BasicSR's: Y channel, on the SR output rounded to 8 bits, ``crop_border = scale``
  (BasicSR's validation default), computed by ``calculate_psnr_pt`` in batches.
* The edge of each image is covered like the tester covers it: the last sub-image of a row or
  column is aligned to the border (``PatchGrid``), so no strip of the image is ignored.
* Ties in PSNR are broken by key, so the split is deterministic.
* The ``bicubic`` reference (PyTorch bicubic upsampling, no network) is a fallback that must be
  asked for explicitly; ``summary.json`` records which reference produced the labels.
"""
from __future__ import annotations

import re
import time
from contextlib import closing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import cv2
import numpy as np
import torch
from basicsr.metrics.psnr_ssim import calculate_psnr_pt
from basicsr.utils.lmdb_util import LmdbMaker
from tqdm import tqdm

from cdnsr_plugin.data.prepared_set import GT_LMDB, LABELS, LQ_LMDB, PreparedSet, write_labels, write_summary
from cdnsr_plugin.inference.tiling import PatchGrid
from cdnsr_plugin.preparation.parallel import process_map
from cdnsr_plugin.preparation.staging import PREPARE_TOOL, abandon_output, finish_output, start_output, tool_marker
from cdnsr_plugin.utils.image import bicubic_resize, mod_crop
from cdnsr_plugin.utils.io import SkipImage, Skipped, list_images, read_image


@dataclass(frozen=True)
class PrepareOptions:
    """Everything that defines a prepared set; stored in ``summary.json``."""

    input: str
    output: str
    scale: int = 4
    patch: int = 32
    stride: int = 16
    num_classes: int = 3
    multiscale: tuple[float, ...] = (1.0, )
    compress_level: int = 1
    batch: int = 128
    workers: int = 2
    device: str = 'cpu'

    def validate(self) -> None:
        checks = [
            (self.scale in (2, 3, 4, 8), f'--scale must be 2, 3, 4 or 8, got {self.scale}'),
            (self.patch >= 4, f'--patch must be at least 4, got {self.patch}'),
            (1 <= self.stride <= self.patch, f'--stride must be in 1..patch ({self.patch}), got {self.stride}'),
            (2 <= self.num_classes <= 5, f'--classes must be 2 to 5, got {self.num_classes}'),
            (min(self.multiscale) > 0
             and max(self.multiscale) <= 1, f'--multiscale factors must be in (0, 1], got {self.multiscale}'),
            (0 <= self.compress_level <= 9, f'--compress-level must be 0..9, got {self.compress_level}'),
            (self.workers >= 0, f'--workers must be >= 0, got {self.workers}'),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


# ----------------------------------------------------------------------------------------------
# Reading and resizing (runs in worker processes)


@dataclass
class LoadedImage:
    """One input photo, as HR/LR pairs at each multiscale factor, or the reason it was skipped."""

    path: str
    pairs: list[tuple[float, np.ndarray, np.ndarray]] = field(default_factory=list)  # (factor, lr, hr)
    notes: list[str] = field(default_factory=list)
    skipped: Optional[str] = None


def load_pairs(path: str, scale: int, patch: int, multiscale: Sequence[float]) -> LoadedImage:
    """Read ``path`` and make (LR, HR) at every multiscale factor large enough for one patch."""
    hr_patch = patch * scale
    try:
        img, notes = read_image(path, min_size=hr_patch)
    except SkipImage as exc:
        return LoadedImage(path, skipped=str(exc))
    loaded = LoadedImage(path, notes=notes)
    for factor in multiscale:
        hr = img if factor == 1.0 else bicubic_resize(img, factor)
        hr = mod_crop(hr, scale)
        if min(hr.shape[:2]) < hr_patch:
            loaded.notes.append(f'x{factor} copy smaller than one HR patch; left out')
            continue
        loaded.pairs.append((factor, bicubic_resize(hr, 1.0 / scale), hr))
    if not loaded.pairs:
        loaded.skipped = f'no multiscale copy holds one {hr_patch}x{hr_patch} HR patch'
    return loaded


# ----------------------------------------------------------------------------------------------
# Sub-images and scores


def safe_stem(path: str) -> str:
    """ASCII-only key stem (LMDB keys are ASCII; BasicSR splits meta_info keys at the first dot)."""
    return re.sub(r'[^A-Za-z0-9_-]+', '-', Path(path).stem).strip('-') or 'image'


def cut_pairs(lr: np.ndarray, hr: np.ndarray, scale: int, patch: int,
              stride: int) -> tuple[list[tuple[int, int]], np.ndarray, np.ndarray]:
    """LR/HR sub-image pairs covering the whole LR image (last row/column aligned to the border)."""
    grid = PatchGrid.for_image(lr.shape[0], lr.shape[1], patch, stride)
    positions = [(y, x) for y in grid.ys for x in grid.xs]
    lr_subs = np.stack([lr[y:y + patch, x:x + patch] for y, x in positions])
    hr_subs = np.stack([hr[y * scale:(y + patch) * scale, x * scale:(x + patch) * scale] for y, x in positions])
    return positions, lr_subs, hr_subs


def _bgr_batch_to_rgb_tensor(batch: np.ndarray, device: str) -> torch.Tensor:
    return torch.from_numpy(batch[..., ::-1].copy()).permute(0, 3, 1, 2).to(device).float().div_(255.0)


class Reference:
    """The SR network whose PSNR ranks sub-images by difficulty, or PyTorch bicubic (``net=None``)."""

    def __init__(self, net: Optional[torch.nn.Module], description: dict, scale: int, device: str = 'cpu'):
        self.net = net.to(device).eval() if net is not None else None
        self.description, self.scale, self.device = description, scale, device

    @torch.inference_mode()
    def psnr(self, lr_subs: np.ndarray, hr_subs: np.ndarray) -> np.ndarray:
        """Y-channel PSNR (BasicSR's, crop_border = scale) of the reference's SR of each pair."""
        lr = _bgr_batch_to_rgb_tensor(lr_subs, self.device)
        hr = _bgr_batch_to_rgb_tensor(hr_subs, self.device)
        if self.net is None:
            sr = torch.nn.functional.interpolate(lr, scale_factor=self.scale, mode='bicubic', align_corners=False)
        else:
            sr = self.net(lr)
        if sr.shape != hr.shape:
            raise ValueError(f'the reference network maps {tuple(lr.shape[-2:])} to {tuple(sr.shape[-2:])}, '
                             f'expected x{self.scale}: check its upscale option')
        sr = sr.clamp(0, 1).mul(255).round().div(255)  # as BasicSR's tensor2img + uint8 PSNR
        return calculate_psnr_pt(sr, hr, crop_border=self.scale, test_y_channel=True).cpu().numpy()


# ----------------------------------------------------------------------------------------------
# Classes


def assign_classes(psnr: np.ndarray, keys: Sequence[str], num_classes: int) -> np.ndarray:
    """Labels by rank: the highest-PSNR 1/M is class 0 (simple), the lowest class M-1 (hard).

    Classes differ in size by at most one. Ties are broken by key for determinism.
    """
    order = sorted(range(len(keys)), key=lambda i: (-float(psnr[i]), keys[i]))
    labels = np.empty(len(keys), dtype=np.int64)
    for label, members in enumerate(np.array_split(np.asarray(order, dtype=np.int64), num_classes)):
        labels[members] = label
    return labels


def class_statistics(psnr: np.ndarray, labels: np.ndarray, num_classes: int) -> list[dict]:
    stats = []
    for label in range(num_classes):
        values = psnr[labels == label]
        stats.append({
            'class': label, 'count': int(values.size),
            'psnr_min': round(float(values.min()), 4) if values.size else None,
            'psnr_max': round(float(values.max()), 4) if values.size else None,
            'psnr_mean': round(float(values.mean()), 4) if values.size else None
        })
    return stats


# ----------------------------------------------------------------------------------------------
# The run


def encode_png(img: np.ndarray, level: int) -> bytes:
    ok, buffer = cv2.imencode('.png', img, [cv2.IMWRITE_PNG_COMPRESSION, level])
    if not ok:
        raise OSError('PNG encoding failed')
    return buffer.tobytes()


@dataclass
class Collected:
    keys: list[str] = field(default_factory=list)
    psnr: list[np.ndarray] = field(default_factory=list)
    images: dict[str, dict] = field(default_factory=dict)


def write_image_pairs(loaded: LoadedImage, index: int, opts: PrepareOptions, reference: Reference,
                      makers: tuple[LmdbMaker, LmdbMaker], collected: Collected) -> None:
    """Cut, score and store all sub-images of one photo."""
    stem = f'{index:05d}_{safe_stem(loaded.path)}'
    count = 0
    for factor, lr, hr in loaded.pairs:
        positions, lr_subs, hr_subs = cut_pairs(lr, hr, opts.scale, opts.patch, opts.stride)
        tag = f'{stem}_s{round(factor * 100):03d}'
        keys = [f'{tag}_{y:04d}_{x:04d}' for y, x in positions]
        for start in range(0, len(keys), opts.batch):
            part = slice(start, start + opts.batch)
            collected.psnr.append(reference.psnr(lr_subs[part], hr_subs[part]))
        for key, lr_sub, hr_sub in zip(keys, lr_subs, hr_subs):
            makers[0].put(encode_png(lr_sub, opts.compress_level), key, lr_sub.shape)
            makers[1].put(encode_png(hr_sub, opts.compress_level), key, hr_sub.shape)
        collected.keys.extend(keys)
        count += len(keys)
    collected.images[loaded.path] = {'key_prefix': stem, 'sub_images': count, 'notes': loaded.notes}


def prepare(opts: PrepareOptions, reference: Reference, overwrite: bool = False, montage: bool = False) -> dict:
    """Run the whole preparation; returns the summary (also written to ``summary.json``).

    Raises:
        FileNotFoundError / ValueError: bad input folder or options, before any work starts.
        FileExistsError: the output exists and ``overwrite`` is false, or a ``.incomplete`` folder or ``.lock``
            file beside it is not the tools' (left as it is), or another run holds the lock.
        KeyboardInterrupt: Ctrl-C; the output is left as it was, the staging folder for the next run to remove.
    """
    opts.validate()
    skipped = Skipped()
    paths = list_images(opts.input, skipped)
    output = Path(opts.output)
    tmp = start_output(output, overwrite, protect=Path(opts.input))
    try:
        summary = _prepare_into(tmp, paths, opts, reference, skipped, montage)
        finish_output(tmp, output)
    except _NoUsableImage as exc:
        abandon_output(tmp, output, remove=True)
        raise ValueError(str(exc)) from None
    except BaseException:
        abandon_output(tmp, output)  # left for inspection; the next run with this --output removes it
        raise
    return summary


class _NoUsableImage(ValueError):
    pass


def _prepare_into(tmp: Path, paths: list[Path], opts: PrepareOptions, reference: Reference, skipped: Skipped,
                  montage: bool) -> dict:
    """Everything ``prepare`` writes, into the staging folder ``tmp``; returns the summary."""
    started = time.time()
    makers = (LmdbMaker(str(tmp / LQ_LMDB), compress_level=opts.compress_level),
              LmdbMaker(str(tmp / GT_LMDB), compress_level=opts.compress_level))
    collected = Collected()
    try:
        loader = _Loader(opts.scale, opts.patch, tuple(opts.multiscale))
        with closing(process_map(loader, [str(p) for p in paths], opts.workers)) as loaded_images:
            for index, loaded in enumerate(tqdm(loaded_images, total=len(paths), desc='sub-images', unit='img')):
                if loaded.skipped:
                    skipped.add(loaded.path, loaded.skipped)
                    continue
                write_image_pairs(loaded, index, opts, reference, makers, collected)
    finally:
        for maker in makers:
            maker.close()
    if not collected.keys:
        raise _NoUsableImage(f'no usable image in {opts.input}; skipped: {skipped.as_dict()}')
    psnr = np.concatenate(collected.psnr)
    labels = assign_classes(psnr, collected.keys, opts.num_classes)
    write_labels(tmp / LABELS, collected.keys, labels, psnr)
    summary = {
        **tool_marker(PREPARE_TOOL),
        'num_pairs': len(collected.keys),
        'num_classes': opts.num_classes,
        'classes': class_statistics(psnr, labels, opts.num_classes),
        'reference': reference.description,
        'options': asdict(opts),
        'images': collected.images,
        'skipped': skipped.as_dict(),
        'seconds': round(time.time() - started, 2),
    }
    summary = write_summary(tmp, summary)
    if montage:
        from cdnsr_plugin.preparation.montage import write_montage
        summary['montage'] = write_montage(PreparedSet(tmp), tmp / 'montage.png').name
        summary = write_summary(tmp, summary)
    return summary


@dataclass(frozen=True)
class _Loader:
    """Picklable ``load_pairs`` with its options bound, for the worker processes."""

    scale: int
    patch: int
    multiscale: tuple[float, ...]

    def __call__(self, path: str) -> LoadedImage:
        return load_pairs(path, self.scale, self.patch, self.multiscale)


# ----------------------------------------------------------------------------------------------
# The reference network

REFERENCE_HELP = ('The papers rank sub-images with an MSRResNet x4 trained on DIV2K (BasicSR releases one as '
                  'MSRResNet_x4 / 001_MSRResNet_x4_f64b16_DIV2K_1000k_B16G16_wandb.pth). Download it on a machine '
                  'with internet access and pass --reference-arch "{type: MSRResNet, upscale: 4}" '
                  '--reference-checkpoint PATH, or a BasicSR option file with --reference-opt; or choose the '
                  'network-free fallback explicitly with --reference bicubic.')


def build_reference(scale: int,
                    device: str,
                    reference_opt: Optional[str] = None,
                    arch: Optional[dict] = None,
                    checkpoint: Optional[str] = None,
                    bicubic: bool = False) -> Reference:
    """The reference from an option file (``network_g`` + ``path.pretrain_network_g``), an arch dict
    plus checkpoint, or PyTorch bicubic when ``bicubic`` is set explicitly.

    Raises:
        ValueError: no reference chosen, or more than one; FileNotFoundError: a missing file.
    """
    chosen = [bool(reference_opt), arch is not None, bicubic]
    if sum(chosen) != 1:
        raise ValueError('choose exactly one reference: --reference-opt, --reference-arch (with '
                         '--reference-checkpoint) or --reference bicubic. ' + REFERENCE_HELP)
    if bicubic:
        return Reference(None, {'kind': 'bicubic', 'detail': 'torch bicubic upsampling (a=-0.75), no network'}, scale,
                         device)
    if reference_opt:
        from cdnsr_plugin.compat import load_yaml
        opt = load_yaml(reference_opt)
        if 'network_g' not in opt:
            raise ValueError(f'{reference_opt} has no network_g section')
        arch = dict(opt['network_g'])
        checkpoint = checkpoint or (opt.get('path') or {}).get('pretrain_network_g')
    if not checkpoint:
        raise ValueError('the reference network needs weights: --reference-checkpoint PATH. ' + REFERENCE_HELP)
    from basicsr.archs import build_network

    from cdnsr_plugin.utils.checkpoint import load_weights
    net = build_network(arch)
    load_weights(net, checkpoint)
    return Reference(net, {'kind': 'network', 'arch': arch, 'checkpoint': str(Path(checkpoint).resolve())}, scale,
                     device)
