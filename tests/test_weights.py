"""The shipped reference models (``cdnsr_plugin/weights/``) and ``cdnsr-sr``: every file loads safely and
matches its manifest, the manifest's figure is reproduced on scikit-image's photo, a damaged file is named."""
import json
import shutil

import cv2
import pytest
import torch

from cdnsr_plugin import weights
from cdnsr_plugin.run import main as cdnsr_sr
from cdnsr_plugin.tester.cli import main as run_tester

SHIPPED = weights.names()


def test_at_least_one_model_ships_with_a_complete_manifest():
    assert weights.DEFAULT_MODEL in SHIPPED
    for name in SHIPPED:
        info = weights.manifest(name)
        for key in ('sha256', 'network', 'checkpoint', 'routing', 'training', 'figures', 'check'):
            assert key in info, f'{name}.json lacks {key}'
        for key in ('command', 'data', 'iterations', 'date'):
            assert info['training'].get(key), f'{name}.json: training.{key} is empty'


@pytest.mark.parametrize('name', SHIPPED)
def test_weights_load_weights_only_and_match_the_manifest(name):
    path = weights.checkpoint(name)  # checks the sha256
    state = torch.load(path, map_location='cpu', weights_only=True)
    assert set(state) == {'params'} and all(torch.isfinite(t).all() for t in state['params'].values())


@pytest.mark.parametrize('name', SHIPPED)
def test_the_manifest_psnr_is_reproduced_on_the_check_photo(name, tmp_path):
    info = weights.manifest(name)
    lr, hr = weights.write_check_pair(tmp_path / 'pair')
    code = run_tester([
        '--input',
        str(lr), '--gt',
        str(hr), *weights.tester_args(name), '--compare-backbone', '--out',
        str(tmp_path / 'out'), '--no-save-images'
    ])
    assert code == 0
    report = json.loads((tmp_path / 'out' / 'report.json').read_text())
    psnr = {s['kind']: s['sets'][0]['psnr_y'] for s in report['settings']}
    assert abs(psnr['routed'] - info['check']['psnr_y_routed']) <= 0.01
    assert abs(psnr['backbone-full'] - info['check']['psnr_y_backbone_full']) <= 0.01


def test_the_list_names_every_shipped_model_and_marks_the_default_once(capsys):
    assert cdnsr_sr(['--list']) == 0
    heads = [line for line in capsys.readouterr().out.splitlines() if not line.startswith(' ')]
    assert sorted(line.split(':')[0].removesuffix(' (default)') for line in heads) == SHIPPED
    assert [line.split(':')[0] for line in heads
            if '(default)' in line.split(':')[0]] == [f'{weights.DEFAULT_MODEL} (default)']


def test_a_damaged_weight_file_is_named(tmp_path, monkeypatch, capsys):
    folder = tmp_path / 'weights'
    shutil.copytree(weights.FOLDER, folder, ignore=shutil.ignore_patterns('__pycache__', '*.py'))
    target = folder / weights.manifest(weights.DEFAULT_MODEL)['checkpoint']
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    monkeypatch.setattr(weights, 'FOLDER', folder)
    with pytest.raises(ValueError, match=f'{target.name} does not match its manifest'):
        weights.checkpoint(weights.DEFAULT_MODEL)
    assert cdnsr_sr(['--list']) == 0  # listing reads manifests only
    lr, _ = weights.write_check_pair(tmp_path / 'pair')
    capsys.readouterr()
    assert cdnsr_sr([str(lr), '--out', str(tmp_path / 'o')]) == 2
    assert 'does not match its manifest' in capsys.readouterr().err and not (tmp_path / 'o').exists()


def test_cdnsr_sr_super_resolves_one_photo_with_the_shipped_model(tmp_path, capsys):
    lr, _ = weights.write_check_pair(tmp_path / 'pair')
    photo = lr / f'{weights.CHECK_PHOTO}.png'
    before = photo.read_bytes()
    assert cdnsr_sr([str(photo), '--out', str(tmp_path / 'sr')]) == 0
    sr = cv2.imread(str(next((tmp_path / 'sr').rglob(f'{weights.CHECK_PHOTO}.png'))))
    small = cv2.imread(str(photo))
    assert sr.shape == (4 * small.shape[0], 4 * small.shape[1], 3)
    assert photo.read_bytes() == before and sorted(p.name for p in lr.iterdir()) == [photo.name]
    assert cdnsr_sr([str(photo), '--out', str(tmp_path / 'sr')]) == 2  # not empty: needs --overwrite
    assert cdnsr_sr([str(tmp_path / 'missing.png')]) == 2
    assert cdnsr_sr([str(photo), '--model', 'no_such_model']) == 2
    assert 'no shipped model named' in capsys.readouterr().err


def test_cdnsr_sr_routes_as_the_manifest_says_unless_told_otherwise(tmp_path):
    lr, _ = weights.write_check_pair(tmp_path / 'pair')
    routing = weights.manifest(weights.DEFAULT_MODEL)['routing']
    default = 'argmax'
    if routing.get('set_budget') is not None:
        default = f"set-budget={routing['set_budget']:g}"
    elif routing.get('budget') is not None:
        default = f"budget={routing['budget']:.2f}"
    spent = {}
    for i, (extra, expected) in enumerate([([], default), (['--argmax'], 'argmax'),
                                           (['--set-budget', '0.4'], 'set-budget=0.4'),
                                           (['--budget', '0.5'], 'budget=0.50')]):
        out = tmp_path / f'run{i}'
        assert cdnsr_sr([str(lr), '--out', str(out), '--no-save-images', *extra]) == 0
        routed = json.loads((out / 'report.json').read_text())['settings'][0]
        assert routed['name'] == expected
        spent[expected] = routed['sets'][0]['flops']['paper']['percent_of_full_image']
    assert spent['set-budget=0.4'] <= 40.0 < spent['argmax']
    with pytest.raises(SystemExit):
        cdnsr_sr([str(lr), '--argmax', '--budget', '0.5'])


def test_a_manifest_with_two_routings_is_refused(tmp_path, monkeypatch):
    folder = tmp_path / 'weights'
    shutil.copytree(weights.FOLDER, folder, ignore=shutil.ignore_patterns('__pycache__', '*.py'))
    path = folder / f'{weights.DEFAULT_MODEL}.json'
    info = json.loads(path.read_text())
    info['routing'].update(budget=0.5, set_budget=0.6)
    path.write_text(json.dumps(info))
    monkeypatch.setattr(weights, 'FOLDER', folder)
    with pytest.raises(ValueError, match='sets both routing.budget and routing.set_budget'):
        weights.tester_args(weights.DEFAULT_MODEL)
