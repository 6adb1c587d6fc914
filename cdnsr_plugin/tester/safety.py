"""Checks the tester makes before any work, so that nothing of the user's is overwritten and no run ends in
a traceback after hours: the results folder is not an input folder (nor inside or above one), writes no file
over an input file and is writable, with room for the images it will write; no other run writes into it (a
lock on ``<out>.lock``); output names cannot collide; the weights are finite. Each raises ``ValueError`` (a
busy ``--out``: ``utils.locks.Busy``) with a message that names the folder, file or checkpoint part and says
what to do (the command line exits with status 2).

What a run writes is listed as it goes in ``<out>/run_in_progress.json`` (``Progress``), replaced by
``report.json`` at its end: ``--overwrite`` removes the outputs either lists, so a run interrupted by Ctrl-C or a
kill is replaced like a finished one, and nothing else of the folder is touched.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional

import torch

from cdnsr_plugin.utils.io import list_images, readable_size, write_json
from cdnsr_plugin.utils.locks import Busy, ForeignFile, RunLock

CLASSMAP_SUFFIX = '_classmap'


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


PROGRESS_FILE = 'run_in_progress.json'  # the outputs of a run so far; removed once its report is written
PROGRESS_TOOL = 'cdnsr_plugin tester'  # the marker of a progress file the tester wrote
RUN_FILES = ('report.json', 'report.csv', 'psnr_flops.png', 'laplacian_router.json')


def _same_or_inside(path: Path, folder: Path) -> bool:
    """``path`` is ``folder`` or lies inside it, by name or once symbolic links are followed."""
    return _inside(Path(os.path.abspath(path)), Path(os.path.abspath(folder))) or _inside(
        path.resolve(), folder.resolve())


def _report_outputs(folder: Path) -> Optional[list[Path]]:
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


def _progress_outputs(folder: Path) -> Optional[list[Path]]:
    """The outputs an unfinished (interrupted or killed) run listed in ``folder/run_in_progress.json``
    (``Progress``), as paths inside ``folder``; ``None`` if there is no such file of the tester's."""
    try:
        data = json.loads((folder / PROGRESS_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get('tool') != PROGRESS_TOOL or not isinstance(data.get('outputs'), list):
        return None
    return [folder / Path(v).parent.name / Path(v).name for v in data['outputs'] if isinstance(v, str) and v]


def _listed_outputs(folder: Path) -> Optional[list[Path]]:
    """What an earlier run's ``report.json`` and an unfinished run's progress file list (both can exist: a run
    killed after writing its report); ``None`` if neither exists."""
    report, progress = _report_outputs(folder), _progress_outputs(folder)
    if report is None and progress is None:
        return None
    return (report or []) + (progress or [])


def _removable(path: Path, folder: Path, protected: set[Path]) -> bool:
    """A regular file inside ``folder``, reached without symbolic links, and not one of ``protected``."""
    return (path.is_file() and not path.is_symlink() and not path.parent.is_symlink()
            and _inside(path.resolve(), folder.resolve()) and path.resolve() not in protected)


def earlier_run_files(folder: Path, keep: Iterable[Optional[Path]] = ()) -> list[Path]:
    """What ``--overwrite`` may delete in ``folder``: the images an earlier run's ``report.json`` or an
    interrupted run's ``run_in_progress.json`` lists and the run's report files, only if one of the two exists;
    never a path of ``keep`` (this run's inputs, e.g. a router file), never through a symbolic link, never
    outside ``folder``. The listed images go first, the files that list them last."""
    listed = _listed_outputs(folder)
    if listed is None:
        return []
    protected = {Path(p).resolve() for p in keep if p is not None}
    progress = [folder / PROGRESS_FILE] if _progress_outputs(folder) is not None else []
    candidates = dict.fromkeys(listed + [folder / name for name in RUN_FILES] + progress)  # once each, in order
    return [p for p in candidates if _removable(p, folder, protected)]


def set_folder_images(folder: Path) -> list[Path]:
    """Image files in the set folders of ``folder`` (where the tester writes its images)."""
    return sorted(p for sub in folder.iterdir() if sub.is_dir() for p in sub.iterdir()
                  if p.suffix.lower() == '.png' and p.is_file())


Paths = Iterable[Optional[Path]]


def _same_file(a: Path, b: Path) -> bool:
    return Path(os.path.abspath(a)) == Path(os.path.abspath(b)) or a.resolve() == b.resolve()


def check_out_location(out: Path, inputs: Paths, files: Paths = (), outputs: Iterable[Path] = ()) -> None:
    """Where ``out`` may be, before anything is written. ``inputs`` are folders the run reads (an LR folder,
    the GT folder, an export): ``out`` must not be, lie inside or contain one (by name or through symbolic
    links). ``files`` are single files it reads (an LR image given alone, the checkpoint, a router file): none
    may be a path the run writes (by name or through links): ``out`` itself, its report and progress files, its
    lock, or one of ``outputs`` (the SR images and class maps it will write, ``sr_names``). So a results folder
    inside the folder of a single input image (``cd photos && cdnsr-sr coffee.png``) is allowed, while an
    ``--out`` where the SR image would replace the input is not (the user's other files there are protected by
    ``check_out_contents`` and ``replace_earlier_run``)."""
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
    written = [target, *(target / name for name in (*RUN_FILES, PROGRESS_FILE)), *outputs]
    if target.resolve().name:  # the lock beside the folder (``lock_out``)
        written.append(target.resolve().with_name(target.resolve().name + '.lock'))
    for file in files:
        if file is None or not Path(file).exists():
            continue
        hit = next((path for path in written if _same_file(Path(file), Path(path))), None)
        if hit is not None:
            raise ValueError(f'--out {out}: the run would write {hit}, which is the input file {file} (it would be '
                             'replaced); choose another results folder')


def sr_names(stem: str) -> tuple[str, str]:
    """The file names of an input's SR image and class map in its set folder."""
    return f'{stem}.png', f'{stem}{CLASSMAP_SUFFIX}.png'


def check_out_contents(out: Path, overwrite: bool = False) -> None:
    """``out`` must be empty (or new) unless ``overwrite`` (then ``Runner`` removes the earlier run's outputs once
    every other check has passed: ``replace_earlier_run``); and it must be writable (a probe file is created and
    removed; the folder itself is created as the run would)."""
    target = Path(out)
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise ValueError(f'--out {out} is not empty (an earlier run, or an interrupted one?): its report would '
                         'describe other images than the files beside it. Choose a new folder, or pass --overwrite '
                         'to replace the earlier run\'s results (only the files its report.json or '
                         f'{PROGRESS_FILE} lists are removed)')
    try:
        target.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=target, prefix='.write_probe_'):
            pass
    except OSError as exc:
        raise _not_writable(out, exc) from None


def _not_writable(out: Path, exc: OSError) -> ValueError:
    """The refusal of an ``--out`` that cannot be created or written: a part of its path that is a file is named."""
    for parent in [Path(out), *Path(out).parents]:
        if parent.is_file():
            return ValueError(f'--out {out}: {parent} is a file, not a folder; choose a folder for the results')
    return ValueError(f'--out {out} is not writable ({exc.strerror or exc}): choose a folder you can write to')


def check_out_folder(out: Path,
                     inputs: Paths,
                     overwrite: bool = False,
                     files: Paths = (),
                     outputs: Iterable[Path] = ()) -> None:
    """``check_out_location`` then ``check_out_contents`` (without the lock that ``Runner`` takes between
    them)."""
    check_out_location(out, inputs, files, outputs)
    check_out_contents(out, overwrite)


def lock_out(out: Path, log: Optional[Callable[[str], None]] = None) -> RunLock:
    """Hold the run lock on ``<out>.lock`` (``utils.locks``; the folder once symbolic links are followed, so two
    spellings of one folder share it) until ``RunLock.release``: a second run into the same ``--out`` fails at
    once with ``Busy`` naming the first run's process; the lock of a run that died is taken over with a note
    (to ``log``, by default stderr)."""
    target = Path(out).resolve()
    if not target.name:
        raise ValueError(f'--out {out} is the root folder: choose a results folder')
    lock = RunLock(target, 'results folder (--out)', 'choose another --out')
    try:
        return lock.acquire(log or (lambda message: print(message, file=sys.stderr)))
    except (Busy, ForeignFile):
        raise
    except OSError as exc:
        raise _not_writable(out, exc) from None


class Progress:
    """The outputs a run has written so far, in ``<out>/run_in_progress.json``: each output is added (the file
    rewritten atomically) before it is written, so an interrupted or killed run's outputs are all listed and a
    rerun with ``--overwrite`` removes them as it does an earlier report's. ``finish`` removes the file once the
    run's report is written (a finished run leaves ``report.json`` and no progress file)."""

    def __init__(self, out: Path, command: str) -> None:
        self.path = Path(out) / PROGRESS_FILE
        self.command = command
        self.outputs: list[str] = []
        self._write()

    def _write(self) -> None:
        write_json(
            self.path, {
                'tool': PROGRESS_TOOL, 'command': self.command, 'pid': os.getpid(),
                'note': 'written while a run is going on; the run replaces it by report.json when it ends. If it '
                'is still here, the run was interrupted: rerun with --overwrite to remove these outputs',
                'outputs': self.outputs
            })

    def add(self, *paths: Path) -> None:
        """Note ``paths`` (``<out>/<set>/<file>``) as written by this run, before they are written."""
        new = [f'{Path(p).parent.name}/{Path(p).name}' for p in paths]
        new = [name for name in dict.fromkeys(new) if name not in self.outputs]
        if new:
            self.outputs += new
            self._write()

    def finish(self) -> None:
        """The run's report is written: its list replaces this one."""
        self.path.unlink(missing_ok=True)


def replace_earlier_run(out: Path, keep: Iterable[Optional[Path]]) -> list[Path]:
    """``--overwrite``: delete the earlier run's outputs (``earlier_run_files``). Refused, before anything is
    deleted, when images or report files would remain that it may not remove (listed by no report or progress
    file, e.g. the user's, or reached through a link): the new run would sit beside them or write over them.
    Returns the removed."""
    removable = earlier_run_files(out, keep)
    chosen = set(removable)
    protected = {Path(p).resolve() for p in keep if p is not None}
    reports = [
        out / name for name in (*RUN_FILES, PROGRESS_FILE)
        if (out / name).exists() and (out / name).resolve() not in protected
    ]
    left = [p for p in set_folder_images(out) + reports if p not in chosen]
    if left:
        raise ValueError(f'--out {out} holds {len(left)} file(s) that --overwrite will not remove (e.g. {left[0]}: '
                         f'no report.json or {PROGRESS_FILE} of the tester describes it, or it lies behind a link). '
                         'Remove them yourself or choose a new folder')
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
                         f'needs about {readable_size(needed)} and {readable_size(available)} are free on {device}; '
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
        raise ValueError(f'--out {out}: the {len(sizes)} images need about {readable_size(PNG_FLOOR * raw)} to '
                         f'{readable_size(raw)} (SR images and class maps as PNG) and {readable_size(free)} are free '
                         'there; free some space, choose another --out, or pass --no-save-images')
    if free < raw:
        return (f'--out {out} has {readable_size(free)} free and the SR images and class maps may need up to '
                f'{readable_size(raw)}: images that do not fit will fail')
    return None
