"""Output folders that appear only when complete: write under ``<output>.incomplete``, then rename.

Used by every tool that writes a data set, so an interrupted run is never mistaken for a finished
one and an existing result is replaced only once its successor is complete.
"""
from __future__ import annotations

import fcntl
import shutil
from pathlib import Path
from typing import IO, Callable, Optional

INCOMPLETE = '.incomplete'
LOCK = '.lock'
MARKER = 'summary.json'  # what every tool using this module writes last into a complete output
_held: dict[Path, IO] = {}


class OutputBusy(FileExistsError):
    """Another run is writing the same output (a ``FileExistsError``, so the tools' handlers report it)."""


# staging folder -> its open, locked lock file (released by finish_output or exit)


def _lock(output: Path) -> None:
    """Hold an exclusive lock on ``<output>.lock`` for this process (the OS drops it when the process dies, even
    on SIGKILL). A second run on the same output fails at once instead of deleting the first one's staging."""
    path = output.with_name(output.name + LOCK)
    earlier = _held.pop(output.with_name(output.name + INCOMPLETE), None)
    if earlier is not None:  # this process's own earlier attempt, which failed before finish_output
        earlier.close()
    handle = open(path, 'a')
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise OutputBusy(f'another run is writing {output} (it holds {path}); wait for it to finish or pick '
                         'another --output') from None
    _held[output.with_name(output.name + INCOMPLETE)] = handle


def _release(staging: Path, output: Path) -> None:
    handle = _held.pop(staging, None)
    if handle is not None:
        output.with_name(output.name + LOCK).unlink(missing_ok=True)
        handle.close()


def start_output(output: Path,
                 overwrite: bool,
                 protect: Optional[Path] = None,
                 log: Callable[[str], None] = print) -> Path:
    """Check ``output`` and return a fresh ``<output>.incomplete`` folder to write into.

    Args:
        output: the folder the finished result will have.
        overwrite: allow replacing an existing ``output`` (at ``finish_output``).
        protect: an input folder that ``output`` must neither be nor contain.
        log: where the message about a stale incomplete folder goes.

    Raises:
        FileExistsError: ``output`` exists and ``overwrite`` is false, or it is a file.
        ValueError: ``output`` is ``protect`` or contains it (overwriting would delete the input), or
            ``overwrite`` is asked for a non-empty folder that no run of these tools completed (no
            ``summary.json``): it is the user's, not ours to delete.
        OutputBusy: another run holds the lock on ``output``.
    """
    if protect is not None:
        source = protect.resolve()
        if output.resolve() == source or output.resolve() in source.parents:
            raise ValueError(f'--output {output} is or contains the input folder {protect}; pick another folder')
    if output.is_file() or (output.exists() and not overwrite):
        raise FileExistsError(f'{output} already exists; pass --overwrite to replace it (only once the new one '
                              'is complete), or pick another --output')
    if output.is_dir() and any(output.iterdir()) and not (output / MARKER).is_file():
        raise ValueError(f'--overwrite would delete {output}, which is not an output of these tools (no {MARKER}) '
                         'and not empty; pick another --output or empty it yourself')
    _lock(output)
    staging = output.with_name(output.name + INCOMPLETE)
    if staging.exists():
        log(f'removing {staging}, left by an interrupted run')
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    return staging


def finish_output(staging: Path, output: Path) -> None:
    """Rename the complete ``staging`` folder to ``output``; an old ``output`` is moved aside first and
    deleted last, so at every moment one complete version exists. Releases the lock taken by ``start_output``."""
    try:
        if output.exists():
            old = output.with_name(output.name + '.old')
            shutil.rmtree(old, ignore_errors=True)
            output.rename(old)
            staging.rename(output)
            shutil.rmtree(old)
        else:
            staging.rename(output)
    finally:
        _release(staging, output)
