"""Test2K / Test4K / Test8K as in ClassSR (CVPR 2021, sec. 4.1.2) and CDNSR (ICASSP 2023).

The papers take DIV8K images 1201-1500: the first 100 are downsampled to 2K (Test2K), the next
100 to 4K (Test4K) and the last 100 kept at 8K (Test8K); LR images are bicubic x4 downsamplings.
Here any folder works and the tiers are options:

* ``split='sequential'``: the sorted image files are cut into ``len(tiers)`` consecutive groups,
  as equal as possible (earlier groups take the extra one); group k goes to tier k. The cut is
  made on the file list, so a file skipped later (corrupt, too small) leaves its tier one short
  instead of shifting every later image into another tier.
* ``split='all'``: every image goes into every tier.

Per image and tier the HR is downsampled with basicsr's MATLAB-compatible bicubic ``imresize`` to
the tier's width (aspect ratio kept; never upsampled), mod-cropped (bottom/right) to a multiple of
``scale``, and the LR is ``imresize(HR, 1 / scale)``. The layout is BasicSR's paired folders::

    OUT/Test2K/HR/<stem>.png   OUT/Test2K/LR_bicubic/X4/<stem>.png   ...   OUT/summary.json

``summary.json`` names the tool that wrote it (``"tool": "cdnsr_plugin make_test_sets"``).

Everything is written into ``OUT.incomplete`` and renamed to ``OUT`` only when complete.
"""
from __future__ import annotations

import re
from contextlib import closing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from tqdm import tqdm

from cdnsr_plugin.preparation.parallel import process_map
from cdnsr_plugin.preparation.staging import TEST_SETS_TOOL, abandon_output, finish_output, start_output, tool_marker
from cdnsr_plugin.utils.image import bicubic_resize
from cdnsr_plugin.utils.io import SkipImage, Skipped, list_images, read_image, write_image, write_json

SPLITS = ('sequential', 'all')
DEFAULT_TIERS = '2K=2048,4K=4096,8K=0'
_TIER_NAME = re.compile(r'^[A-Za-z0-9_-]+$')


@dataclass(frozen=True)
class Tier:
    """One test set: its name (folder ``Test<name>``) and HR width in pixels (0 = original size)."""

    name: str
    width: int

    @property
    def folder(self) -> str:
        return f'Test{self.name}'


@dataclass(frozen=True)
class Job:
    """One source image and the tiers it goes into; what a worker process receives."""

    path: Path
    tiers: tuple[Tier, ...]
    scale: int
    root: Path


@dataclass
class ImageResult:
    """What a worker made of one image: per tier an entry for summary.json, or a skip reason."""

    path: Path
    entries: dict[str, dict] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


def parse_tiers(text: str) -> list[Tier]:
    """Parse ``'2K=2048,4K=4096,8K=0'`` into tiers.

    Raises:
        ValueError: an item is not ``NAME=WIDTH`` with a name of letters, digits, ``_`` or ``-``
            and a width >= 0, a name repeats, or no tier is given.
    """
    tiers = []
    for item in text.split(','):
        name, sep, width = (part.strip() for part in item.partition('='))
        if not sep or not _TIER_NAME.match(name) or not re.fullmatch(r'\d+', width):
            raise ValueError(f'bad tier {item.strip()!r}: expected NAME=WIDTH with WIDTH an integer >= 0, '
                             f'e.g. {DEFAULT_TIERS}')
        if any(tier.name == name for tier in tiers):
            raise ValueError(f'bad tier {item.strip()!r}: tier name {name!r} given twice')
        tiers.append(Tier(name, int(width)))
    return tiers


def split_sizes(count: int, groups: int) -> list[int]:
    """Sizes of ``groups`` consecutive groups of ``count`` items, differing by at most 1."""
    return [count // groups + (1 if k < count % groups else 0) for k in range(groups)]


def assign_tiers(paths: list[Path], tiers: list[Tier], split: str) -> list[tuple[Path, tuple[Tier, ...]]]:
    """Pair each image with the tiers it goes into, following ``split`` (see module doc)."""
    if split == 'all':
        return [(path, tuple(tiers)) for path in paths]
    if split != 'sequential':
        raise ValueError(f'unknown split {split!r}; expected one of {SPLITS}')
    pairs, start = [], 0
    for tier, size in zip(tiers, split_sizes(len(paths), len(tiers))):
        pairs += [(path, (tier, )) for path in paths[start:start + size]]
        start += size
    return pairs


def make_pair(img: np.ndarray, width: int, scale: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """HR (resized to ``width``, mod-cropped) and LR (HR / ``scale``) for one tier; returns notes.

    Raises:
        SkipImage: the resized image would be smaller than ``scale`` pixels.
    """
    h, w = img.shape[:2]
    notes = []
    if width and width < w:
        height = int(h * width / w + 0.5)
        img = bicubic_resize(img, width / w)[:height, :width]
    elif width > w:
        notes.append(f'{w} px wide, narrower than the target {width}: used as is (never upsampled)')
    h, w = img.shape[0] // scale * scale, img.shape[1] // scale * scale
    if min(h, w) == 0:
        raise SkipImage(f'{img.shape[1]}x{img.shape[0]} after resizing is smaller than the scale {scale}')
    hr = np.ascontiguousarray(img[:h, :w])
    lr = bicubic_resize(hr, 1 / scale)[:h // scale, :w // scale]
    return hr, lr, notes


def lr_folder(scale: int) -> str:
    """Relative folder of the LR images in a tier, BasicSR style."""
    return f'LR_bicubic/X{scale}'


def process_image(job: Job) -> ImageResult:
    """Read one image, make and write its HR/LR pair for each of its tiers (runs in a worker)."""
    result = ImageResult(job.path)
    try:
        img, read_notes = read_image(job.path, min_size=job.scale)
    except SkipImage as exc:
        result.skipped[''] = str(exc)
        return result
    for tier in job.tiers:
        try:
            hr, lr, notes = make_pair(img, tier.width, job.scale)
        except SkipImage as exc:
            result.skipped[tier.name] = str(exc)
            continue
        name = f'{job.path.stem}.png'
        write_image(job.root / tier.folder / 'HR' / name, hr)
        write_image(job.root / tier.folder / lr_folder(job.scale) / name, lr)
        result.entries[tier.name] = {
            'name': name, 'source': job.path.name, 'hr_size': [hr.shape[1], hr.shape[0]],
            'lr_size': [lr.shape[1], lr.shape[0]], 'notes': read_notes + notes
        }
    return result


def run_jobs(jobs: list[Job], workers: int, progress: bool = True) -> Iterator[ImageResult]:
    """Yield ``process_image`` results in ``workers`` processes (0 = in this one), memory bounded; the workers
    stop at once when this iterator is closed early."""
    with closing(process_map(process_image, jobs, workers)) as results:
        yield from tqdm(results, total=len(jobs), unit='img', desc='test sets', disable=not progress)


def unique_stems(paths: list[Path], skipped: Skipped) -> list[Path]:
    """Drop files whose stem repeats (``a.png`` and ``a.jpg`` would both write ``a.png``)."""
    seen: dict[str, Path] = {}
    for path in paths:
        if path.stem in seen:
            skipped.add(path, f'same name as {seen[path.stem].name}: both would be written as {path.stem}.png')
        else:
            seen[path.stem] = path
    return list(seen.values())


def validate(tiers: list[Tier], scale: int, split: str, workers: int) -> None:
    """Raise ``ValueError`` on options that cannot make a test set."""
    if scale < 1:
        raise ValueError(f'scale must be >= 1, got {scale}')
    if workers < 0:
        raise ValueError(f'workers must be >= 0, got {workers}')
    if split not in SPLITS:
        raise ValueError(f'unknown split {split!r}; expected one of {SPLITS}')
    if not tiers:
        raise ValueError('no tier given')
    for tier in tiers:
        if 0 < tier.width < scale:
            raise ValueError(f'tier {tier.name}: width {tier.width} is smaller than the scale {scale}')


def build_test_sets(input_dir: Path | str,
                    output_dir: Path | str,
                    tiers: list[Tier],
                    scale: int = 4,
                    split: str = 'sequential',
                    workers: int = 2,
                    overwrite: bool = False,
                    progress: bool = True,
                    log: Callable[[str], None] = print) -> dict:
    """Build the tiers' HR/LR folders from ``input_dir`` into ``output_dir``; return the summary.

    Args:
        input_dir: folder of HR images (only files directly inside it are used).
        output_dir: folder to create; holds ``Test<name>/`` per tier and ``summary.json``.
        tiers: the test sets to build (``parse_tiers``).
        scale: downsampling factor of the LR images.
        split: ``'sequential'`` or ``'all'`` (see module doc).
        workers: processes that read and resize images; 0 runs in this process.
        overwrite: replace an existing ``output_dir`` (only once the new one is complete).
        progress: show a tqdm progress bar.
        log: where messages go.

    Returns:
        The content of ``summary.json``.

    Raises:
        FileNotFoundError: ``input_dir`` is not a folder.
        FileExistsError: ``output_dir`` exists and ``overwrite`` is false, or a ``.incomplete`` folder or
            ``.lock`` file beside it is not the tools' (left as it is), or another run holds the lock.
        ValueError: bad options, ``output_dir`` holds ``input_dir`` or is a folder these tools did not write
            (``staging.not_ours``), no image file in ``input_dir``, or no image could be used.
        OSError: an output file could not be written.
        BrokenProcessPool: a worker died (out of memory on very large images: use fewer workers).
    """
    validate(tiers, scale, split, workers)
    input_dir, output = Path(input_dir), Path(output_dir)
    skipped = Skipped()
    paths = unique_stems(list_images(input_dir, skipped), skipped)
    staging = start_output(output, overwrite, protect=input_dir, log=log)
    try:
        summary = _build_into(staging, input_dir, output, paths, tiers, scale, split, workers, progress, skipped)
        finish_output(staging, output)
    except BaseException:
        abandon_output(staging, output)  # left for inspection; the next run with this --output removes it
        raise
    return summary


def _build_into(staging: Path, input_dir: Path, output: Path, paths: list[Path], tiers: list[Tier], scale: int,
                split: str, workers: int, progress: bool, skipped: Skipped) -> dict:
    """Everything ``build_test_sets`` writes, into the staging folder; returns the summary."""
    for tier in tiers:
        (staging / tier.folder / 'HR').mkdir(parents=True)
        (staging / tier.folder / lr_folder(scale)).mkdir(parents=True)
    jobs = [Job(path, assigned, scale, staging) for path, assigned in assign_tiers(paths, tiers, split)]
    with closing(run_jobs(jobs, workers, progress)) as mapped:
        results = sorted(mapped, key=lambda result: result.path)
    for result in results:
        for tier_name, reason in result.skipped.items():
            skipped.add(result.path, f'{reason} (tier {tier_name})' if tier_name else reason)
    summary = make_summary(input_dir, output, tiers, scale, split, results, skipped)
    if not summary['counts']['written']:
        raise ValueError(f'no usable image in {input_dir}: every file was skipped ({staging} left for inspection)')
    write_json(staging / 'summary.json', summary)
    return summary


def make_summary(input_dir: Path, output: Path, tiers: list[Tier], scale: int, split: str, results: list[ImageResult],
                 skipped: Skipped) -> dict:
    """The content of summary.json: options, per-tier images with sizes and notes, skipped files."""
    per_tier = {tier.name: [r.entries[tier.name] for r in results if tier.name in r.entries] for tier in tiers}
    return {
        **tool_marker(TEST_SETS_TOOL),
        'options': {
            'input': str(input_dir), 'output': str(output), 'scale': scale, 'split': split,
            'tiers': [asdict(tier) for tier in tiers]
        },
        'tiers': {
            tier.name: {
                'folder': tier.folder, 'width': tier.width, 'hr': f'{tier.folder}/HR',
                'lr': f'{tier.folder}/{lr_folder(scale)}', 'images': per_tier[tier.name]
            }
            for tier in tiers
        },
        'skipped': skipped.as_dict(),
        'counts': {
            'images': len(results), 'written': sum(len(images) for images in per_tier.values()),
            'per_tier': dict(zip(per_tier, map(len, per_tier.values()))), 'skipped': len(skipped.items),
            'with_notes': sum(any(e['notes'] for e in r.entries.values()) for r in results)
        },
    }


def format_summary(summary: dict) -> str:
    """A few lines for the end of a run: per-tier counts and sizes, and every skipped file."""
    lines = [f'wrote {summary["counts"]["written"]} HR/LR pairs to {summary["options"]["output"]}']
    for name, tier in summary['tiers'].items():
        sizes = sorted({tuple(entry['hr_size']) for entry in tier['images']})
        shown = ', '.join(f'{w}x{h}' for w, h in sizes[:3]) + (', ...' if len(sizes) > 3 else '')
        lines.append(f'  {tier["folder"]}: {len(tier["images"])} images (HR {shown or "-"})')
    if summary['counts']['with_notes']:
        lines.append(
            f'  notes (conversions, sizes kept) on {summary["counts"]["with_notes"]} image(s): see summary.json')
    if summary['skipped']:
        lines.append(f'skipped {len(summary["skipped"])} files:')
        lines += [f'  {path}: {reason}' for path, reason in summary['skipped'].items()]
    return '\n'.join(lines)
