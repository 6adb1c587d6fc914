"""tools/prepare_data.py: difficulty-classified LMDBs from real photos, loaded by BasicSR and the plugin."""
import json
import math
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from basicsr.archs import build_network
from basicsr.metrics.psnr_ssim import calculate_psnr

from cdnsr_plugin.data.difficulty_dataset import DifficultyPairedDataset, read_labels
from cdnsr_plugin.inference.tiling import PatchGrid
from cdnsr_plugin.preparation.prepare import PrepareOptions, build_reference, prepare

TINY_REFERENCE = {'type': 'MSRResNet', 'num_feat': 8, 'num_block': 1, 'upscale': 4}


@pytest.fixture(scope='module')
def tiny_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    net = build_network(TINY_REFERENCE)
    path = tmp_path_factory.mktemp('ckpt') / 'tiny_msrresnet.pth'
    torch.save({'params': net.state_dict()}, path)
    return path


@pytest.fixture(scope='module')
def prepared(tmp_path_factory, hr_folder, tiny_checkpoint):
    out = tmp_path_factory.mktemp('prep') / 'set_x4'
    opts = PrepareOptions(input=str(hr_folder), output=str(out), num_classes=3, multiscale=(1.0, 0.7), workers=0)
    reference = build_reference(4, 'cpu', arch=dict(TINY_REFERENCE), checkpoint=str(tiny_checkpoint))
    summary = prepare(opts, reference, montage=True)
    return out, summary


def meta_keys(lmdb_dir: Path) -> list:
    return [line.split('.')[0] for line in (lmdb_dir / 'meta_info.txt').read_text().splitlines()]


def test_keys_match_and_cover_every_sub_image(prepared, hr_folder):
    out, summary = prepared
    lq, gt = meta_keys(out / 'lq.lmdb'), meta_keys(out / 'gt.lmdb')
    assert lq == gt and len(set(lq)) == len(lq) == summary['num_pairs']
    expected = 0
    for path in hr_folder.iterdir():  # the sizes of the crops as written, whatever the photos were
        height, width = cv2.imread(str(path)).shape[:2]
        for factor in (1.0, 0.7):  # basicsr's imresize gives ceil(factor * size) pixels; then mod-crop to 4
            hr_h, hr_w = (height, width) if factor == 1 else (math.ceil(height * factor), math.ceil(width * factor))
            expected += len(PatchGrid.for_image(hr_h // 4, hr_w // 4, 32, 16))
    assert summary['num_pairs'] == expected
    assert all(key.isascii() and '.' not in key and ' ' not in key for key in lq)


def test_classes_are_equal_size_and_ordered_by_psnr(prepared):
    out, summary = prepared
    counts = [c['count'] for c in summary['classes']]
    assert max(counts) - min(counts) <= 1 and sum(counts) == summary['num_pairs']
    means = [c['psnr_mean'] for c in summary['classes']]
    assert means[0] > means[1] > means[2]
    labels = read_labels(out / 'labels.txt')
    by_class = [[p for label, p in labels.values() if label == c] for c in range(3)]
    assert min(by_class[0]) >= max(by_class[1]) and min(by_class[1]) >= max(by_class[2])  # labels follow ranks
    assert summary['reference']['kind'] == 'network' and summary['reference']['arch']['type'] == 'MSRResNet'


def test_scores_are_basicsr_psnr_of_the_reference(prepared, tiny_checkpoint):
    """Recompute a few scores with BasicSR's numpy PSNR on uint8 images (Y channel, crop_border=4)."""
    out, _ = prepared
    labels = read_labels(out / 'labels.txt')
    dataset = DifficultyPairedDataset({
        'name': 'p', 'dataroot_gt': str(out / 'gt.lmdb'), 'dataroot_lq': str(out / 'lq.lmdb'),
        'io_backend': {'type': 'lmdb'}, 'phase': 'val', 'scale': 4
    })
    reference = build_reference(4, 'cpu', arch=dict(TINY_REFERENCE), checkpoint=str(tiny_checkpoint))
    for index in (0, len(dataset) // 2, len(dataset) - 1):
        item = dataset[index]
        with torch.no_grad():
            sr = reference.net(item['lq'][None])[0].clamp(0, 1)
        to_u8 = lambda t: (t.permute(1, 2, 0).numpy()[..., ::-1] * 255).round().astype(np.uint8)  # noqa: E731
        psnr = calculate_psnr(to_u8(sr), to_u8(item['gt']), crop_border=4, test_y_channel=True)
        # calculate_psnr_pt (used in batches) adds 1e-8 to the MSE: up to ~0.02 dB at 56 dB, less below
        assert psnr == pytest.approx(labels[item['key']][1], abs=0.05)


def test_montage_has_one_row_per_class(prepared):
    out, summary = prepared
    montage = cv2.imread(str(out / summary['montage']))
    assert montage is not None and montage.shape[0] == 34 + 3 * 128 and montage.shape[1] == 150 + 8 * 128


def test_existing_output_is_refused_and_overwrite_replaces_it(prepared, hr_folder):
    out, summary = prepared
    reference = build_reference(4, 'cpu', bicubic=True)
    opts = PrepareOptions(input=str(hr_folder), output=str(out), num_classes=2, workers=0)
    with pytest.raises(FileExistsError, match='--overwrite'):
        prepare(opts, reference)
    assert json.loads((out / 'summary.json').read_text())['num_classes'] == 3  # untouched
    copy = out.with_name('copy')
    new = prepare(PrepareOptions(input=str(hr_folder), output=str(copy), num_classes=2, workers=0), reference)
    again = prepare(
        PrepareOptions(input=str(hr_folder), output=str(copy), num_classes=4, workers=0), reference, overwrite=True)
    assert new['num_classes'] == 2 and again['num_classes'] == 4
    assert json.loads((copy / 'summary.json').read_text())['reference']['kind'] == 'bicubic'
    assert not copy.with_name('copy.incomplete').exists() and not copy.with_name('copy.old').exists()


def test_no_reference_is_a_clear_error():
    with pytest.raises(ValueError, match='--reference bicubic'):
        build_reference(4, 'cpu')


def write_bad_inputs(folder: Path, photo: np.ndarray) -> None:
    crop = photo[:256, :256]
    cv2.imwrite(str(folder / 'good.png'), crop)
    (folder / 'notes.txt').write_text('not an image')
    (folder / 'corrupt.png').write_bytes(b'\x89PNG\r\n\x1a\n' + os.urandom(300))
    cv2.imwrite(str(folder / 'gray.png'), cv2.cvtColor(crop, cv2.COLOR_BGR2GRAY))
    cv2.imwrite(str(folder / 'rgba.png'), cv2.cvtColor(crop, cv2.COLOR_BGR2BGRA))
    cv2.imwrite(str(folder / 'deep16.png'), crop.astype(np.uint16) * 257)
    cv2.imwrite(str(folder / 'tiny.png'), crop[:100, :100])  # smaller than one 128x128 HR patch


def test_bad_inputs_are_converted_or_skipped_and_listed(tmp_path, photos):
    folder = tmp_path / 'mixed'
    folder.mkdir()
    write_bad_inputs(folder, photos[0])
    with pytest.warns(UserWarning, match='skipping'):
        summary = prepare(
            PrepareOptions(input=str(folder), output=str(tmp_path / 'out'), workers=0),
            build_reference(4, 'cpu', bicubic=True))
    skipped = {Path(path).name: reason for path, reason in summary['skipped'].items()}
    assert set(skipped) == {'notes.txt', 'corrupt.png', 'tiny.png'}
    assert 'not an image' in skipped['notes.txt'] and 'corrupt' in skipped['corrupt.png']
    assert 'smaller' in skipped['tiny.png']
    notes = {Path(path).name: info['notes'] for path, info in summary['images'].items()}
    assert set(notes) == {'good.png', 'gray.png', 'rgba.png', 'deep16.png'}
    assert notes['gray.png'] == ['grayscale converted to 3 channels'] and notes['rgba.png'] == ['RGBA: alpha dropped']
    assert notes['deep16.png'] == ['16-bit converted to 8-bit'] and notes['good.png'] == []
    per_image = {Path(path).name: info['sub_images'] for path, info in summary['images'].items()}
    assert len(set(per_image.values())) == 1  # every usable image gave its full set of sub-images


def test_empty_folder_is_a_clear_error(tmp_path):
    (tmp_path / 'empty').mkdir()
    with pytest.raises(ValueError, match='holds no image'):
        prepare(
            PrepareOptions(input=str(tmp_path / 'empty'), output=str(tmp_path / 'o')),
            build_reference(4, 'cpu', bicubic=True))
    assert not (tmp_path / 'o.incomplete').exists()


def test_overwrite_replaces_only_a_prepared_set_or_an_empty_folder(tmp_path, hr_folder):
    """``--overwrite`` once wiped any folder given as ``--output``; now a non-empty folder without the
    ``summary.json`` every completed output holds is refused and left as it was."""
    mine = tmp_path / 'my_photos_backup'
    mine.mkdir()
    (mine / 'holiday.jpg').write_bytes(b'precious')
    reference = build_reference(4, 'cpu', bicubic=True)
    opts = PrepareOptions(input=str(hr_folder), output=str(mine), num_classes=2, workers=0)
    with pytest.raises(ValueError, match='not an output of these tools'):
        prepare(opts, reference, overwrite=True)
    assert (mine / 'holiday.jpg').read_bytes() == b'precious' and not mine.with_name(mine.name + '.incomplete').exists()
    empty = tmp_path / 'empty'
    empty.mkdir()
    assert prepare(
        PrepareOptions(input=str(hr_folder), output=str(empty), num_classes=2, workers=0), reference,
        overwrite=True)['num_classes'] == 2


def test_a_second_run_on_the_same_output_fails_at_once_and_leaves_the_first_alone(tmp_path, hr_folder):
    """Two runs with one ``--output``: the second once deleted the first's staging folder as 'left by an
    interrupted run'. The first run's lock (here held directly) makes the second fail at once."""
    import fcntl

    from cdnsr_plugin.preparation.staging import OutputBusy
    out = tmp_path / 'set'
    staging = tmp_path / 'set.incomplete'
    staging.mkdir()
    (staging / '.cdnsr_plugin_staging').write_text(json.dumps({'tool': 'cdnsr_plugin staging'}))  # as runs make it
    (staging / 'lq.lmdb').write_bytes(b'the first run is writing this')
    with open(tmp_path / 'set.lock', 'a') as first_run:  # the lock as the first run holds it (utils.locks)
        first_run.write(json.dumps({'tool': 'cdnsr_plugin lock', 'pid': 4321, 'command': 'the first run'}))
        first_run.flush()
        fcntl.flock(first_run, fcntl.LOCK_EX | fcntl.LOCK_NB)
        opts = PrepareOptions(input=str(hr_folder), output=str(out), num_classes=2, workers=0)
        with pytest.raises(OutputBusy, match=r'another run is writing .*: process 4321 \(the first run\)'):
            prepare(opts, build_reference(4, 'cpu', bicubic=True))
        assert (staging / 'lq.lmdb').read_bytes() == b'the first run is writing this'
    # once the first run is gone (its lock dropped with it), a new run may take over its staging
    summary = prepare(
        PrepareOptions(input=str(hr_folder), output=str(out), num_classes=2, workers=0),
        build_reference(4, 'cpu', bicubic=True))
    assert summary['num_classes'] == 2 and not (tmp_path / 'set.lock').exists() and not staging.exists()
