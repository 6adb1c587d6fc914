"""The shipped reference models (``cdnsr_plugin/weights/``) and ``cdnsr-sr``: every file loads safely and
matches its manifest, the manifest's figure is reproduced on scikit-image's photo, a damaged file is named."""
import hashlib
import json
import os
import shutil
import signal
import time

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
        for key in ('sha256', 'network_sha256', 'network', 'checkpoint', 'routing', 'training', 'figures', 'check'):
            assert key in info, f'{name}.json lacks {key}'
        for key in ('command', 'data', 'iterations', 'date'):
            assert info['training'].get(key), f'{name}.json: training.{key} is empty'


@pytest.mark.parametrize('name', SHIPPED)
def test_weights_load_weights_only_and_match_the_manifest(name):
    path = weights.checkpoint(name)  # checks the sha256
    state = torch.load(path, map_location='cpu', weights_only=True)
    assert set(state) == {'params'} and all(torch.isfinite(t).all() for t in state['params'].values())
    assert weights.sha256(weights.network_file(name)) == weights.manifest(name)['network_sha256']


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


def copy_weights(tmp_path, monkeypatch):
    """A copy of the shipped folder that ``weights`` reads from (the package's own files stay untouched)."""
    folder = tmp_path / 'weights'
    shutil.copytree(weights.FOLDER, folder, ignore=shutil.ignore_patterns('__pycache__', '*.py'))
    monkeypatch.setattr(weights, 'FOLDER', folder)
    return folder


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_truncated_or_checksum_less_manifest_is_named_and_the_others_still_list(tmp_path, monkeypatch, capsys):
    """A truncated manifest once broke --list for every model with a JSON traceback, and a manifest without a
    checksum ran unchecked weights. Each is now named on stderr (exit 1) while the other models are listed;
    --model with either is refused naming the file (exit 2), before anything is written."""
    folder = copy_weights(tmp_path, monkeypatch)
    truncated, unchecked, good = 'cdnsr_carn_x4', 'cdnsr_carn_x4_long', weights.DEFAULT_MODEL
    text = (folder / f'{truncated}.json').read_text()
    (folder / f'{truncated}.json').write_text(text[:len(text) // 2])
    info = json.loads((folder / f'{unchecked}.json').read_text())
    del info['network_sha256']
    (folder / f'{unchecked}.json').write_text(json.dumps(info))
    assert cdnsr_sr(['--list']) == 1
    captured = capsys.readouterr()
    heads = [line.split(':')[0] for line in captured.out.splitlines() if not line.startswith(' ')]
    assert heads == [f'{good} (default)']
    errors = captured.err.strip().splitlines()
    assert len(errors) == 2 and all(line.startswith('error: ') for line in errors)
    assert f'{folder / truncated}.json is not valid JSON' in errors[0] and 'truncated or edited?' in errors[0]
    assert f'{folder / unchecked}.json is not a usable model manifest: no network_sha256' in errors[1]
    lr, _ = weights.write_check_pair(tmp_path / 'pair')
    for name, needle in ((truncated, 'is not valid JSON'), (unchecked, 'no network_sha256')):
        assert cdnsr_sr([str(lr), '--model', name, '--out', str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert f'{folder / name}.json' in err and needle in err and err.count('\n') == 1
        assert not (tmp_path / name).exists()


def test_model_accepts_only_the_listed_names_and_the_network_file_is_checksummed(tmp_path, monkeypatch, capsys):
    """--model ../../../x/evil once read a manifest, weights and network from anywhere; only the names --list
    shows are models now. The network .yml is covered by the manifest's network_sha256 like the weights."""
    folder = copy_weights(tmp_path, monkeypatch)
    evil = tmp_path / 'x'
    evil.mkdir()
    shutil.copy(folder / f'{weights.DEFAULT_MODEL}.json', evil / 'evil.json')
    lr, _ = weights.write_check_pair(tmp_path / 'pair')
    relative = os.path.relpath(evil / 'evil', folder)
    for name in (relative, str(evil / 'evil'), 'evil', f'{weights.DEFAULT_MODEL}.json'):
        assert cdnsr_sr([str(lr), '--model', name, '--out', str(tmp_path / 'o')]) == 2
        err = capsys.readouterr().err
        assert f'no shipped model named {name!r}' in err and 'cdnsr-sr --list' in err
        with pytest.raises(ValueError, match='no shipped model named'):
            weights.manifest(name)
    assert not (tmp_path / 'o').exists()
    network = folder / weights.manifest(weights.DEFAULT_MODEL)['network']
    network.write_text(network.read_text() + '# edited\n')
    assert cdnsr_sr([str(lr), '--out', str(tmp_path / 'o')]) == 2
    err = capsys.readouterr().err
    assert f'{network} does not match its manifest' in err and not (tmp_path / 'o').exists()
    info = json.loads((folder / f'{weights.DEFAULT_MODEL}.json').read_text())
    info['network'] = '../../x/evil.yml'  # a manifest's files are plain names in its folder
    (folder / f'{weights.DEFAULT_MODEL}.json').write_text(json.dumps(info))
    with pytest.raises(ValueError, match='network must name a file of this folder'):
        weights.network_file(weights.DEFAULT_MODEL)


def small_photo(folder):
    """A 40x48 LR crop of the check photo as ``folder/coffee.png`` (fast with the shipped model)."""
    lr, _ = weights.check_pair()
    folder.mkdir(parents=True)
    photo = folder / 'coffee.png'
    cv2.imwrite(str(photo), lr[40:80, 40:88])
    return photo


def test_the_readme_first_example_runs_inside_the_photos_folder(tmp_path, monkeypatch, capsys):
    """``cd photos && cdnsr-sr coffee.png`` was refused ("--out results/cdnsr_carn_x4/coffee is inside the
    input folder ."): a results subfolder cannot overwrite a single input image. It runs; the folder's files are
    unchanged; the results are where the README says."""
    photo = small_photo(tmp_path / 'photos')
    (photo.parent / 'other.png').write_bytes(photo.read_bytes())
    before = {p.name: sha(p) for p in photo.parent.iterdir()}
    monkeypatch.chdir(photo.parent)
    assert cdnsr_sr(['coffee.png']) == 0
    out = photo.parent / 'results' / weights.DEFAULT_MODEL / 'coffee'
    assert {p.name: sha(p) for p in photo.parent.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in (out / 'photos').iterdir()) == ['coffee.png', 'coffee_classmap.png']
    assert (out / 'report.json').is_file() and not (out / 'run_in_progress.json').exists()
    assert cv2.imread(str(out / 'photos' / 'coffee.png')).shape == (160, 192, 3)


def test_ctrl_c_in_cdnsr_sr_is_one_line_and_exit_130_and_overwrite_replaces_its_outputs(tmp_path, monkeypatch, capsys):
    """A real SIGINT to this process after the first image is written (as Ctrl-C delivers it): one line on
    stderr, exit 130, no report; --overwrite then replaces the interrupted run's outputs."""
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        pytest.skip('SIGINT is handled by the test runner here')
    from cdnsr_plugin.tester import run as tester_run
    photo = small_photo(tmp_path / 'photos')
    out = tmp_path / 'sr'
    save = tester_run.Runner.save_images

    def save_then_ctrl_c(self, *args, **kwargs):
        save(self, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(30)  # the KeyboardInterrupt arrives here

    monkeypatch.setattr(tester_run.Runner, 'save_images', save_then_ctrl_c)
    capsys.readouterr()
    assert cdnsr_sr([str(photo), '--out', str(out)]) == 130
    lines = [line for line in capsys.readouterr().err.splitlines() if 'interrupted' in line]
    assert lines == [
        f'interrupted: no report was written; the 2 output file(s) of this run so far are listed in '
        f'{out / "run_in_progress.json"}: rerun with --overwrite to replace them'
    ]
    assert not (out / 'report.json').exists() and (out / 'photos' / 'coffee.png').is_file()
    monkeypatch.setattr(tester_run.Runner, 'save_images', save)
    assert cdnsr_sr([str(photo), '--out', str(out)]) == 2  # not empty
    assert cdnsr_sr([str(photo), '--out', str(out), '--overwrite']) == 0
    files = sorted(p.name for p in out.rglob('*') if p.is_file())
    assert files == ['coffee.png', 'coffee_classmap.png', 'report.csv', 'report.json']
