"""The plugin's dataset and BasicSR's own over a real prepared set (bicubic difficulty labels, real photos)."""
import json
from pathlib import Path

import pytest
from basicsr.data.paired_image_dataset import PairedImageDataset

from cdnsr_plugin.data.difficulty_dataset import DifficultyPairedDataset
from cdnsr_plugin.data.prepared_set import read_labels


@pytest.fixture(scope='module')
def prepared(training_data) -> tuple[Path, dict]:
    root = training_data[0]
    return root, json.loads((root / 'summary.json').read_text())


def test_basicsr_paired_dataset_loads_every_key(prepared):
    out, summary = prepared
    dataset = PairedImageDataset({
        'dataroot_gt': str(out / 'gt.lmdb'), 'dataroot_lq': str(out / 'lq.lmdb'), 'io_backend': {'type': 'lmdb'},
        'phase': 'val', 'scale': 4
    })
    assert len(dataset) == summary['num_pairs']
    for index in range(len(dataset)):
        item = dataset[index]
        assert item['lq'].shape == (3, 32, 32) and item['gt'].shape == (3, 128, 128)


def test_plugin_dataset_loads_labels_and_restricts_classes(prepared):
    out, summary = prepared
    opt = {
        'name': 'p', 'dataroot_gt': str(out / 'gt.lmdb'), 'dataroot_lq': str(out / 'lq.lmdb'),
        'io_backend': {'type': 'lmdb'}, 'phase': 'train', 'scale': 4, 'gt_size': 128, 'use_hflip': True, 'use_rot': True
    }
    labels = read_labels(out / 'labels.txt')
    everything = DifficultyPairedDataset(dict(opt, io_backend={'type': 'lmdb'}))
    assert len(everything) == summary['num_pairs']
    for index in range(0, len(everything), 7):
        item = everything[index]
        assert item['lq'].shape == (3, 32, 32) and item['gt'].shape == (3, 128, 128)
        assert item['label'] == labels[item['key']][0]
    hard = DifficultyPairedDataset(dict(opt, io_backend={'type': 'lmdb'}, classes=[2]))
    assert len(hard) == summary['classes'][2]['count'] and set(hard.labels) == {2}
    with pytest.raises(ValueError, match='classes'):
        DifficultyPairedDataset(dict(opt, io_backend={'type': 'lmdb'}, classes=[3]))
