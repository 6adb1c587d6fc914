"""The README's first command: ``cdnsr-demo`` end to end (``--quick``), on scikit-image's bundled photos."""
import json
import os
import subprocess
import sys

import cv2
import pytest
from basicsr.archs import build_network

from cdnsr_plugin.compat import load_yaml
from cdnsr_plugin.demo import MARKER
from cdnsr_plugin.demo import QUICK_ENV as CI_ENV
from cdnsr_plugin.demo import start
from cdnsr_plugin.inference.costs import cost_table

pytestmark = pytest.mark.slow


def test_quick_demo_runs_end_to_end_and_its_files_are_valid(tmp_path):
    work = tmp_path / 'demo'
    env = {**os.environ, 'CUDA_VISIBLE_DEVICES': '', CI_ENV: ''}
    result = subprocess.run(
        [sys.executable, '-m', 'cdnsr_plugin.demo', '--train', '--quick', '--work', 'demo'],  # relative
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = work / 'results'
    lr = cv2.imread(str(work / 'test' / 'LR_bicubic' / 'X4' / 'coffee.png'))
    sr = cv2.imread(str(results / 'X4' / 'coffee.png'))
    overlay = cv2.imread(str(results / 'X4' / 'coffee_classmap.png'))
    assert sr.shape == overlay.shape == (4 * lr.shape[0], 4 * lr.shape[1], 3)
    assert cv2.imread(str(results / 'psnr_flops.png')) is not None
    report = json.loads((results / 'report.json').read_text())
    names = [s['name'] for s in report['settings']]
    assert names[0] == 'argmax' and 'budget=0.50' in names and 'backbone full image' in names
    routed = {s['name']: s['sets'][0] for s in report['settings']}
    # the budget is solved on the cells' per-tile costs (classifier included): that lands at half ...
    table = cost_table(build_network(dict(load_yaml(str(work / 'train_CDNSR_FSRCNN_demo.yml'))['network_g'])))
    assert abs(table.routed_percent(routed['budget=0.50']['counts']) - 50) <= 2
    # ... and the report gives what ran (halos, promotions) against the backbone on the whole image
    executed = routed['budget=0.50']['flops']['paper']['percent_of_full_image']
    assert 50 <= executed <= 50 * 1.31 and report['network']['tiling'] == 'regions'
    assert routed['argmax']['psnr_y'] > 20  # a trained network, not noise
    assert not report['failures']
    for line in ('SR image', 'class map', 'PSNR-FLOPs plot'):
        assert line in result.stdout  # the demo tells the user where its files are


def test_the_default_demo_runs_the_shipped_model_against_its_backbone(tmp_path):
    """``cdnsr-demo``: the shipped model on the bundled photos, the routed result printed beside the backbone on
    the whole image, every file it names present and valid."""
    env = {**os.environ, 'CUDA_VISIBLE_DEVICES': '', CI_ENV: ''}
    result = subprocess.run([sys.executable, '-m', 'cdnsr_plugin.demo', '--work', 'demo'],
                            cwd=tmp_path,
                            capture_output=True,
                            text=True,
                            timeout=600,
                            env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / 'demo' / 'results' / 'report.json').read_text())
    rows = {s['kind']: s for s in report['settings']}
    assert set(rows) == {'routed', 'backbone-full', 'backbone-tiled', 'backbone-patch'} and not report['failures']
    # the tiled backbone is the same image as the whole one (exact context); the time is against the faster
    assert rows['backbone-tiled']['sets'][0]['psnr_y'] == pytest.approx(
        rows['backbone-full']['sets'][0]['psnr_y'], abs=1e-3)
    assert 'the faster backbone' in result.stdout
    routed = rows['routed']
    assert len(routed['images']) == 6
    for image in routed['images']:
        sr, lr = cv2.imread(image['sr_path']), cv2.imread(
            str(tmp_path / 'demo' / 'photos' / 'LR_bicubic' / 'X4' / f"{image['image']}.png"))
        assert sr.shape == (4 * lr.shape[0], 4 * lr.shape[1], 3) and cv2.imread(image['overlay_path']) is not None
    executed = routed['sets'][0]['flops']['paper']['percent_of_full_image']
    assert executed < 100
    assert f'{executed:.1f}%' in result.stdout and 'routed vs whole image' in result.stdout


def test_demo_replaces_only_its_own_folder(tmp_path):
    mine = tmp_path / 'old_demo'
    start(mine)
    (mine / 'stale.txt').write_text('from an earlier run')
    start(mine)
    assert (mine / MARKER).is_file() and not (mine / 'stale.txt').exists()
    other = tmp_path / 'user_data'
    other.mkdir()
    (other / 'keep.txt').write_text('important')
    with pytest.raises(FileExistsError, match='not made by the demo'):
        start(other)
    assert (other / 'keep.txt').read_text() == 'important'


def test_quick_without_train_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    from cdnsr_plugin.demo import main
    monkeypatch.delenv(CI_ENV, raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main(['--quick', '--work', str(tmp_path / 'demo')])
    assert exit_info.value.code == 2 and '--train' in capsys.readouterr().err
    assert not (tmp_path / 'demo').exists()
