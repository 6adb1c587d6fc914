"""Output folders that appear only when complete: write under ``<output>.incomplete``, then rename.

Used by every tool that writes a data set (``tools/prepare_data.py``, ``tools/make_test_sets.py``), so an
interrupted run is never mistaken for a finished one and an existing result is replaced only once its successor
is complete. Nothing is deleted that these tools did not make:

* ``<output>`` itself is replaced (``--overwrite``) only when it is an output of these tools and holds nothing
  else: its ``summary.json`` names the tool (``"tool": "cdnsr_plugin prepare_data"``; older outputs are known by
  their summary's keys) and every entry is one that tool writes. A ``summary.json`` of the user's, or a thesis
  beside a prepared set, makes the folder the user's: refused, left as it is.
* ``<output>.incomplete`` is removed as "left by an interrupted run" only when it holds the marker file
  (``STAGING_MARKER``) that ``start_output`` writes into it first, or is a complete output of these tools (the
  marker is removed just before the final rename). A user's own folder of that name is refused, left alone.
* ``<output>.lock`` is the run lock (``utils.locks.RunLock``): a file of that name the tools did not write is
  refused, left alone.
* the old ``<output>`` is moved aside into a new folder of a unique name (``.<output>.replaced-XXXXXXXX``, made
  by this run, with a marker) and deleted from there; a user's ``<output>.old`` is never touched. Such a folder
  left by a run killed while replacing is removed (or, when ``<output>`` is missing, moved back) by the next run.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable, Optional

from cdnsr_plugin.preparation.interrupts import deferred_sigint, interrupt_pending
from cdnsr_plugin.utils.locks import Busy, RunLock

INCOMPLETE = '.incomplete'
LOCK = '.lock'
MARKER = 'summary.json'  # what every tool using this module writes last into a complete output
TOOL_KEY = 'tool'  # the summary's key naming the tool that wrote it
PREPARE_TOOL = 'cdnsr_plugin prepare_data'
TEST_SETS_TOOL = 'cdnsr_plugin make_test_sets'
STAGING_MARKER = '.cdnsr_plugin_staging'  # written first into every staging folder: it is ours to remove
ASIDE = '.replaced-'  # .<output>.replaced-XXXXXXXX: the old output, moved aside while the new one takes its place
ASIDE_MARKER = '.cdnsr_plugin_replaced'
_MARKER_TOOL = 'cdnsr_plugin staging'

# keys of the summaries written before they named their tool
_PREPARED_KEYS = frozenset({'complete', 'format_version', 'num_pairs', 'num_classes', 'classes', 'lq', 'gt', 'labels'})
_TEST_SETS_KEYS = frozenset({'options', 'tiers', 'skipped', 'counts'})

OutputBusy = Busy  # the name the tools' handlers and tests used before the lock moved to utils.locks
_held: dict[Path, RunLock] = {}  # staging folder -> the lock on its output (released by finish_output or exit)
_completed: set[Path] = set()  # outputs this process finished (for the message of a late Ctrl-C)


def tool_marker(tool: str) -> dict:
    """The entry a tool puts first into its ``summary.json``: ``{"tool": "cdnsr_plugin <tool>"}``."""
    return {TOOL_KEY: tool}


def _expected_entries(summary: dict) -> Optional[set[str]]:
    """The names a complete output with this summary holds, or ``None`` if these tools did not write it."""
    tool = summary.get(TOOL_KEY)
    if tool == PREPARE_TOOL or (tool is None and _PREPARED_KEYS <= summary.keys() and summary['complete'] is True):
        names = {MARKER, 'montage.png', str(summary.get('montage', 'montage.png'))}
        return names | {
            str(summary.get(key, default))
            for key, default in (('lq', 'lq.lmdb'), ('gt', 'gt.lmdb'), ('labels', 'labels.txt'))
        }
    tiers = summary.get('tiers')
    if (tool == TEST_SETS_TOOL or (tool is None and _TEST_SETS_KEYS <= summary.keys())) and isinstance(tiers, dict):
        return {MARKER} | {str(tier.get('folder')) for tier in tiers.values() if isinstance(tier, dict)}
    return None


def not_ours(folder: Path) -> Optional[str]:
    """``None`` if ``folder`` is a complete output of these tools holding nothing else, else why it is not (for
    messages): it may then hold what the user made, and is never deleted."""
    try:
        summary = json.loads((folder / MARKER).read_text())
    except FileNotFoundError:
        return f'no {MARKER}'
    except (OSError, ValueError):
        return f'its {MARKER} is not one these tools write'
    expected = _expected_entries(summary) if isinstance(summary, dict) else None
    if expected is None:
        return f'its {MARKER} is not one these tools write'
    others = sorted(entry.name for entry in folder.iterdir() if entry.name not in expected)
    if others:
        shown = ', '.join(others[:5]) + (', ...' if len(others) > 5 else '')
        return f'it also holds {shown}, which these tools did not write'
    return None


def _marked(folder: Path, name: str) -> bool:
    """``folder`` is a real folder holding the marker file ``name`` that this module writes."""
    if folder.is_symlink() or not folder.is_dir():
        return False
    try:
        return json.loads((folder / name).read_text()).get('tool') == _MARKER_TOOL
    except (OSError, ValueError, AttributeError):
        return False


def _write_marker(folder: Path, name: str, output: Path) -> None:
    (folder / name).write_text(
        json.dumps({'tool': _MARKER_TOOL, 'output': str(output), 'pid': os.getpid(), 'command': ' '.join(sys.argv)}))


def _lock(output: Path, log: Callable[[str], None]) -> None:
    """Hold the run lock on ``<output>.lock`` (``utils.locks``): a second run on the same output fails at once
    instead of deleting the first one's staging; a dead run's lock is taken over with a note."""
    _held[output.with_name(output.name + INCOMPLETE)] = RunLock(output, 'output', 'pick another --output').acquire(log)


def _release(staging: Path, output: Path) -> None:
    lock = _held.pop(staging, None)
    if lock is not None:
        lock.release()


def _make_parent(output: Path, log: Callable[[str], None]) -> None:
    """Create the folder that will hold ``output`` (``--output a/new/folder``), or say clearly why not."""
    parent = output.absolute().parent
    if parent.is_dir():
        return
    blocker = next((p for p in [parent, *parent.parents] if p.exists() or p.is_symlink()), None)
    if blocker is not None and not blocker.is_dir():
        raise ValueError(f'--output {output}: {blocker} is a file, not a folder; pick another --output')
    try:
        parent.mkdir(parents=True)
    except FileExistsError:  # made meanwhile
        pass
    except OSError as exc:
        raise ValueError(f'--output {output}: cannot create its folder {parent} ({exc.strerror}); '
                         'create it yourself or pick another --output') from None
    log(f'created the folder {parent} for --output')


def _aside_folders(output: Path) -> list[Path]:
    prefix = f'.{output.name}{ASIDE}'
    return sorted(p for p in output.parent.iterdir() if p.name.startswith(prefix) and _marked(p, ASIDE_MARKER))


def _clear_leftovers(output: Path, staging: Path, log: Callable[[str], None]) -> None:
    """Remove what an interrupted run of these tools left (called with the lock held); refuse a staging folder
    that these tools did not make."""
    for aside in _aside_folders(output):  # a run killed while replacing output
        old = aside / output.name
        if not (output.exists() or output.is_symlink()) and (old.exists() or old.is_symlink()):
            log(f'moving {old} back to {output}: a run was interrupted while replacing it')
            old.rename(output)
        log(f'removing {aside}, left by a run interrupted while replacing {output}')
        shutil.rmtree(aside)
    if staging.exists() or staging.is_symlink():
        if not (_marked(staging, STAGING_MARKER) or
                (staging.is_dir() and not staging.is_symlink() and not_ours(staging) is None)):
            raise FileExistsError(f'{staging} exists and was not made by these tools (no {STAGING_MARKER} in it); '
                                  'it is left as it is: move or delete it yourself, or pick another --output')
        log(f'removing {staging}, left by an interrupted run')
        shutil.rmtree(staging)


def start_output(output: Path,
                 overwrite: bool,
                 protect: Optional[Path] = None,
                 log: Callable[[str], None] = print) -> Path:
    """Check ``output`` and return a fresh ``<output>.incomplete`` folder to write into.

    Args:
        output: the folder the finished result will have; missing parent folders are created.
        overwrite: allow replacing an existing ``output`` (at ``finish_output``).
        protect: an input folder that ``output`` must neither be nor contain.
        log: where notes go (a stale incomplete folder removed, a parent folder created, a lock taken over).

    Raises:
        FileExistsError: ``output`` exists and ``overwrite`` is false, or it is a file; ``<output>.incomplete``
            exists and these tools did not make it; ``<output>.lock`` is not the tools' (``ForeignFile``).
        ValueError: ``output`` is ``protect`` or contains it (overwriting would delete the input), or
            ``overwrite`` is asked for a non-empty folder that is not an output of these tools (see ``not_ours``):
            it is the user's, not ours to delete; a parent of ``output`` is a file or cannot be created.
        OutputBusy: another run holds the lock on ``output``.
    """
    output = Path(output)
    if protect is not None:
        source = protect.resolve()
        if output.resolve() == source or output.resolve() in source.parents:
            raise ValueError(f'--output {output} is or contains the input folder {protect}; pick another folder')
    if (output.exists() or output.is_symlink()) and not output.is_dir():
        raise FileExistsError(f'{output} exists and is not a folder; pick another --output')
    if output.exists() and not overwrite:
        raise FileExistsError(f'{output} already exists; pass --overwrite to replace it (only once the new one '
                              'is complete), or pick another --output')
    if output.is_dir() and any(output.iterdir()):
        problem = not_ours(output)
        if problem is not None:
            raise ValueError(f'--overwrite would delete {output}, which is not an output of these tools ({problem}); '
                             'it is left as it is: pick another --output, or move or empty it yourself')
    _make_parent(output, log)
    _lock(output, log)
    staging = output.with_name(output.name + INCOMPLETE)
    try:
        _clear_leftovers(output, staging, log)
        staging.mkdir()
        _write_marker(staging, STAGING_MARKER, output)
    except BaseException:
        _release(staging, output)
        raise
    return staging


def finish_output(staging: Path, output: Path) -> None:
    """Rename the complete ``staging`` folder to ``output``; an old ``output`` is moved aside first (into a new
    folder of a unique name) and deleted last, so at every moment one complete version exists. Releases the lock
    taken by ``start_output``.

    Raises:
        KeyboardInterrupt: a Ctrl-C reached the tool's handler earlier and some library swallowed its
            ``KeyboardInterrupt``: the output is not finished (``interrupts.interrupt_pending``).
    """
    aside = None
    try:
        if interrupt_pending():
            raise KeyboardInterrupt
        with deferred_sigint():  # the renames run to their end: never a moment without a complete output
            (staging / STAGING_MARKER).unlink(missing_ok=True)
            if output.exists() or output.is_symlink():
                aside = Path(tempfile.mkdtemp(prefix=f'.{output.name}{ASIDE}', dir=output.parent))
                _write_marker(aside, ASIDE_MARKER, output)
                output.rename(aside / output.name)
            staging.rename(output)
            _completed.add(output.absolute())
        if aside is not None:
            shutil.rmtree(aside)
    finally:
        _release(staging, output)


def abandon_output(staging: Path, output: Path, remove: bool = False) -> None:
    """After a failed or interrupted run: release the lock; with ``remove``, delete ``staging`` (ours: made by
    ``start_output``), else leave it for inspection (the next run removes it)."""
    try:
        if remove and _marked(staging, STAGING_MARKER):
            with deferred_sigint():
                shutil.rmtree(staging, ignore_errors=True)
    finally:
        _release(staging, output)


def interrupted_note(output: Path) -> str:
    """What a Ctrl-C left of ``output`` in this process, for the tool's one-line message."""
    output = Path(output)
    staging = output.with_name(output.name + INCOMPLETE)
    if output.absolute() in _completed:
        with contextlib.suppress(OSError):
            if _aside_folders(output):
                return (f'{output} was completed before the interrupt; the previous version, moved aside, is '
                        'removed by the next run with this --output')
        return f'{output} was completed before the interrupt'
    if _marked(staging, STAGING_MARKER):
        return f'{output} was not written (the next run with this --output removes the partial {staging})'
    return f'{output} was not written'
