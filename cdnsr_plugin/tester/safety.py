"""Checks the tester makes before any work, so that nothing of the user's is overwritten and no run ends in
a traceback after hours: the results folder is not an input folder (nor inside or above one) and is
writable; output names cannot collide; the weights are finite. Each raises ``ValueError`` with a message
that names the folder, file or checkpoint part and says what to do (the command line exits with status 2).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Iterable, Mapping, Optional

import torch

from cdnsr_plugin.utils.io import list_images

CLASSMAP_SUFFIX = '_classmap'


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


RUN_FILES = ('report.json', 'report.csv', 'psnr_flops.png', 'laplacian_router.json')


def remove_earlier_run(folder: Path) -> list[Path]:
    """Delete what an earlier tester run wrote in ``folder`` (the images its ``report.json`` lists, and the
    report files); anything else is left alone. Returns the removed paths."""
    listed: list[Path] = []
    report = folder / 'report.json'
    if report.is_file():
        try:
            data = json.loads(report.read_text())
        except (OSError, ValueError):
            data = {}
        for setting in data.get('settings', []):
            for record in setting.get('images', []):
                listed += [Path(record[key]) for key in ('sr_path', 'overlay_path') if record.get(key)]
    listed += [folder / name for name in RUN_FILES]
    removed = []
    for path in listed:
        absolute = Path(os.path.abspath(path))
        if _inside(absolute, Path(os.path.abspath(folder))) and absolute.is_file():
            absolute.unlink()
            removed.append(path)
    return removed


def check_out_folder(out: Path, inputs: Iterable[Optional[Path]], overwrite: bool = False) -> None:
    """``out`` must not be, lie inside or contain an input folder; it must be empty (or new) unless
    ``overwrite``, which first removes the earlier run's outputs (``remove_earlier_run``), so the folder never
    mixes two runs' images under one report; and it must be writable (a probe file is created and removed;
    the folder itself is created as the run would)."""
    target = Path(os.path.abspath(out))
    for folder in inputs:
        if folder is None:
            continue
        source = Path(os.path.abspath(folder))
        if _inside(target, source) or _inside(source, target):
            where = 'is' if target == source else 'is inside' if _inside(target, source) else 'contains'
            raise ValueError(f'--out {out} {where} the input folder {folder}: results would be written among '
                             'your images (and could replace them); choose a results folder outside the inputs')
    if target.is_dir() and any(target.iterdir()):
        if not overwrite:
            raise ValueError(f'--out {out} is not empty (an earlier run?): its report would describe other images '
                             'than the files beside it. Choose a new folder, or pass --overwrite to replace the '
                             'earlier run\'s results (only the files its report.json lists are removed)')
        remove_earlier_run(target)
    try:
        target.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=target, prefix='.write_probe_'):
            pass
    except OSError as exc:
        raise ValueError(f'--out {out} is not writable ({exc.strerror or exc}): choose a folder you can write '
                         'to') from None


def output_collisions(folder: Path) -> list[str]:
    """Groups of input files in ``folder`` whose outputs would have the same name: two files with one stem
    (``pic.png``, ``pic.jpg``), or a file whose stem is another's class-map name (``pic_classmap.png``)."""
    owners: dict[str, list[str]] = {}
    for path in list_images(folder):
        owners.setdefault(path.stem, []).append(path.name)
        owners.setdefault(path.stem + CLASSMAP_SUFFIX, [])
    for path in list_images(folder):
        if path.stem.endswith(CLASSMAP_SUFFIX) and owners.get(path.stem[:-len(CLASSMAP_SUFFIX)]):
            owners[path.stem].append(f'{path.stem[:-len(CLASSMAP_SUFFIX)]}\'s class map')
    return [' and '.join(names) for names in owners.values() if len(names) > 1]


def check_output_names(folders: Iterable[Path]) -> None:
    """Refuse, before any work, inputs whose outputs would overwrite each other."""
    problems = [f'{folder}: {group}' for folder in folders for group in output_collisions(folder)]
    if problems:
        raise ValueError('these inputs would write outputs of the same name (SR images are <stem>.png, class maps '
                         '<stem>_classmap.png): ' + '; '.join(problems) + '. Rename them or test them in separate '
                         'folders')


def check_finite_weights(parts: Mapping[str, torch.nn.Module], source: str) -> None:
    """Every parameter and buffer of every part is finite; otherwise name the parts (a NaN branch would give a
    black image and exit 0)."""
    bad = [
        name for name, module in parts.items()
        if not all(torch.isfinite(t).all() for t in [*module.parameters(), *module.buffers()] if t.is_floating_point())
    ]
    if bad:
        raise ValueError(f'{source}: non-finite weights (NaN or inf) in {", ".join(bad)}; the training run that wrote '
                         'them diverged: use an earlier checkpoint')


def available_memory(device: torch.device) -> Optional[int]:
    """Bytes that can still be allocated: CUDA's free memory, or Linux's ``MemAvailable``; ``None`` if unknown."""
    if device.type == 'cuda':
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open('/proc/meminfo') as handle:
            for line in handle:
                if line.startswith('MemAvailable:'):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def output_bytes(height: int, width: int, scale: int) -> int:
    """What one SR output holds at least: the float32 image and its uint8 copy (the engine's buffers, the
    class map and the file encoding come on top of that; hence the margin in ``check_memory``)."""
    return 3 * height * width * scale * scale * (4 + 1)


def check_memory(path: Path, height: int, width: int, scale: int, device: torch.device, margin: float = 1.5) -> None:
    """Refuse an image whose output cannot fit before any of it is computed (a 12000x12000 LR image at x4 once
    ran 80 s and then failed on a 27.6 GB allocation)."""
    available = available_memory(device)
    needed = int(margin * output_bytes(height, width, scale))
    if available is not None and needed > available:
        raise ValueError(f'{path}: a {width}x{height} input gives a {scale * width}x{scale * height} output that '
                         f'needs about {needed / 2**30:.1f} GB and {available / 2**30:.1f} GB are free on {device}; '
                         'cut the image into parts (or use a machine with more memory)')
