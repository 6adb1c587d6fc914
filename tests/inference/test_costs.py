"""FLOPs tables reproduce the published per-patch costs (32x32 LR, x4) by computation."""
import pytest
import torch
from basicsr.archs import build_network

from cdnsr_plugin.compat import load_yaml
from cdnsr_plugin.inference.costs import cost_table, count_macs, count_paper_flops

from helpers import REPO

# ClassSR Table 2 / Sec. 4.2: paper-convention FLOPs of the three branches.
PUBLISHED = {
    'FSRCNN': (141e6, 304e6, 468e6),
    'CARN': (0.38e9, 0.77e9, 1.15e9),
    'SRResNet': (1.66e9, 3.44e9, 5.20e9),
    'RCAN': (10.33e9, 19.90e9, 32.60e9),
}


@pytest.fixture(scope='module', params=sorted(PUBLISHED))
def backbone_table(request):
    opt = load_yaml(str(REPO / 'options' / 'networks' / f'CDNSR_{request.param}_x4.yml'))
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
