"""Channel pruning (CDNSR Sec. III-A, Li et al. 2017): a narrower network made of a wider one's largest-L1 channels."""
import pytest
import torch
from basicsr.archs import build_network

from cdnsr_plugin.archs.pruning import kept_channels, prune

ARCHES = {
    'FSRCNN': ({'type': 'FSRCNN', 'd': 56, 'upscale': 4}, (36, 16)),
    'MSRResNet': ({'type': 'MSRResNet', 'num_feat': 32, 'num_block': 3, 'upscale': 4}, (24, 12)),
    'MSRResNet x3': ({'type': 'MSRResNet', 'num_feat': 32, 'num_block': 2, 'upscale': 3}, (20, )),
    'EDSR': ({'type': 'EDSR', 'num_in_ch': 3, 'num_out_ch': 3, 'num_feat': 32, 'num_block': 2, 'upscale': 4}, (16, )),
    'CARN': ({'type': 'CARN', 'num_feat': 64, 'groups': 4, 'upscale': 4}, (52, 36)),
}


def trained_like(opt: dict, seed: int = 0) -> torch.nn.Module:
    """The network with random weights of unequal sizes, so that channel importance differs."""
    torch.manual_seed(seed)
    net = build_network(dict(opt)).eval()
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.mul_(torch.rand_like(parameter) * 2).add_(torch.randn_like(parameter) * 0.01)
    return net


@pytest.mark.parametrize('arch', sorted(ARCHES))
def test_pruning_to_the_same_width_reproduces_the_network(arch):
    opt, _ = ARCHES[arch]
    net = trained_like(opt)
    width = opt.get('d', opt.get('num_feat'))
    new_opt, same = prune(opt, net, width)
    assert new_opt == opt
    for key, value in net.state_dict().items():
        assert torch.equal(same.state_dict()[key], value), key
    x = torch.rand(2, 3, 12, 12)
    with torch.no_grad():
        assert torch.equal(same.eval()(x), net(x))


@pytest.mark.parametrize('arch', sorted(ARCHES))
def test_pruned_networks_have_the_narrow_shapes_and_run(arch):
    opt, widths = ARCHES[arch]
    net = trained_like(opt)
    key = 'd' if 'd' in opt else 'num_feat'
    for width in widths:
        new_opt, small = prune(opt, net, width)
        reference = build_network(dict(opt, **{key: width}))
        assert new_opt[key] == width
        assert {k: v.shape for k, v in small.state_dict().items()} == \
            {k: v.shape for k, v in reference.state_dict().items()}
        scale = 3 if opt['upscale'] == 3 else 4
        with torch.no_grad():
            assert small.eval()(torch.rand(1, 3, 8, 8)).shape == (1, 3, 8 * scale, 8 * scale)
    assert all(p.requires_grad for p in small.parameters())


def test_fsrcnn_keeps_the_largest_l1_filters_and_their_inputs():
    opt = ARCHES['FSRCNN'][0]
    net = trained_like(opt, seed=1)
    _, small = prune(opt, net, 16)
    head = net.head_conv[0].weight.abs().flatten(1).sum(1)
    top = torch.topk(head, 16).indices.sort().values
    assert torch.equal(kept_channels(opt, net, 16)['head'], top)
    assert torch.equal(small.head_conv[0].weight, net.head_conv[0].weight[top])
    assert torch.equal(small.body_conv[0][0].weight, net.body_conv[0][0].weight[:, top])  # the shrink's inputs
    expand = net.body_conv[6][0].weight.abs().flatten(1).sum(1)
    kept = torch.topk(expand, 16).indices.sort().values
    assert torch.equal(small.tail_conv.weight, net.tail_conv.weight[kept])  # the deconvolution's inputs
    assert torch.equal(small.body_conv[1].weight, net.body_conv[1].weight)  # the mapping layers are not pruned


def test_resnet_trunk_is_scored_over_every_layer_that_writes_it():
    opt = ARCHES['MSRResNet'][0]
    net = trained_like(opt, seed=2)
    writers = [net.conv_first.weight] + [block.conv2.weight for block in net.body]
    score = sum(weight.abs().flatten(1).sum(1) for weight in writers)
    assert torch.equal(kept_channels(opt, net, 12)['trunk'], torch.topk(score, 12).indices.sort().values)


def test_carn_keeps_the_same_number_of_channels_in_every_group():
    opt = ARCHES['CARN'][0]
    kept = kept_channels(opt, trained_like(opt, seed=3), 36)
    for channels in kept.values():
        assert torch.bincount(channels // 16, minlength=4).tolist() == [9, 9, 9, 9]


def test_bad_requests_are_named():
    with pytest.raises(ValueError, match='RCAN'):
        prune({'type': 'RCAN', 'num_feat': 64}, torch.nn.Linear(1, 1), 32)
    opt = ARCHES['CARN'][0]
    with pytest.raises(ValueError, match='multiple of groups'):
        prune(opt, trained_like(opt), 30)
    with pytest.raises(ValueError, match='1..56'):
        prune(ARCHES['FSRCNN'][0], trained_like(ARCHES['FSRCNN'][0]), 64)
