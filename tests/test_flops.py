"""FLOPs tables reproduce the published per-patch costs (32x32 LR, x4) by computation."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from basicsr.archs import build_network

from cdnsr_plugin.compat import load_yaml
from cdnsr_plugin.routing.flops import cost_table, count_macs, count_paper_flops

REPO = Path(__file__).resolve().parents[1]
# ClassSR Table 2 / Sec. 4.2 (and the project brief, ../shared/DESIGN.md): paper-convention FLOPs of the three branches.
PUBLISHED = {
    'FSRCNN': (141e6, 304e6, 468e6),
    'CARN': (0.38e9, 0.77e9, 1.15e9),
    'SRResNet': (1.66e9, 3.44e9, 5.20e9),
    'RCAN': (10.33e9, 19.90e9, 32.60e9),
}


@pytest.fixture(scope='module', params=sorted(PUBLISHED))
def backbone_table(request):
    opt = load_yaml(str(REPO / 'options' / f'net_CDNSR_{request.param}_x4.yml'))
    return request.param, cost_table(build_network(opt['network_g']), patch=32)


def test_paper_flops_match_classsr_within_one_percent(backbone_table):
    name, table = backbone_table
    for branch, published in zip(table.branches, PUBLISHED[name]):
        assert branch.paper_flops == pytest.approx(published, rel=0.01), branch.name


def test_classifier_costs_match_both_papers(backbone_table):
    _, table = backbone_table
    assert 7.4e6 <= table.classifier.paper_flops <= 7.65e6  # ClassSR: "about 7.4-7.6M" (2 x 3.80M)
    assert table.classifier.macs == pytest.approx(3.869e6, rel=1e-3)  # CDNSR Table III, 5 conv layers


@pytest.mark.parametrize('num_conv,published', [(3, 1.739e6), (4, 2.804e6), (5, 3.869e6)])
def test_classifier_depths_match_cdnsr_table3(num_conv, published):
    net = build_network({'type': 'PatchClassifier', 'num_conv': num_conv})
    assert count_macs(net, (3, 32, 32)) == pytest.approx(published, rel=1e-3)


def test_fsrcnn_deconv_is_counted_on_input_grid_in_macs():
    """The paper convention counts the 9x9 deconvolution on the 128x128 output grid; MACs on 32x32."""
    net = build_network({'type': 'FSRCNN', 'd': 56, 'upscale': 4})
    deconv = 56 * 3 * 81
    assert count_paper_flops(net, (3, 32, 32)) - count_paper_flops(net.body_conv, (56, 32, 32)) \
        - count_paper_flops(net.head_conv, (3, 32, 32)) == 2 * deconv * 128 * 128
    assert 24e6 < count_macs(net, (3, 32, 32)) < 26e6  # ~25M MACs, not 234M


def test_routed_cost_weights_classes_and_includes_classifier(backbone_table):
    _, table = backbone_table
    per_class = table.per_class('paper')
    assert per_class[0] == table.classifier.paper_flops + table.branches[0].paper_flops
    mixed = table.routed([6, 3, 1])
    assert mixed == pytest.approx((6 * per_class[0] + 3 * per_class[1] + per_class[2]) / 10)
    assert table.routed([0, 0, 5], 'macs') == table.per_class('macs')[2]


def test_conv_subclasses_are_counted_not_zero():
    class MyConv(torch.nn.Conv2d):
        pass

    plain = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1))
    sub = torch.nn.Sequential(MyConv(3, 8, 3, padding=1))
    assert count_macs(sub, (3, 16, 16)) == count_macs(plain, (3, 16, 16)) > 0
    assert count_paper_flops(sub, (3, 16, 16)) == count_paper_flops(plain, (3, 16, 16)) == 2 * 3 * 8 * 9 * 256


def test_activations_are_not_double_counted():
    """ptflops counts nn.ReLU once by its module hook; functional counting would add F.relu again."""
    conv = torch.nn.Conv2d(3, 8, 1, bias=False)
    net = torch.nn.Sequential(conv, torch.nn.ReLU())
    assert count_macs(net, (3, 4, 4)) == 3 * 8 * 16 + 8 * 16


def test_counting_restores_training_mode():
    net = build_network({'type': 'FSRCNN', 'd': 16}).train()
    count_macs(net, (3, 8, 8))
    count_paper_flops(net, (3, 8, 8))
    assert all(module.training for module in net.modules())


def test_count_flops_json_cli():
    out = subprocess.run([sys.executable, str(REPO / 'tools' / 'count_flops.py'), '-opt',
                          str(REPO / 'options' / 'net_CDNSR_FSRCNN_x4.yml'), '--json'],
                         capture_output=True, text=True, check=True, cwd=REPO).stdout
    data = json.loads(out)
    assert [b['name'] for b in data['branches']] == ['FSRCNN(d=16)', 'FSRCNN(d=36)', 'FSRCNN(d=56)']
    assert data['branches'][2]['percent_of_largest'] == {'paper': 100.0, 'macs': 100.0}
    assert data['branches'][0]['paper_flops'] == pytest.approx(141e6, rel=0.01)
    assert 25 < data['branches'][0]['percent_of_largest']['paper'] < 35
    assert set(data['branches'][0]) >= {'name', 'macs', 'paper_flops', 'percent_of_largest'}


def test_count_flops_cli_names_missing_file(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / 'tools' / 'count_flops.py'), '-opt',
                             str(tmp_path / 'nope.yml')], capture_output=True, text=True)
    assert result.returncode != 0 and 'nope.yml' in result.stderr and 'does not exist' in result.stderr
