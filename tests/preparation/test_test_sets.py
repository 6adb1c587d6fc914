"""tools/make_test_sets.py: Test2K/4K/8K tiers (ClassSR sec. 4.1.2) on small crops of real photos."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

import cdnsr_plugin  # noqa: F401  (torchvision alias before basicsr)
from cdnsr_plugin.preparation.test_sets import Tier, assign_tiers, parse_tiers, split_sizes

from helpers import REPO, TIER_CROPS, TIERS, WIDTHS, matlab_bicubic, read_png

TOOL = REPO / 'tools' / 'make_test_sets.py'
spec = importlib.util.spec_from_file_location('make_test_sets', TOOL)
tool = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tool)


def build(input_dir: Path, output: Path, *extra: str) -> int:
    return tool.main(['--input', str(input_dir), '--output', str(output), '--tiers', TIERS, '--workers', '0', *extra])


@pytest.fixture(scope='module')
def built(hr_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp('built') / 'sets'
    assert build(hr_dir, out) == 0
    return out


def test_tier_option_parsing_and_errors(capsys, tmp_path):
    assert parse_tiers('2K=2048, 4K=4096,8K=0') == [Tier('2K', 2048), Tier('4K', 4096), Tier('8K', 0)]
    for bad in ('2K=2048,4K', '2K=-5', '2K=abc', '=100', '2K=1,2K=2'):
        with pytest.raises(SystemExit) as exc:
            tool.main(['--input', str(tmp_path), '--output', str(tmp_path / 'o'), '--tiers', bad])
        assert exc.value.code != 0
        err = capsys.readouterr().err
        assert '--tiers' in err and repr(bad.split(',')[-1]) in err
    with pytest.raises(SystemExit):
        tool.main(['--input', str(tmp_path), '--output', str(tmp_path / 'o'), '--tiers', '2K=2,8K=0'])
    assert '--tiers' in (err := capsys.readouterr().err) and '2K=2' in err
    with pytest.raises(SystemExit) as exc:
        tool.main(['--help'])
    assert exc.value.code == 0
    help_text = capsys.readouterr().out
    for option in ('--input', '--output', '--scale', '--tiers', '--split', '--workers', '--overwrite'):
        assert option in help_text


def test_sequential_split_is_consecutive_and_balanced():
    for count in range(12):
        sizes = split_sizes(count, 3)
        assert sum(sizes) == count and max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    paths = [Path(f'{i}.png') for i in range(7)]
    tiers = parse_tiers(TIERS)
    order = [assigned[0].name for _, assigned in assign_tiers(paths, tiers, 'sequential')]
    assert order == ['2K'] * 3 + ['4K'] * 2 + ['8K'] * 2


def test_tiers_follow_the_protocol(built, hr_dir):
    summary = json.loads((built / 'summary.json').read_text())
    assert not built.with_name('sets.incomplete').exists()
    assert summary['skipped'] == {} and summary['counts']['written'] == len(TIER_CROPS)
    names = [[e['name'] for e in summary['tiers'][t]['images']] for t in WIDTHS]
    assert names == [[f'img{i:02d}.png' for i in group] for group in ([0, 1, 2], [3, 4], [5, 6])]
    for tier, width in WIDTHS.items():
        folder = built / f'Test{tier}'
        assert sorted(p.name for p in (folder / 'HR').iterdir()) == sorted(
            p.name for p in (folder / 'LR_bicubic' / 'X4').iterdir())
        for entry in summary['tiers'][tier]['images']:
            src = read_png(hr_dir / entry['source'])
            hr, lr = read_png(folder / 'HR' / entry['name']), read_png(folder / 'LR_bicubic' / 'X4' / entry['name'])
            src_w = src.shape[1]
            expected_w = (width if 0 < width < src_w else src_w) // 4 * 4
            assert hr.shape[1] == expected_w and hr.shape[0] % 4 == 0 and hr.shape[1] % 4 == 0
            assert lr.shape[:2] == (hr.shape[0] // 4, hr.shape[1] // 4)
            assert entry['hr_size'] == [hr.shape[1], hr.shape[0]] and entry['lr_size'] == [lr.shape[1], lr.shape[0]]
            np.testing.assert_array_equal(lr, matlab_bicubic(hr, 1 / 4))
            if 0 < width < src_w:  # HR is the MATLAB bicubic of the source, height round(h * width / w)
                assert hr.shape[0] == round(src.shape[0] * width / src_w) // 4 * 4
                np.testing.assert_array_equal(hr, matlab_bicubic(src, width / src_w)[:hr.shape[0], :hr.shape[1]])
            else:  # kept at its size, only mod-cropped
                np.testing.assert_array_equal(hr, src[:hr.shape[0], :hr.shape[1]])
    narrow = summary['tiers']['4K']['images'][1]
    assert narrow['hr_size'] == [200, 148] and 'narrower' in narrow['notes'][0]


def test_output_loads_with_basicsr_paired_dataset(built):
    from basicsr.data.paired_image_dataset import PairedImageDataset
    dataset = PairedImageDataset({
        'dataroot_gt': str(built / 'Test2K' / 'HR'), 'dataroot_lq': str(built / 'Test2K' / 'LR_bicubic' / 'X4'),
        'io_backend': {'type': 'disk'}, 'filename_tmpl': '{}', 'phase': 'val', 'scale': 4
    })
    assert len(dataset) == 3
    item = dataset[0]
    assert item['gt'].shape[1:] == (item['lq'].shape[1] * 4, item['lq'].shape[2] * 4)


def test_bad_files_are_skipped_or_converted_and_listed(hr_dir, tmp_path, capsys):
    src = tmp_path / 'mixed'
    src.mkdir()
    photo = read_png(hr_dir / 'img00.png')[:120, :160]
    cv2.imwrite(str(src / 'a_good.png'), photo)
    cv2.imwrite(str(src / 'a_good.jpg'), photo)  # same stem as a_good.png: the first (sorted) wins
    (src / 'b_notes.txt').write_text('not an image')
    (src / 'c_corrupt.png').write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
    cv2.imwrite(str(src / 'd_gray.png'), cv2.cvtColor(photo, cv2.COLOR_BGR2GRAY))
    cv2.imwrite(str(src / 'e_rgba.png'), cv2.cvtColor(photo, cv2.COLOR_BGR2BGRA))
    cv2.imwrite(str(src / 'f_16bit.png'), photo.astype(np.uint16) * 257)
    cv2.imwrite(str(src / 'g_tiny.png'), photo[:2, :2])
    out = tmp_path / 'out'
    with pytest.warns(UserWarning, match='skipping'):
        assert build(src, out, '--split', 'all') == 0
    summary = json.loads((out / 'summary.json').read_text())
    skipped = ['a_good.png', 'b_notes.txt', 'c_corrupt.png', 'g_tiny.png']
    assert sorted(Path(p).name for p in summary['skipped']) == skipped
    printed = capsys.readouterr().out
    assert all(name in printed for name in skipped)
    images = {e['name']: e for e in summary['tiers']['2K']['images']}
    assert sorted(images) == ['a_good.png', 'd_gray.png', 'e_rgba.png', 'f_16bit.png']
    assert images['a_good.png']['notes'] == []
    for name, word in (('d_gray.png', 'grayscale'), ('e_rgba.png', 'alpha'), ('f_16bit.png', '16-bit')):
        assert any(word in note for note in images[name]['notes'])
        read_png(out / 'Test8K' / 'HR' / name)  # written as 8-bit 3-channel
    np.testing.assert_array_equal(read_png(out / 'Test8K' / 'HR' / 'f_16bit.png'), photo)


def test_empty_or_missing_folder_fails_naming_it(tmp_path, capsys):
    empty = tmp_path / 'empty_photos'
    empty.mkdir()
    for folder in (empty, tmp_path / 'missing_photos'):
        assert build(folder, tmp_path / 'out') != 0
        assert str(folder) in capsys.readouterr().err
    assert not (tmp_path / 'out').exists() and not (tmp_path / 'out.incomplete').exists()


def test_existing_output_refused_then_replaced_with_overwrite(hr_dir, tmp_path, capsys):
    assert build(hr_dir, hr_dir, '--overwrite') != 0  # never deletes the photos
    assert 'input folder' in capsys.readouterr().err and len(list(hr_dir.iterdir())) == len(TIER_CROPS)
    out = tmp_path / 'sets'
    out.mkdir()
    (out / 'old.txt').write_text('keep me')
    assert build(hr_dir, out) != 0
    assert '--overwrite' in capsys.readouterr().err and (out / 'old.txt').exists()
    # --overwrite replaces only an output of these tools (with its summary.json) or an empty folder
    assert build(hr_dir, out, '--overwrite') != 0
    assert 'not an output of these tools' in capsys.readouterr().err and (out / 'old.txt').read_text() == 'keep me'
    (out / 'old.txt').unlink()
    from cdnsr_plugin.preparation.staging import abandon_output, start_output
    stale = start_output(out, True)  # a run that stopped half-way leaves its staging folder (with its marker)
    (stale / 'half.png').write_bytes(b'')
    abandon_output(stale, out)
    assert build(hr_dir, out, '--overwrite') == 0
    assert 'interrupted' in capsys.readouterr().out
    assert (out / 'summary.json').is_file() and not stale.exists()
    assert build(hr_dir, out, '--overwrite') == 0  # a finished set is replaced
    assert (out / 'summary.json').is_file() and not out.with_name('sets.old').exists()
