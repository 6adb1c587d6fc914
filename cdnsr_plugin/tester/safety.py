"""Checks the tester makes before any work, so that nothing of the user's is overwritten and no run ends in
a traceback after hours: the results folder is not an input folder (nor inside or above one) and is
writable, with room for the images it will write; output names cannot collide; the weights are finite. Each
raises ``ValueError`` with a message that names the folder, file or checkpoint part and says what to do (the
command line exits with status 2).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Mapping, Optional

import torch

from cdnsr_plugin.utils.io import list_images

CLASSMAP_SUFFIX = '_classmap'


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


RUN_FILES = ('report.json', 'report.csv', 'psnr_flops.png', 'laplacian_router.json')


def _same_or_inside(path: Path, folder: Path) -> bool:
    """``path`` is ``folder`` or lies inside it, by name or once symbolic links are followed."""
    return _inside(Path(os.path.abspath(path)), Path(os.path.abspath(folder))) or _inside(
        path.resolve(), folder.resolve())


def _listed_outputs(folder: Path) -> Optional[list[Path]]:
    """The SR images and class maps an earlier run's ``report.json`` in ``folder`` lists, as paths inside
    ``folder`` (they are written as ``<out>/<set>/<file>``; the report may hold them relative to another working
    directory); ``None`` if there is no readable report of the tester's layout."""
    try:
        data = json.loads((folder / 'report.json').read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get('settings'), list):
        return None
    listed = []
    for setting in data['settings']:
        records = setting.get('images') if isinstance(setting, dict) else None
        for record in records if isinstance(records, list) else []:
            for key in ('sr_path', 'overlay_path'):
                value = record.get(key) if isinstance(record, dict) else None
                if isinstance(value, str) and value:
                    listed.append(folder / Path(value).parent.name / Path(value).name)
    return listed


def _removable(path: Path, folder: Path, protected: set[Path]) -> bool:
    """A regular file inside ``folder``, reached without symbolic links, and not one of ``protected``."""
    return (path.is_file() and not path.is_symlink() and not path.parent.is_symlink()
            and _inside(path.resolve(), folder.resolve()) and path.resolve() not in protected)


def earlier_run_files(folder: Path, keep: Iterable[Optional[Path]] = ()) -> list[Path]:
    """What ``--overwrite`` may delete in ``folder``: the images an earlier run's ``report.json`` lists and its
    report files, only if that report exists; never a path of ``keep`` (this run's inputs, e.g. a router file),
    never through a symbolic link, never outside ``folder``."""
    listed = _listed_outputs(folder)
    if listed is None:
        return []
    protected = {Path(p).resolve() for p in keep if p is not None}
    candidates = dict.fromkeys(listed + [folder / name for name in RUN_FILES])  # once each, in order
    return [p for p in candidates if _removable(p, folder, protected)]


def set_folder_images(folder: Path) -> list[Path]:
    """Image files in the set folders of ``folder`` (where the tester writes its images)."""
    return sorted(p for sub in folder.iterdir() if sub.is_dir() for p in sub.iterdir()
                  if p.suffix.lower() == '.png' and p.is_file())


def check_out_folder(out: Path, inputs: Iterable[Optional[Path]], overwrite: bool = False) -> None:
    """``out`` must not be, lie inside or contain an input folder (by name or through symbolic links); it must
    be empty (or new) unless ``overwrite`` (then ``Runner`` removes the earlier run's outputs once every other
    check has passed: ``replace_earlier_run``); and it must be writable (a probe file is created and removed;
    the folder itself is created as the run would)."""
    target = Path(out)
    for folder in inputs:
        if folder is None:
            continue
        if _same_or_inside(target, Path(folder)) or _same_or_inside(Path(folder), target):
            same = Path(os.path.abspath(target)) == Path(
                os.path.abspath(folder)) or target.resolve() == Path(folder).resolve()
            where = 'is' if same else 'is inside' if _same_or_inside(target, Path(folder)) else 'contains'
            raise ValueError(f'--out {out} {where} the input folder {folder}: results would be written among '
                             'your images (and could replace them); choose a results folder outside the inputs')
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise ValueError(f'--out {out} is not empty (an earlier run?): its report would describe other images '
                         'than the files beside it. Choose a new folder, or pass --overwrite to replace the '
                         'earlier run\'s results (only the files its report.json lists are removed)')
    try:
        target.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=target, prefix='.write_probe_'):
            pass
    except OSError as exc:
        raise ValueError(f'--out {out} is not writable ({exc.strerror or exc}): choose a folder you can write '
                         'to') from None


def replace_earlier_run(out: Path, keep: Iterable[Optional[Path]]) -> list[Path]:
    """``--overwrite``: delete the earlier run's outputs (``earlier_run_files``). Refused, before anything is
    deleted, when images would remain that it may not remove (not listed by a report, e.g. left by an
    interrupted run, or reached through a link): the new report would sit beside them. Returns the removed."""
    removable = earlier_run_files(out, keep)
    chosen = set(removable)
    left = [p for p in set_folder_images(out) if p not in chosen]
    if left:
        raise ValueError(f'--out {out} holds {len(left)} image(s) that --overwrite will not remove (e.g. {left[0]}: '
                         'no report.json describes it, or it lies behind a link; an interrupted run?). Remove them '
                         'yourself or choose a new folder')
    for path in removable:
        path.unlink()
    return removable


def output_collisions(folder: Path) -> list[str]:
    """Groups of input files in ``folder`` whose outputs would have the same name: two files with one stem
    (``pic.png``, ``pic.jpg``), or a file whose stem is another's class-map name (``pic_classmap.png``)."""
    try:
        paths = list_images(folder)
    except (ValueError, FileNotFoundError):  # no usable image: the run lists the folder as a failure
        return []
    owners: dict[str, list[str]] = {}
    for path in paths:
        owners.setdefault(path.stem, []).append(path.name)
        owners.setdefault(path.stem + CLASSMAP_SUFFIX, [])
    for path in paths:
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
    if device.type == 'cuda':  # free on the device, plus what PyTorch's cache holds but can reuse
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(torch.cuda.mem_get_info(device)[0] + cached)
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


# PNG keeps a photo at 35-70% of its raw bytes; a quarter is below what photos reach (flat synthetic images do)
PNG_FLOOR = 0.25


def image_size(path: Path) -> Optional[tuple[int, int]]:
    """``(height, width)`` from the file's header (Pillow reads no pixels); ``None`` if it cannot be read (the
    run reports that file later)."""
    from PIL import Image
    try:
        with open(path, 'rb') as handle, Image.open(handle) as img:
            width, height = img.size
    except Exception:  # noqa: BLE001 (corrupt, not an image: the run's reader names the reason)
        return None
    return height, width


def check_free_space(out: Path, inputs: Iterable[Path], scale: int, files_per_image: int = 2) -> Optional[str]:
    """Before any work: the SR images and class maps of ``inputs`` must fit on the disk of ``out``. Their
    PNG size is not known before encoding, so the raw size (3 bytes a pixel) is the estimate: below
    ``PNG_FLOOR`` of it the run is refused (``ValueError``); below all of it a warning is returned (the run
    goes on; an image that then does not fit fails alone, named, and the others go on)."""
    sizes = [size for size in map(image_size, inputs) if size is not None]
    raw = files_per_image * sum(3 * h * w * scale * scale for h, w in sizes)
    free = shutil.disk_usage(out).free
    if free < PNG_FLOOR * raw:
        raise ValueError(f'--out {out}: the {len(sizes)} images need about {PNG_FLOOR * raw / 2**30:.2f}-'
                         f'{raw / 2**30:.2f} GB (SR images and class maps as PNG) and {free / 2**30:.2f} GB are free '
                         'there; free some space, choose another --out, or pass --no-save-images')
    if free < raw:
        return (f'--out {out} has {free / 2**30:.2f} GB free and the SR images and class maps may need up to '
                f'{raw / 2**30:.2f} GB: images that do not fit will fail')
    return None
