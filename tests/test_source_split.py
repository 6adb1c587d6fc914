"""tools/source_split.py: photos split by source into links, a held-out source whole in val."""
import importlib.util
import json
from pathlib import Path

import numpy as np

from cdnsr_plugin.utils.io import write_image

REPO = Path(__file__).resolve().parents[1]


def load_tool():
    spec = importlib.util.spec_from_file_location('source_split_tool', REPO / 'tools' / 'source_split.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_split_by_source_links_every_photo_once(tmp_path, photos):
    folder = tmp_path / 'photos'
    names = ['kodak_a.png', 'kodak_b.png', 'urban100_c.png', 'wikiphotos_d.png']
    for name, photo in zip(names, photos):
        write_image(folder / name, photo[:40, :40])
    tool = load_tool()
    assert tool.main(['--photos', str(folder), '--holdout', 'kodak', '--out', str(tmp_path / 'split')]) == 0
    val = sorted(p.name for p in (tmp_path / 'split' / 'val').iterdir())
    train = sorted(p.name for p in (tmp_path / 'split' / 'train').iterdir())
    assert val == names[:2] and train == names[2:]
    link = tmp_path / 'split' / 'val' / 'kodak_a.png'
    assert link.is_symlink() and np.array_equal(
        np.fromfile(link, np.uint8), np.fromfile(folder / 'kodak_a.png', np.uint8))
    assert json.loads(
        (tmp_path / 'split' / 'split.json').read_text())['sources'] == {'kodak': 2, 'urban100': 1, 'wikiphotos': 1}
    # refused, nothing written: an unknown source, every source held out, an existing folder
    assert tool.main(['--photos', str(folder), '--holdout', 'div2k', '--out', str(tmp_path / 'x')]) == 2
    assert tool.main(
        ['--photos',
         str(folder), '--holdout', 'kodak', 'urban100', 'wikiphotos', '--out',
         str(tmp_path / 'x')]) == 2
    assert not (tmp_path / 'x').exists()
    assert tool.main(['--photos', str(folder), '--holdout', 'urban100', '--out', str(tmp_path / 'split')]) == 2
    assert sorted(p.name for p in (tmp_path / 'split' / 'val').iterdir()) == val
