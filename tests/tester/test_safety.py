"""Hostile inputs to the tester that once overwrote or lost the user's files: refused before any work, with a
message naming the folder, files or checkpoint part; the user's files unchanged (hashes before and after)."""
import hashlib
import json
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from cdnsr_plugin.tester.cli import main


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
    assert 'not writable' in capsys.readouterr().err
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
    assert 'GB are free' in report['failures'][0]['error']
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
    # an interrupted run: images, no report
    stale = tmp_path / 'stale'
    (stale / 'lr').mkdir(parents=True)
    (stale / 'lr' / 'old.png').write_bytes(b'an image of an interrupted run')
    assert run(root, lr, stale, '--overwrite') == 2
    assert 'no report.json describes' in capsys.readouterr().err and (stale / 'lr' / 'old.png').exists()


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
    assert 'free some space' in err and f'{raw / 2**30:.2f} GB' in err
    assert not any((tmp_path / 'full').rglob('*.png'))
    monkeypatch.setattr(safety.shutil, 'disk_usage', small_disk(int(0.5 * raw)))
    assert run(root, lr, tmp_path / 'tight') == 0
    assert 'images that do not fit will fail' in capsys.readouterr().err
    assert len(list((tmp_path / 'tight' / 'lr').glob('*_classmap.png'))) == 2
