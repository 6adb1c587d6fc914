"""tools/test_patches.py end to end on real photos: outputs, reports, the cost knob, bad input."""
from __future__ import annotations

import csv
import json
import math
import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from basicsr.archs import build_network

from cdnsr_plugin.inference.costs import cost_table
from cdnsr_plugin.inference.regions import receptive_radius
from cdnsr_plugin.inference.tiling import PatchGrid
from cdnsr_plugin.tester.cli import main

from helpers import TESTER_LR_SIZES, TESTER_NETWORK

RECORD_KEYS = {
    'dataset', 'image', 'lr_size', 'sr_size', 'patches', 'counts', 'eta', 'psnr', 'ssim', 'psnr_y', 'ssim_y', 'flops',
    'time_s', 'peak_memory_mb', 'sr_path', 'overlay_path'
}


def run_cli(args: list) -> int:
    return main([str(a) for a in args])


def direct(root: Path, out: Path, *extra) -> list:
    return [
        '--input', root / 'lr', '--gt', root / 'hr', '--checkpoint', root / 'net.pth', '--network', root / 'net.yml',
        '--scale', 4, '--out', out, *extra
    ]


@pytest.fixture(scope='module')
def compared(setup, tmp_path_factory):
    root, _ = setup
    out = tmp_path_factory.mktemp('compared')
    assert run_cli(direct(root, out, '--compare-backbone', '--max-batch', 5, '--tiling', 'paper')) == 0
    return out, json.loads((out / 'report.json').read_text())


def test_sr_images_are_exactly_scale_times_the_lr_with_class_maps(setup, compared):
    out, report = compared
    for name, (h, w) in TESTER_LR_SIZES.items():
        sr = cv2.imread(str(out / 'lr' / f'{name}.png'))
        overlay = cv2.imread(str(out / 'lr' / f'{name}_classmap.png'))
        assert sr.shape == overlay.shape == (4 * h, 4 * w, 3)
    records = {r['image']: r for r in report['settings'][0]['images']}
    expected = {name: (4 * h, 4 * w) for name, (h, w) in TESTER_LR_SIZES.items()}
    assert {name: tuple(record['sr_size']) for name, record in records.items()} == expected


def test_report_has_every_field_and_flops_follow_the_cost_table(setup, compared):
    root, net = setup
    out, report = compared
    table = cost_table(net, patch=32)
    assert [s['name']
            for s in report['settings']] == ['argmax', 'backbone full image', 'backbone tiled', 'backbone patch-wise']
    for setting in report['settings']:
        for record in setting['images']:
            assert set(record) >= RECORD_KEYS
            assert sum(record['counts']) == record['patches'] > 0
            assert record['time_s'] > 0 and record['peak_memory_mb'] > 0
    routed = report['settings'][0]
    for record in routed['images']:
        for convention in ('paper', 'macs'):
            flops = record['flops'][convention]
            assert flops['per_patch'] == pytest.approx(table.routed(record['counts'], convention))
            assert flops['percent_of_largest'] == pytest.approx(100 * table.routed(record['counts'], convention) /
                                                                table.largest(convention))
        if min(record['lr_size']) > 2:  # crop_border = 4 leaves pixels to score
            assert 0 < record['psnr_y'] < 100
        if min(record['lr_size']) >= 5:  # and SSIM's 11x11 window fits
            assert 0 < record['ssim'] <= 1
    patchwise = report['settings'][3]['images'][0]
    assert patchwise['flops']['paper']['percent_of_largest'] == pytest.approx(100.0)
    full = report['settings'][1]['images'][0]  # 97x250: 36 tiles hold 1.52x the pixels of the image
    assert full['flops']['macs']['total'] == pytest.approx(table.largest('macs') / 32**2 * 97 * 250, rel=0.01)
    set_row = routed['sets'][0]
    assert set_row['counts'] == np.sum([r['counts'] for r in routed['images']], axis=0).tolist()
    assert {c['baseline']
            for c in report['comparison']} == {'backbone full image', 'backbone tiled', 'backbone patch-wise'}
    # the tiled backbone: the whole image's output (exact context), costing at least as much, with its tile rule
    tiled = report['settings'][2]
    assert report['network']['backbone_tiled']['exact'] is True
    for t, f in zip(tiled['images'], report['settings'][1]['images']):
        if f['psnr'] is not None and math.isfinite(f['psnr']):
            assert t['psnr'] == pytest.approx(
                f['psnr'], abs=1e-3) and t['psnr_y'] == pytest.approx(
                    f['psnr_y'], abs=1e-3)
        assert t['flops']['macs']['total'] >= f['flops']['macs']['total'] * (1 - 1e-9)
    # the speed baseline is the faster of the two, per routed setting and dataset
    fastest = report['against_fastest_backbone']
    assert len(fastest) == 1 and fastest[0]['time_ratio'] == max(
        c['time_ratio'] for c in report['comparison'] if c['baseline'] in ('backbone full image', 'backbone tiled'))
    rows = list(csv.DictReader((out / 'report.csv').open()))
    assert len(rows) == 4 * (len(TESTER_LR_SIZES) + 1)


def test_routing_every_tile_to_the_backbone_equals_the_patchwise_backbone(setup, tmp_path):
    root, _ = setup
    args = direct(root, tmp_path, '--eta', -1e4, '--compare-backbone', '--no-save-images', '--tiling', 'paper')
    assert run_cli(args) == 0
    report = json.loads((tmp_path / 'report.json').read_text())
    routed, _, _, patchwise = report['settings']
    compared = 0
    for a, b in zip(routed['images'], patchwise['images']):
        assert a['counts'][:-1] == [0, 0] and a['counts'][-1] == a['patches']  # eta << 0: all to the backbone
        if a['psnr'] is not None:
            assert a['psnr'] == pytest.approx(b['psnr'], abs=1e-9) and a['ssim_y'] == b['ssim_y']
            compared += 1
    assert compared >= 3


def test_regions_by_default_cost_what_ran_beside_the_papers_tiling(setup, tmp_path):
    """Default tiling (regions): routed settings cost what ran; the patch-wise backbone is the papers' tiling;
    every cost also in % of the backbone on the whole image; with the exact halo and every cell sent to the
    backbone, the whole image's output."""
    root, net = setup
    assert run_cli(direct(root, tmp_path / 'a', '--compare-backbone', '--halo', 'exact')) == 0
    report = json.loads((tmp_path / 'a' / 'report.json').read_text())
    assert report['network']['tiling'] == 'regions'
    assert report['network']['halo'] == max(receptive_radius(b, size=128) for b in net.branches)
    routed, full, _, patchwise = report['settings']
    table = cost_table(net, patch=32)
    per_pixel = [b.macs / 32**2 for b in table.branches]  # FSRCNN: linear in the pixels it processes
    for r, f, p in zip(routed['images'], full['images'], patchwise['images']):
        h, w = r['lr_size']
        assert r['patches'] == math.ceil(h / 32) * math.ceil(w / 32)  # one cell per tile, no overlap
        assert p['patches'] == len(PatchGrid.for_image(h, w)) and p['pixel_ratio'] is None  # the papers' 32/28
        assert p['flops']['macs']['total'] == pytest.approx(p['patches'] * table.largest('macs'))
        assert f['flops']['macs']['percent_of_full_image'] == pytest.approx(100.0)
        assert r['pixel_ratio'] >= 1.0
        # what ran: at least every pixel once by the cheapest branch, at most all processed by the largest
        low = per_pixel[0] * h * w + table.classifier.macs * r['patches']
        high = per_pixel[-1] * r['pixel_ratio'] * h * w + table.classifier.macs * r['patches']
        assert low * 0.98 <= r['flops']['macs']['total'] <= high * 1.02
        assert r['flops']['macs']['percent_of_full_image'] == pytest.approx(100 * r['flops']['macs']['total'] /
                                                                            f['flops']['macs']['total'])
    comparison = next(c for c in report['comparison'] if c['baseline'] == 'backbone full image')
    assert comparison['flops_ratio']['macs'] == pytest.approx(routed['sets'][0]['flops']['macs']['total'] /
                                                              full['sets'][0]['flops']['macs']['total'])
    # the class map shows the executed regions
    overlay = cv2.imread(routed['images'][-1]['overlay_path'])
    assert overlay.shape[:2] == tuple(routed['images'][-1]['sr_size'])

    assert run_cli(direct(root, tmp_path / 'b', '--compare-backbone', '--halo', 'exact', '--eta', -1e4)) == 0
    routed, full, _, _ = json.loads((tmp_path / 'b' / 'report.json').read_text())['settings']
    for r, f in zip(routed['images'], full['images']):
        if f['psnr'] is not None and math.isfinite(f['psnr']):
            assert r['psnr'] == pytest.approx(f['psnr'], abs=0.01)


def test_images_too_small_to_score_get_no_metric_instead_of_nan(compared):
    _, report = compared
    records = {r['image']: r for r in report['settings'][0]['images']}
    tiny, pixel = records['e_4x4'], records['c_1x1']
    assert tiny['psnr_y'] is not None and tiny['ssim_y'] is None  # 16x16 SR: 8x8 left after the crop
    assert pixel['psnr'] is None and pixel['ssim'] is None
    set_row = report['settings'][0]['sets'][0]
    assert np.isfinite(set_row['ssim_y']) and set_row['scored_images'] == len(TESTER_LR_SIZES) - 1


def test_budget_lands_within_two_points_and_eta_lowers_flops(setup, tmp_path):
    root, _ = setup
    assert run_cli(direct(root, tmp_path / 'b', '--budget', 0.5, '--no-save-images')) == 0
    report = json.loads((tmp_path / 'b' / 'report.json').read_text())
    big = [r for r in report['settings'][0]['images'] if r['patches'] >= 50]
    assert big
    for record in big:
        assert abs(record['flops']['paper']['percent_of_largest'] - 50.0) <= 2.0
    shares = []
    for eta in (0.0, 1.0, 4.0, 16.0):
        out = tmp_path / f'eta{eta}'
        assert run_cli(direct(root, out, '--eta', eta, '--no-save-images')) == 0
        shares.append(
            json.loads((out / 'report.json').read_text())['settings'][0]['sets'][0]['flops']['paper']['per_patch'])
    assert all(a >= b for a, b in zip(shares, shares[1:])) and shares[0] > shares[-1]


def test_set_budget_routes_every_image_by_one_eta_within_the_budget_of_the_whole_set(setup, tmp_path):
    """--set-budget: executed FLOPs over the set at most the budget x the backbone on the whole images, one
    eta for all images, and each image routed exactly as --eta with that eta routes it."""
    root, _ = setup
    assert run_cli(direct(root, tmp_path / 's', '--set-budget', 0.6, '--compare-backbone', '--no-save-images')) == 0
    report = json.loads((tmp_path / 's' / 'report.json').read_text())
    routed, full = report['settings'][:2]
    assert routed['name'] == 'set-budget=0.6'
    etas = {record['eta'] for record in routed['images']}
    assert len(etas) == 1
    spent = sum(r['flops']['paper']['total'] for r in routed['images'])
    whole = sum(f['flops']['paper']['total'] for f in full['images'])
    assert 0.55 * whole < spent <= 0.6 * whole * (1 + 1e-9)  # the budget is used, and kept
    solved = [note for entry in report['notes'] for note in entry['notes'] if 'set-budget=0.6: eta' in note]
    assert len(solved) == 1  # what the solver counted is what the report records
    assert float(re.search(r'images: ([0-9.]+)%', solved[0]).group(1)) == pytest.approx(100 * spent / whole, abs=0.006)
    eta = etas.pop()
    assert run_cli(direct(root, tmp_path / 'e', '--eta', repr(eta), '--no-save-images')) == 0
    same = json.loads((tmp_path / 'e' / 'report.json').read_text())['settings'][0]['images']
    assert [r['counts'] for r in same] == [r['counts'] for r in routed['images']]
    assert [r['psnr_y'] for r in same] == [r['psnr_y'] for r in routed['images']]


def test_sweep_draws_the_psnr_flops_curve(setup, tmp_path):
    root, _ = setup
    assert run_cli(direct(root, tmp_path, '--sweep', '0.4,0.7', '--no-save-images')) == 0
    report = json.loads((tmp_path / 'report.json').read_text())
    assert [s['name'] for s in report['settings']] == ['argmax', 'budget=0.40', 'budget=0.70']
    plot = cv2.imread(str(tmp_path / 'psnr_flops.png'))
    assert plot is not None and plot.shape[0] > 200
    percents = [s['sets'][0]['flops']['paper']['percent_of_largest'] for s in report['settings'][1:]]
    assert percents[0] < percents[1]


def test_lr_only_gives_images_without_metrics(setup, tmp_path):
    root, _ = setup
    args = ['--input', root / 'lr', '--checkpoint', root / 'net.pth', '--network', root / 'net.yml', '--out', tmp_path]
    assert run_cli(args) == 0
    record = json.loads((tmp_path / 'report.json').read_text())['settings'][0]['images'][0]
    assert record['psnr'] is None and record['ssim_y'] is None and (tmp_path / 'lr' / 'a_97x250.png').is_file()


def write_16bit(path: Path, img: np.ndarray) -> None:
    cv2.imwrite(str(path), img.astype(np.uint16) * 257)


@pytest.mark.parametrize('extra', [[], ['--set-budget', '0.6', '--compare-backbone']])
def test_bad_inputs_are_listed_and_the_rest_is_processed(setup, tmp_path, capsys, extra):
    """Also with a set budget: the bad files are left out of it and listed once."""
    root, _ = setup
    lr, hr = tmp_path / 'lr', tmp_path / 'hr'
    shutil.copytree(root / 'lr', lr)
    shutil.copytree(root / 'hr', hr)
    good = cv2.imread(str(lr / 'd_200x260.png'))
    (lr / 'broken.png').write_bytes(b'\x89PNG\r\n\x1a\n not really')
    (lr / 'notes.txt').write_text('not an image')
    cv2.imwrite(str(lr / 'gray.png'), cv2.cvtColor(good, cv2.COLOR_BGR2GRAY))
    cv2.imwrite(str(lr / 'rgba.png'), cv2.cvtColor(good, cv2.COLOR_BGR2BGRA))
    write_16bit(lr / 'deep.png', good)
    for name in ('gray', 'rgba', 'deep'):
        shutil.copy(hr / 'd_200x260.png', hr / f'{name}.png')
    cv2.imwrite(str(hr / 'b_33x31.png'), cv2.imread(str(hr / 'b_33x31.png'))[:-4])  # GT no longer 4 x LR
    code = run_cli([
        '--input', lr, '--gt', hr, '--checkpoint', root / 'net.pth', '--network', root / 'net.yml', '--out',
        tmp_path / 'out', *extra
    ])
    assert code == 1
    report = json.loads((tmp_path / 'out' / 'report.json').read_text())
    failed = {Path(f['file']).name: f['error'] for f in report['failures']}
    assert set(failed) == {'broken.png', 'notes.txt', 'b_33x31.png'} and len(report['failures']) == 3
    assert 'corrupt' in failed['broken.png'] and 'scale' in failed['b_33x31.png'] and '124x132' in failed['b_33x31.png']
    done = {r['image'] for r in report['settings'][0]['images']}
    assert done == {'a_97x250', 'c_1x1', 'd_200x260', 'e_4x4', 'gray', 'rgba', 'deep'}
    noted = {Path(n['file']).stem for n in report['notes']}
    assert {'gray', 'rgba', 'deep'} <= noted
    printed = capsys.readouterr().out
    assert '3 files failed' in printed and 'broken.png' in printed
    if extra:  # the set budget is solved over the seven images that ran, and met over them
        assert any('over 7 images' in note for entry in report['notes'] for note in entry['notes'])
        routed, full = report['settings'][:2]
        spent = sum(r['flops']['paper']['total'] for r in routed['images'])
        assert spent <= 0.6 * sum(f['flops']['paper']['total'] for f in full['images']) * (1 + 1e-9)


@pytest.mark.parametrize('change,needle', [
    (lambda state: state.pop('branches.2.tail_conv.weight'), 'branches.2.tail_conv.weight'),
    (lambda state: [state.pop(k) for k in list(state) if k.startswith('branches.2.')], 'missing keys'),
])
def test_checkpoint_that_does_not_fit_is_named(setup, tmp_path, capsys, change, needle):
    root, net = setup
    state = dict(net.state_dict())
    change(state)
    torch.save({'params': state}, tmp_path / 'bad.pth')
    code = run_cli([
        '--input', root / 'lr', '--checkpoint', tmp_path / 'bad.pth', '--network', root / 'net.yml', '--out',
        tmp_path / 'out'
    ])
    err = capsys.readouterr().err
    assert code == 2 and 'bad.pth' in err and needle in err
    assert not (tmp_path / 'out' / 'report.json').exists()


@pytest.mark.parametrize('extra,needle', [
    (['--gt', '/nonexistent/hr'], '--gt'),
    (['--sweep', '0.5,0.501'], 'budgets must differ'),
    (['--eta', 'nan'], 'finite'),
    (['--router-file', 'x.json'], '--router laplacian'),
    (['--set-budget', '0'], 'set_budget must be a fraction'),
    (['--router', 'laplacian', '--router-file', 'x.json', '--set-budget', '0.5'], 'the Laplacian router has none'),
])
def test_bad_options_stop_before_any_image(setup, tmp_path, capsys, extra, needle):
    root, _ = setup
    code = run_cli([
        '--input', root / 'lr', '--checkpoint', root / 'net.pth', '--network', root / 'net.yml', '--out', tmp_path,
        *extra
    ])
    assert code == 2 and needle in capsys.readouterr().err
    assert not (tmp_path / 'report.json').exists()


def test_wrong_number_of_branches_is_named(setup, tmp_path, capsys):
    root, _ = setup
    two = dict(
        TESTER_NETWORK,
        classifier={'type': 'PatchClassifier', 'num_classes': 2},
        branches=TESTER_NETWORK['branches'][:2])
    (tmp_path / 'two.yml').write_text(yaml.safe_dump({'network_g': two}))
    code = run_cli(['--input', root / 'lr', '--checkpoint', root / 'net.pth', '--network', tmp_path / 'two.yml'])
    err = capsys.readouterr().err
    assert code == 2 and 'net.pth' in err and 'classifier.lastOut' in err


def test_laplacian_router_fitted_on_a_prepared_set(setup, tmp_path, photos):
    from helpers import make_train_set
    root, _ = setup
    prepared = make_train_set(tmp_path, photos)
    out = tmp_path / 'lap'
    branches = []
    net = build_network(dict(TESTER_NETWORK))
    for i, branch in enumerate(net.branches):
        torch.save({'params': branch.state_dict()}, tmp_path / f'branch{i}.pth')
        branches.append(str(tmp_path / f'branch{i}.pth'))
    code = run_cli([
        '--input', root / 'lr', '--gt', root / 'hr', '--network', root / 'net.yml', '--branches', ','.join(branches),
        '--router', 'laplacian', '--fit-router', prepared, '--out', out, '--tiling', 'paper'
    ])
    assert code == 0
    report = json.loads((out / 'report.json').read_text())
    assert report['network']['router'] == 'laplacian' and len(report['network']['router_thresholds']) == 2
    assert (out / 'laplacian_router.json').is_file()
    big = next(r for r in report['settings'][0]['images'] if r['image'] == 'd_200x260')
    assert sum(1 for n in big['counts'] if n > 0) >= 2  # a real photo has flat and detailed tiles
    # the router costs ~8 MACs per pixel instead of the classifier's 3.9M per patch
    table = cost_table(net, patch=32)
    expected = np.dot(big['counts'], [b.macs for b in table.branches]) / big['patches'] + 8 * 32 * 32
    assert big['flops']['macs']['per_patch'] == pytest.approx(expected)
