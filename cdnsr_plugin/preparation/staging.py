"""Output folders that appear only when complete: write under ``<output>.incomplete``, then rename.

Used by every tool that writes a data set, so an interrupted run is never mistaken for a finished
one and an existing result is replaced only once its successor is complete.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable, Optional

INCOMPLETE = '.incomplete'


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
        ValueError: ``output`` is ``protect`` or contains it (overwriting would delete the input).
    """
    if protect is not None:
        source = protect.resolve()
        if output.resolve() == source or output.resolve() in source.parents:
            raise ValueError(f'--output {output} is or contains the input folder {protect}; pick another folder')
    if output.is_file() or (output.exists() and not overwrite):
        raise FileExistsError(f'{output} already exists; pass --overwrite to replace it (only once the new one '
                              'is complete), or pick another --output')
    staging = output.with_name(output.name + INCOMPLETE)
    if staging.exists():
        log(f'removing {staging}, left by an interrupted run')
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    return staging


def finish_output(staging: Path, output: Path) -> None:
    """Rename the complete ``staging`` folder to ``output``; an old ``output`` is moved aside first and
    deleted last, so at every moment one complete version exists."""
    if output.exists():
        old = output.with_name(output.name + '.old')
        shutil.rmtree(old, ignore_errors=True)
        output.rename(old)
        staging.rename(output)
        shutil.rmtree(old)
    else:
        staging.rename(output)
