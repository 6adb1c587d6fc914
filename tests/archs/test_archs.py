"""Every arch builds from inline YAML through basicsr's build_network, at scales 2, 3, 4."""
import pytest
import torch
import yaml
from basicsr.archs import build_network

SCALES = (2, 3, 4)


def build(text: str) -> torch.nn.Module:
    return build_network(yaml.safe_load(text))


@pytest.mark.parametrize('scale', SCALES)
@pytest.mark.parametrize('text', [
    'type: FSRCNN\nd: 16\nupscale: {s}',
    'type: CARN\nnum_feat: 36\nupscale: {s}',
    'type: MSRResNet\nnum_feat: 16\nnum_block: 2\nupscale: {s}',
])
def test_single_network_output_shape(text, scale):
    net = build(text.format(s=scale))
    out = net(torch.rand(2, 3, 13, 17))
    assert out.shape == (2, 3, 13 * scale, 17 * scale)


@pytest.mark.parametrize('num_conv,classes', [(3, 2), (5, 3), (6, 5)])
def test_classifier_outputs_logits(num_conv, classes):
    net = build(f'type: PatchClassifier\nnum_conv: {num_conv}\nnum_classes: {classes}')
    assert net(torch.rand(4, 3, 32, 32)).shape == (4, classes)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == num_conv


CONTAINER = """
type: CDNSRNet
classifier: {{type: PatchClassifier, num_classes: 3}}
branches:
  - {{type: FSRCNN, d: 16, upscale: {s}}}
  - {{type: CARN, num_feat: 16, upscale: {s}}}
  - {{type: EDSR, num_in_ch: 3, num_out_ch: 3, num_feat: 16, num_block: 1, upscale: {s}}}
"""


@pytest.mark.parametrize('scale', SCALES)
@pytest.mark.parametrize('mode', ['soft', 'gumbel', 'hard'])
def test_container_mixes_plugin_and_basicsr_branches(scale, mode):
    net = build(CONTAINER.format(s=scale))
    assert net.scale == scale and net.num_classes == 3
    sr, probs = net(torch.rand(5, 3, 32, 32), routing=mode)
    assert sr.shape == (5, 3, 32 * scale, 32 * scale)
    assert probs.shape == (5, 3)
    assert torch.allclose(probs.sum(1), torch.ones(5))


def test_fsrcnn_has_classsr_layout():
    net = build('type: FSRCNN\nd: 36\ns: 12\nm: 4\nupscale: 4')
    assert [type(m).__name__ for m in net.head_conv] == ['Conv2d', 'PReLU']
    assert net.head_conv[0].kernel_size == (5, 5) and net.head_conv[0].out_channels == 36
    mapping = [m for m in net.body_conv if isinstance(m, torch.nn.Conv2d)]
    assert len(mapping) == 4 and all(m.kernel_size == (3, 3) and m.in_channels == 12 for m in mapping)
    assert isinstance(net.tail_conv, torch.nn.ConvTranspose2d) and net.tail_conv.kernel_size == (9, 9)


def test_carn_shares_one_residual_block_per_cascade():
    net = build('type: CARN\nnum_feat: 36\nupscale: 4')
    calls = []
    handle = net.b1.b1.register_forward_hook(lambda *args: calls.append(1))
    net(torch.rand(1, 3, 8, 8))
    handle.remove()
    assert len(calls) == 3  # CARN-M: the efficient residual block is applied three times
    grouped = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d) and m.groups == 4]
    assert grouped, 'CARN-M uses grouped convolutions'
