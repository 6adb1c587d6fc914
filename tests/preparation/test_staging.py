"""Issue 25: what tools/prepare_data.py and tools/make_test_sets.py may delete (only what they made), their output
lock, missing parent folders, and Ctrl-C in the short steps that must not be cut. Both tools run in this process
(``main``) on one small photo, so each case is fast; exit status, messages and files are checked."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import cv2
import pytest

from cdnsr_plugin.preparation import staging
from cdnsr_plugin.preparation.interrupts import deferred_sigint

from helpers import REPO


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / 'tools' / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


prepare_data, make_test_sets = load_tool('prepare_data'), load_tool('make_test_sets')


def run_prepare(input_dir: Path, output: Path, *extra: str) -> int:
    paths = ['--input', str(input_dir), '--output', str(output)]
    return prepare_data.main(paths + ['--reference', 'bicubic', '--classes', '2', '--workers', '0', *extra])


def run_test_sets(input_dir: Path, output: Path, *extra: str) -> int:
    paths = ['--input', str(input_dir), '--output', str(output)]
    return make_test_sets.main(paths + ['--tiers', '2K=64,8K=0', '--workers', '0', *extra])


# tool -> (run, exit status of a refused run)
TOOLS = {'prepare_data': (run_prepare, 2), 'make_test_sets': (run_test_sets, 2)}


def hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (or of ``root`` itself), and the folders, by relative path."""
    if root.is_file():
        return {'': hashlib.sha256(root.read_bytes()).hexdigest()}
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else 'folder'
        for path in sorted(root.rglob('*'))
    }


def names(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


@pytest.fixture(scope='module')
def photo_dir(tmp_path_factory, photos) -> Path:
    """One 160x200 crop of a real photo: four sub-image pairs for prepare_data, one image per tier."""
    folder = tmp_path_factory.mktemp('photo')
    cv2.imwrite(str(folder / 'crop.png'), photos[1][100:260, 200:400])
    return folder


@pytest.fixture(params=sorted(TOOLS))
def tool(request):
    return request.param


def test_overwrite_leaves_a_users_output_old_alone(tool, photo_dir, tmp_path, capsys):
    """``--overwrite`` once moved the old output to ``OUTPUT.old`` after ``rmtree(OUTPUT.old)``: a backup the
    user kept there was deleted. The old output now goes into a new folder of a unique name."""
    run, _ = TOOLS[tool]
    out = tmp_path / 'set'
    assert run(photo_dir, out) == 0
    backup = tmp_path / 'set.old'
    backup.mkdir()
    (backup / 'summary.json').write_text('{"mine": true}')
    (backup / 'notes.txt').write_text('my backup of the set, with my notes')
    before, inputs = hashes(backup), hashes(photo_dir)
    assert run(photo_dir, out, '--overwrite') == 0
    assert hashes(backup) == before and hashes(photo_dir) == inputs
    summary = json.loads((out / 'summary.json').read_text())
    assert summary['tool'] == f'cdnsr_plugin {tool}'
    assert names(tmp_path) == ['set', 'set.old']  # no staging folder, lock or moved-aside old output left
    capsys.readouterr()


def test_a_folder_with_a_summary_json_of_its_own_is_never_replaced(tool, photo_dir, tmp_path, capsys):
    """Any ``summary.json`` once made a folder 'an output of these tools': ``{}`` beside a thesis and photos was
    replaced whole by ``--overwrite``. The summary must be one these tools write, and the folder may hold only
    what they write."""
    run, refused = TOOLS[tool]
    folder = tmp_path / 'F'
    (folder / 'photos').mkdir(parents=True)
    (folder / 'summary.json').write_text('{}')
    (folder / 'thesis.tex').write_text('\\documentclass{report} ... two years of work')
    (folder / 'photos' / 'a.jpg').write_bytes(b'\xff\xd8 holiday')
    before = hashes(folder)
    assert run(photo_dir, folder, '--overwrite') == refused
    err = capsys.readouterr().err
    assert 'not an output of these tools' in err and 'summary.json is not one these tools write' in err
    assert hashes(folder) == before and names(tmp_path) == ['F']
    # a real output of the tool with the user's file added, and a real summary copied beside the user's files
    out = tmp_path / 'set'
    assert run(photo_dir, out) == 0
    (out / 'thesis.tex').write_text('my thesis')
    shutil.copy(out / 'summary.json', folder / 'summary.json')
    for target in (out, folder):
        before = hashes(target)
        assert run(photo_dir, target, '--overwrite') == refused
        err = capsys.readouterr().err
        assert 'not an output of these tools' in err and 'thesis.tex, which these tools did not write' in err
        assert hashes(target) == before
    assert names(tmp_path) == ['F', 'set']


def test_outputs_written_before_the_tool_marker_are_still_replaced(tool, photo_dir, tmp_path, capsys):
    run, _ = TOOLS[tool]
    out = tmp_path / 'set'
    assert run(photo_dir, out) == 0
    summary = json.loads((out / 'summary.json').read_text())
    del summary['tool']  # as the tools wrote it before issue 25
    (out / 'summary.json').write_text(json.dumps(summary))
    assert run(photo_dir, out, '--overwrite') == 0
    assert json.loads((out / 'summary.json').read_text())['tool'] == f'cdnsr_plugin {tool}'
    assert names(tmp_path) == ['set']
    capsys.readouterr()


def test_a_users_incomplete_folder_or_lock_file_is_left_alone(tool, photo_dir, tmp_path, capsys):
    """``OUTPUT.incomplete`` and ``OUTPUT.lock`` that the user made are refused and left as they are; a staging
    folder a run of these tools left (with its marker) is removed with a note."""
    run, refused = TOOLS[tool]
    out = tmp_path / 'set'
    mine = tmp_path / 'set.incomplete'
    mine.mkdir()
    (mine / 'draft.txt').write_text('my draft, not a staging folder')
    before = hashes(mine)
    assert run(photo_dir, out) == refused
    err = capsys.readouterr().err
    assert f'{mine} exists and was not made by these tools' in err and 'left as it is' in err
    assert hashes(mine) == before and names(tmp_path) == ['set.incomplete']  # no output, the lock released
    shutil.rmtree(mine)
    lock = tmp_path / 'set.lock'
    lock.write_text('my list of locks to buy')
    assert run(photo_dir, out) == refused
    err = capsys.readouterr().err
    assert f'{lock} exists and was not written by these tools' in err
    assert lock.read_text() == 'my list of locks to buy' and names(tmp_path) == ['set.lock']
    lock.unlink()
    left = staging.start_output(out, False)  # a run that stopped half-way: its staging folder stays
    (left / 'half.png').write_bytes(b'')
    staging.abandon_output(left, out)
    assert run(photo_dir, out) == 0
    assert f'removing {left}, left by an interrupted run' in capsys.readouterr().out
    assert names(tmp_path) == ['set'] and not (out / 'half.png').exists()


def test_missing_parent_folders_of_the_output_are_created(tool, photo_dir, tmp_path, capsys):
    """``--output new/deeper/set`` once failed with "No such file ... set.lock"; the folders are now created.
    A parent that is a file is refused with a clear message."""
    run, refused = TOOLS[tool]
    out = tmp_path / 'new' / 'deeper' / 'set'
    assert run(photo_dir, out) == 0
    assert f'created the folder {out.parent}' in capsys.readouterr().out
    assert (out / 'summary.json').is_file() and names(out.parent) == ['set']
    blocker = tmp_path / 'a_file'
    blocker.write_text('not a folder')
    assert run(photo_dir, blocker / 'set') == refused
    assert f'{blocker} is a file, not a folder' in capsys.readouterr().err
    assert blocker.read_text() == 'not a folder'


HOLDER = '''
import importlib.util, sys
spec = importlib.util.spec_from_file_location('locks', sys.argv[1])
locks = importlib.util.module_from_spec(spec)
spec.loader.exec_module(locks)
lock = locks.RunLock(sys.argv[2], 'output', 'pick another --output').acquire()
print('holding', flush=True)
sys.stdin.read()
lock.release()
'''


def test_a_second_run_on_one_output_fails_at_once_naming_the_first(tool, photo_dir, tmp_path, capsys):
    """The first run (here a process that holds the output's lock as a run does, with its staging folder) makes a
    second run on the same ``--output`` fail at once, naming the first's process and command; the first's
    staging is untouched. Once the first has ended, a run goes ahead."""
    run, refused = TOOLS[tool]
    out = tmp_path / 'set'
    first_staging = tmp_path / 'set.incomplete'
    first_staging.mkdir()
    staging._write_marker(first_staging, staging.STAGING_MARKER, out)  # as start_output makes it
    (first_staging / 'lq.lmdb').write_bytes(b'the first run is writing this')
    first = subprocess.Popen(
        [sys.executable, '-c', HOLDER,
         str(REPO / 'cdnsr_plugin' / 'utils' / 'locks.py'),
         str(out), 'the-first-run'],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True)
    try:
        assert first.stdout.readline().strip() == 'holding'
        lock_before = (tmp_path / 'set.lock').read_bytes()
        started = time.monotonic()
        assert run(photo_dir, out) == refused
        assert time.monotonic() - started < 5
        err = capsys.readouterr().err
        assert f'another run is writing the output {out}: process {first.pid}' in err and 'the-first-run' in err
        assert (first_staging / 'lq.lmdb').read_bytes() == b'the first run is writing this'
        assert (tmp_path / 'set.lock').read_bytes() == lock_before and not out.exists()
    finally:
        first.communicate('', timeout=30)
    assert not (tmp_path / 'set.lock').exists()  # released by the first
    assert run(photo_dir, out) == 0 and names(tmp_path) == ['set']
    assert 'left by an interrupted run' in capsys.readouterr().out


def test_a_stale_lock_of_a_dead_run_is_taken_over_with_a_note(tool, photo_dir, tmp_path, capsys):
    """A lock file with the tools' content whose process has ended (nobody holds the OS lock): taken over."""
    run, _ = TOOLS[tool]
    ended = subprocess.Popen([sys.executable, '-c', 'pass'])
    ended.wait()
    out = tmp_path / 'set'
    (tmp_path / 'set.lock').write_text(
        json.dumps({
            'tool': 'cdnsr_plugin lock', 'pid': ended.pid, 'host': socket.gethostname(),
            'command': f'tools/{tool}.py --output set (the dead run)', 'started': '2026-12-01 10:00:00',
            'target': str(out)
        }))
    assert run(photo_dir, out) == 0
    printed = capsys.readouterr().out
    assert f'note: taking over the lock on the output {out} left by process {ended.pid}' in printed
    assert '(the dead run)' in printed and 'which is no longer running' in printed
    assert names(tmp_path) == ['set'] and (out / 'summary.json').is_file()


def test_an_interrupted_lock_acquisition_leaves_no_lock_file(tmp_path, monkeypatch):
    """A Ctrl-C (or a kill) while the lock was being taken once left an empty ``OUTPUT.lock``, which every later
    run refused as 'not written by these tools'. The lock file now appears with its content or not at all."""
    from cdnsr_plugin.utils import locks

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(locks.RunLock, '_content', interrupted)
    with pytest.raises(KeyboardInterrupt):
        locks.RunLock(tmp_path / 'set').acquire()
    assert names(tmp_path) == []
    monkeypatch.undo()
    lock = locks.RunLock(tmp_path / 'set').acquire()
    assert locks.owned_by_tools(tmp_path / 'set.lock')
    lock.release()
    assert names(tmp_path) == []


class _SwallowedCtrlC:
    """A tool's SIGINT handler after a Ctrl-C whose KeyboardInterrupt some library swallowed."""
    interrupted = True

    def __call__(self, signum, frame):
        raise KeyboardInterrupt


def test_a_swallowed_ctrl_c_finishes_no_output(tmp_path):
    """Two of nine Ctrl-Cs a few seconds into prepare_data.py once ended with exit 0 and a complete output: the
    tools' handler remembers the Ctrl-C and ``finish_output`` finishes nothing after one."""
    out = tmp_path / 'set'
    folder = staging.start_output(out, False)
    (folder / 'summary.json').write_text(json.dumps({'tool': staging.PREPARE_TOOL}))
    previous = signal.signal(signal.SIGINT, _SwallowedCtrlC())
    try:
        with pytest.raises(KeyboardInterrupt):
            staging.finish_output(folder, out)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert not out.exists() and names(tmp_path) == ['set.incomplete']  # the lock released, the output not made
    assert staging.interrupted_note(out).startswith(f'{out} was not written (the next run')


def test_a_ctrl_c_during_a_step_that_must_not_be_cut_comes_after_it():
    done = []
    with pytest.raises(KeyboardInterrupt):
        with deferred_sigint():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # the signal has arrived; the step goes on
            done.append('step')
    assert done == ['step']


def test_a_run_killed_while_replacing_its_output_is_repaired_by_the_next(tmp_path, capsys):
    """Killed between moving the old output aside and renaming the new one in: the next run moves the old one
    back; killed while deleting the old one: the next run deletes the rest. Nothing else is touched."""
    out = tmp_path / 'set'
    for case in ('between the renames', 'while deleting the old one'):
        out.mkdir()
        (out / 'summary.json').write_text(json.dumps({'tool': staging.TEST_SETS_TOOL, 'tiers': {}}))
        aside = tmp_path / f'.set{staging.ASIDE}killed'
        aside.mkdir()
        staging._write_marker(aside, staging.ASIDE_MARKER, out)
        if case == 'between the renames':
            out.rename(aside / 'set')
        else:
            (aside / 'set').mkdir()
            (aside / 'set' / 'half-deleted.png').write_bytes(b'')
        user = tmp_path / '.set.replaced-by-me'  # the user's, same prefix, no marker
        user.mkdir(exist_ok=True)
        folder = staging.start_output(out, True)
        printed = capsys.readouterr().out
        assert f'removing {aside}, left by a run interrupted while replacing {out}' in printed
        assert (f'moving {aside / "set"} back to {out}' in printed) == (case == 'between the renames')
        assert json.loads((out / 'summary.json').read_text())['tool'] == staging.TEST_SETS_TOOL
        staging.abandon_output(folder, out, remove=True)
        assert names(tmp_path) == ['.set.replaced-by-me', 'set']
        shutil.rmtree(out)
