"""Hostile inputs to the tester that once overwrote or lost the user's files: refused before any work, with a
message naming the folder, files or checkpoint part; the user's files unchanged (hashes before and after)."""
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from cdnsr_plugin.tester.cli import main
from cdnsr_plugin.utils.io import readable_size

from helpers import REPO


def hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def run(root: Path, lr: Path, out: Path, *extra, checkpoint=None) -> int:
    return main([
        str(a) for a in ('--input', lr, '--checkpoint', checkpoint or root / 'net.pth', '--network', root / 'net.yml',
                         '--scale', 4, '--out', out, *extra)
    ])


def small_lr(tmp_path: Path, setup) -> Path:
    """A copy of two of the tester's LR images (the originals stay untouched)."""
    root, _ = setup
    folder = tmp_path / 'lr'
    folder.mkdir()
    for path in sorted((root / 'lr').iterdir())[:2]:
        shutil.copy(path, folder / path.name)
    return folder


def test_out_equal_to_inside_or_above_the_input_folder_is_refused(setup, tmp_path, capsys):
    root, _ = setup
    lr = small_lr(tmp_path, setup)
    before = hashes(lr)
    for out, where in ((lr, 'is the input folder'), (lr / 'sr', 'is inside'), (tmp_path, 'contains')):
        assert run(root, lr, out) == 2
        assert where in capsys.readouterr().err
    assert hashes(lr) == before and not (lr / 'sr').exists()  # nothing written, nothing replaced


def test_inputs_whose_outputs_would_collide_are_refused_before_any_work(setup, tmp_path, capsys):
    root, _ = setup
    lr = small_lr(tmp_path, setup)
    first = sorted(lr.iterdir())[0]
    img = cv2.imread(str(first))
    cv2.imwrite(str(lr / f'{first.stem}.jpg'), img)  # same stem, other format
    cv2.imwrite(str(lr / f'{first.stem}_classmap.png'), img)  # named like its class map
    assert run(root, lr, tmp_path / 'out') == 2
    message = capsys.readouterr().err
    assert f'{first.stem}.jpg and {first.name}' in message and f"{first.stem}'s class map" in message
    assert not any((tmp_path / 'out').rglob('*.png'))  # refused before any image
    assert run(root, lr, tmp_path / 'out2', '--no-save-images') == 0  # nothing per image written: no collision


def test_non_finite_weights_are_refused_naming_the_part(setup, tmp_path, capsys):
    root, _ = setup
    state = torch.load(root / 'net.pth', weights_only=True)
    params = state['params'] if 'params' in state else state
    key = next(k for k in params if k.startswith('branches.1.') and params[k].is_floating_point())
    params[key] = torch.full_like(params[key], float('nan'))
    torch.save(state, tmp_path / 'nan.pth')
    lr = small_lr(tmp_path, setup)
    assert run(root, lr, tmp_path / 'out', checkpoint=tmp_path / 'nan.pth') == 2
    message = capsys.readouterr().err
    assert 'non-finite' in message and 'branch1' in message and 'nan.pth' in message
    assert not any((tmp_path / 'out').rglob('*.png'))


def test_an_unwritable_out_is_refused_before_any_work(setup, tmp_path, capsys):
    root, _ = setup
    lr = small_lr(tmp_path, setup)
    blocker = tmp_path / 'a_file'
    blocker.write_bytes(b'not a folder')
    assert run(root, lr, blocker / 'out') == 2
    assert f'{blocker} is a file, not a folder' in capsys.readouterr().err  # the file in the way is named
    assert blocker.read_bytes() == b'not a folder'


def test_images_that_come_out_non_finite_fail_and_the_rest_are_processed(setup, tmp_path):
    """Finite weights can still overflow on an input: branch weights scaled by 1e30 send any non-black image to
    inf/NaN, while a black image stays finite (zero activations plus unscaled biases). The overflowing images
    are listed as failed with the reason, the black one is written, exit status 1."""
    root, _ = setup
    state = torch.load(root / 'net.pth', weights_only=True)
    params = state['params'] if 'params' in state else state
    for key, value in params.items():
        if key.startswith('branches.') and key.endswith('weight') and value.dim() == 4:
            params[key] = value * 1e30
    torch.save(state, tmp_path / 'overflow.pth')
    lr = small_lr(tmp_path, setup)
    cv2.imwrite(str(lr / 'black.png'), np.zeros((40, 50, 3), dtype=np.uint8))
    out = tmp_path / 'out'
    assert run(root, lr, out, checkpoint=tmp_path / 'overflow.pth') == 1
    report = json.loads((out / 'report.json').read_text())
    failed = {Path(f['file']).name: f['error'] for f in report['failures']}
    assert set(failed) == {p.name for p in lr.iterdir()} - {'black.png'}
    assert all('non-finite values' in error for error in failed.values())
    assert [r['image'] for r in report['settings'][0]['images']] == ['black']
    assert (out / 'lr' / 'black.png').is_file()


def test_a_second_run_into_the_same_folder_needs_overwrite_which_removes_only_the_earlier_run(setup, tmp_path, capsys):
    root, _ = setup
    lr = small_lr(tmp_path, setup)
    out = tmp_path / 'out'
    assert run(root, lr, out) == 0
    first = json.loads((out / 'report.json').read_text())
    outputs = [Path(r[k]) for r in first['settings'][0]['images'] for k in ('sr_path', 'overlay_path')]
    assert outputs and all(p.is_file() for p in outputs)
    (out / 'my_notes.txt').write_text('mine')
    assert run(root, lr, out) == 2
    assert 'not empty' in capsys.readouterr().err and all(p.is_file() for p in outputs)
    # a smaller second run: the earlier run's images go, the user's own file stays, the report is this run's
    (lr / sorted(p.name for p in lr.iterdir())[0]).unlink()
    assert run(root, lr, out, '--overwrite') == 0
    second = json.loads((out / 'report.json').read_text())
    kept = {Path(r['sr_path']).name for r in second['settings'][0]['images']}
    assert len(kept) == 1 and {p.name
                               for p in (out / 'lr').glob('*.png')
                               } == kept | {Path(r['overlay_path']).name
                                            for r in second['settings'][0]['images']}
    assert (out / 'my_notes.txt').read_text() == 'mine'


def test_a_non_positive_thread_count_is_refused(setup, tmp_path, capsys):
    root, _ = setup
    lr = small_lr(tmp_path, setup)
    assert run(root, lr, tmp_path / 'out', '--threads', -1) == 2
    assert '--threads must be a positive' in capsys.readouterr().err and not (tmp_path / 'out').exists()


def test_an_output_that_cannot_fit_fails_that_image_before_any_work(setup, tmp_path, monkeypatch):
    """The output's size is checked against the free memory before an image is run: the image that cannot
    fit is listed as failed with the sizes, the others are processed (exit status 1)."""
    from cdnsr_plugin.tester import safety
    with pytest.raises(ValueError, match=r'160000x160000 output[\s\S]*GB'):
        safety.check_memory(Path('huge.png'), 40000, 40000, 4, torch.device('cpu'))  # 576 GB at x4
    root, _ = setup
    lr = small_lr(tmp_path, setup)
    sizes = {p.name: cv2.imread(str(p)).shape[:2] for p in lr.iterdir()}
    big = max(sizes, key=lambda name: sizes[name][0] * sizes[name][1])
    limit = 1.5 * safety.output_bytes(*sizes[big], 4) - 1  # just too little for the largest input
    monkeypatch.setattr(safety, 'available_memory', lambda device: int(limit))
    out = tmp_path / 'out'
    assert run(root, lr, out) == 1
    report = json.loads((out / 'report.json').read_text())
    assert [Path(f['file']).name for f in report['failures']] == [big]
    assert re.search(r'needs about [0-9.]+ MB and [0-9.]+ MB are free on cpu', report['failures'][0]['error'])
    assert len(report['settings'][0]['images']) == len(sizes) - 1


def test_overwrite_never_deletes_through_links_or_inputs_and_refuses_unexplained_images(setup, tmp_path, capsys):
    """--overwrite removes only what an earlier report lists, resolved inside --out: never a file reached
    through a symbolic link, never one of this run's inputs; and it refuses, before deleting anything, when
    images would remain that it may not remove (an interrupted run's, or behind a link)."""
    from cdnsr_plugin.tester.safety import earlier_run_files
    root, _ = setup
    lr = small_lr(tmp_path, setup)
    out = tmp_path / 'out'
    assert run(root, lr, out) == 0
    (tmp_path / 'alias').symlink_to(lr)  # an alias of the inputs is still the inputs
    assert run(root, lr, tmp_path / 'alias', '--overwrite') == 2
    assert 'is the input folder' in capsys.readouterr().err
    router = out / 'laplacian_router.json'
    router.write_text('{}')
    assert router not in earlier_run_files(out, keep=[router])  # an input of this run is kept ...
    assert router in earlier_run_files(out) and out / 'report.json' in earlier_run_files(out)  # ... else removed
    # the set folder replaced by a link to a folder outside: nothing behind it is deleted, nothing at all is
    outside = tmp_path / 'outside'
    shutil.move(str(out / 'lr'), str(outside))
    (out / 'lr').symlink_to(outside)
    before = hashes(outside)
    assert run(root, lr, out, '--overwrite') == 2
    assert 'will not remove' in capsys.readouterr().err
    assert hashes(outside) == before and (out / 'report.json').is_file() and router.is_file()
    # images that no report or progress list describes (the user's, or an older version's interrupted run), and
    # a report file of the user's: nothing is removed or replaced
    stale = tmp_path / 'stale'
    (stale / 'lr').mkdir(parents=True)
    (stale / 'lr' / 'old.png').write_bytes(b'an image of an interrupted run')
    assert run(root, lr, stale, '--overwrite') == 2
    assert 'no report.json or run_in_progress.json' in capsys.readouterr().err and (stale / 'lr' / 'old.png').exists()
    mine = tmp_path / 'mine'
    mine.mkdir()
    (mine / 'report.csv').write_text('my own table')
    assert run(root, lr, mine, '--overwrite') == 2
    assert 'will not remove' in capsys.readouterr().err and (mine / 'report.csv').read_text() == 'my own table'


def test_file_names_that_are_not_utf8_are_processed_and_reported(setup, tmp_path):
    """A file name with a Latin-1 byte (not valid UTF-8) once made cv2.imwrite segfault and then the CSV
    report fail; it is now read, written and reported like any other (the CSV keeps the name's bytes)."""
    root, _ = setup
    lr = small_lr(tmp_path, setup)
    first = sorted(lr.iterdir())[0]
    odd = os.fsdecode(b'caf\xe9.png')
    first.rename(lr / odd)
    out = tmp_path / 'out'
    assert run(root, lr, out) == 0
    assert (out / 'lr' / odd).is_file() and (out / 'lr' / os.fsdecode(b'caf\xe9_classmap.png')).is_file()
    assert b'caf\xe9' in (out / 'report.csv').read_bytes()
    report = json.loads((out / 'report.json').read_text())
    assert os.fsdecode(b'caf\xe9') in {r['image'] for r in report['settings'][0]['images']}


def test_free_space_for_the_outputs_is_checked_before_any_work(setup, tmp_path, capsys, monkeypatch):
    """The disk's free space (as ``shutil.disk_usage`` reports it, here set to a small disk) against the raw size
    of the SR images and class maps: below a quarter of it the run is refused, exit 2, nothing written; below
    all of it a warning names both sizes and the run goes on."""
    from cdnsr_plugin.tester import safety
    root, _ = setup
    lr = small_lr(tmp_path, setup)
    raw = sum(2 * 3 * 16 * h * w for h, w in map(safety.image_size, lr.iterdir()))
    real = shutil.disk_usage

    def small_disk(free):
        return lambda path: real(path)._replace(free=free)

    monkeypatch.setattr(safety.shutil, 'disk_usage', small_disk(int(0.2 * raw)))
    assert run(root, lr, tmp_path / 'full') == 2
    err = capsys.readouterr().err
    assert 'free some space' in err and f'to {readable_size(raw)} (SR images' in err
    sizes = r'[0-9.]+ [KM]B to [0-9.]+ [KM]B \(SR images and class maps as PNG\) and [0-9.]+ [KM]B are free'
    assert re.search('need about ' + sizes, err)  # sizes a user reads, not '0.00-0.00 GB'
    assert not any((tmp_path / 'full').rglob('*.png'))
    monkeypatch.setattr(safety.shutil, 'disk_usage', small_disk(int(0.5 * raw)))
    assert run(root, lr, tmp_path / 'tight') == 0
    assert 'images that do not fit will fail' in capsys.readouterr().err
    assert len(list((tmp_path / 'tight' / 'lr').glob('*_classmap.png'))) == 2


def tree(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (relative path -> sha256)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob('*')) if p.is_file()
    }


# a tester run that writes its first SR image and class map, says so (touches argv[1]) and then waits, as a long
# run would, until it is signalled or killed
PAUSED_RUN = """
import sys, time
from pathlib import Path
from cdnsr_plugin.tester import run
from cdnsr_plugin.tester.cli import main
save = run.Runner.save_images
def save_then_wait(self, *args, **kwargs):
    save(self, *args, **kwargs)
    Path(sys.argv[1]).touch()
    time.sleep(300)
run.Runner.save_images = save_then_wait
sys.exit(main(sys.argv[2:]))
"""


def start_paused(root: Path, lr: Path, out: Path, logs: Path) -> subprocess.Popen:
    """``PAUSED_RUN`` in a subprocess, once it has written its first image (its stderr goes to ``logs/paused.err``)."""
    ready = logs / 'ready'
    args = ['--input', lr, '--checkpoint', root / 'net.pth', '--network', root / 'net.yml', '--scale', 4, '--out', out]
    env = {**os.environ, 'CUDA_VISIBLE_DEVICES': '', 'OMP_NUM_THREADS': '1'}
    with open(logs / 'paused.out', 'w') as stdout, open(logs / 'paused.err', 'w') as stderr:
        proc = subprocess.Popen(
            [sys.executable, '-c', PAUSED_RUN, str(ready), *map(str, args)],
            cwd=REPO,
            env=env,
            stdout=stdout,
            stderr=stderr)
    deadline = time.monotonic() + 180
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f'the paused run did not reach its first image: {(logs / "paused.err").read_text()[-3000:]}')
        time.sleep(0.05)
    return proc


def test_a_second_run_into_a_busy_out_fails_at_once_and_a_dead_runs_lock_is_taken_over(setup, tmp_path, capsys):
    """Two runs into one --out once both exited 0 with one report listing only one run's images (and one run's
    SR images replaced by the other's). The first run locks --out: a second one (even with --overwrite) fails at
    once, exit 2, one line naming the first's process, writing and removing nothing; once the first is killed
    (SIGKILL: the OS drops its lock, the file stays), the next run takes the lock over with a note, and
    --overwrite replaces the killed run's partial outputs (listed in its progress file)."""
    root, _ = setup
    lr = small_lr(tmp_path, setup)
    inputs = hashes(lr)
    out = tmp_path / 'out'
    first = start_paused(root, lr, out, tmp_path)
    try:
        written = tree(out)
        assert {'run_in_progress.json', 'lr/a_97x250.png', 'lr/a_97x250_classmap.png'} <= set(written)
        began = time.monotonic()
        assert run(root, lr, out, '--overwrite') == 2
        assert time.monotonic() - began < 15  # at once: before the network is even built
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith('error: another run is writing the results folder')
        assert f'process {first.pid} (' in lines[0] and str(out) in lines[0] and 'choose another --out' in lines[0]
        assert tree(out) == written and first.poll() is None  # nothing of the first run's touched
    finally:
        first.kill()
        first.wait(timeout=60)
    assert (tmp_path / 'out.lock').is_file()  # a stale lock: its holder died without releasing it
    assert run(root, lr, out, '--overwrite') == 0
    err = capsys.readouterr().err
    assert f'note: taking over the lock on the results folder (--out) {out} left by process {first.pid}' in err
    assert 'no longer running' in err
    report = json.loads((out / 'report.json').read_text())
    listed = {Path(r[k]).name for r in report['settings'][0]['images'] for k in ('sr_path', 'overlay_path')}
    assert len(listed) == 4 and {p.name for p in (out / 'lr').iterdir()} == listed
    assert not (out / 'run_in_progress.json').exists() and not (tmp_path / 'out.lock').exists()
    assert hashes(lr) == inputs


def test_ctrl_c_prints_one_line_exits_130_and_overwrite_removes_what_the_run_wrote(setup, tmp_path, capsys):
    """SIGINT (Ctrl-C) once printed a traceback, and the rerun refused the interrupted run's images, which the
    user deleted by hand. Now: one line, exit 130, no report.json, the outputs written so far listed in
    run_in_progress.json, --out unlocked; a rerun without --overwrite is refused, with it the listed outputs are
    replaced and the user's own file in --out stays."""
    root, _ = setup
    lr = small_lr(tmp_path, setup)
    inputs = hashes(lr)
    out = tmp_path / 'out'
    proc = start_paused(root, lr, out, tmp_path)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    err = (tmp_path / 'paused.err').read_text()
    lines = [line for line in err.splitlines() if line.strip()]
    assert 'Traceback' not in err and sum('interrupted' in line for line in lines) == 1
    assert lines[-1] == (f'interrupted: no report was written; the 2 output file(s) of this run so far are listed '
                         f'in {out / "run_in_progress.json"}: rerun with --overwrite to replace them')
    assert not (out / 'report.json').exists() and not (tmp_path / 'out.lock').exists()
    progress = json.loads((out / 'run_in_progress.json').read_text())
    assert progress['outputs'] == ['lr/a_97x250.png', 'lr/a_97x250_classmap.png']
    (out / 'my_notes.txt').write_text('mine')
    assert run(root, lr, out) == 2
    assert 'not empty (an earlier run, or an interrupted one?)' in capsys.readouterr().err
    assert run(root, lr, out, '--overwrite') == 0
    report = json.loads((out / 'report.json').read_text())
    listed = {Path(r[k]).name for r in report['settings'][0]['images'] for k in ('sr_path', 'overlay_path')}
    assert len(listed) == 4 and {p.name for p in (out / 'lr').iterdir()} == listed
    assert not (out / 'run_in_progress.json').exists() and (out / 'my_notes.txt').read_text() == 'mine'
    assert hashes(lr) == inputs


def test_a_single_input_image_may_have_its_results_in_its_folder_but_is_never_an_output(
        setup, tmp_path, capsys, monkeypatch):
    """``cd photos && cdnsr-sr coffee.png`` (results/<model>/coffee inside the input's folder) was refused as
    "inside the input folder". A single input image protects itself and the user's other files: allowed, the
    folder's files unchanged; an --out where the SR image would be the input file is refused, nothing written."""
    root, _ = setup
    photos = small_lr(tmp_path, setup)
    (photos / 'notes.txt').write_text('mine')
    before = hashes(photos)
    image = sorted(photos.glob('*.png'))[0]
    monkeypatch.chdir(photos)
    assert run(root, Path(image.name), Path('results/x')) == 0
    capsys.readouterr()
    assert hashes(photos) == before
    outputs = [f'x/lr/{image.stem}.png', f'x/lr/{image.stem}_classmap.png', 'x/report.csv', 'x/report.json']
    assert sorted(tree(photos / 'results')) == sorted(outputs)
    # --out above the input's folder: <out>/lr/<stem>.png would be the input itself
    for extra in ((), ('--overwrite', )):
        assert run(root, image, tmp_path, *extra) == 2
        err = capsys.readouterr().err
        assert f'which is the input file {image}' in err and err.count('\n') == 1
    assert hashes(photos) == before and not tmp_path.with_name(tmp_path.name + '.lock').exists()
