"""Official ClassSR / CDNSR checkpoint import (``deploy.convert``, ``tools/convert_checkpoint.py``).

The checkpoints here are synthetic: random values under the exact key names and shapes of the official
containers (``classSR_3class_*`` / ``CDNSR``: ``classifier.CondNet.*``, ``classifier.lastOut.*``, ``net1..3.*``),
written out below from the official architecture code. The reference forward passes are functional
re-implementations of the official modules (``torch.nn.functional`` on the state-dict tensors, written here,
independent of the plugin's archs); the converted ``CDNSRNet`` must reproduce their classifier logits and
probabilities, every branch's output, and the soft and hard routed outputs, to 1e-5.
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import yaml
from basicsr.archs import build_network

from cdnsr_plugin.deploy.convert import convert_checkpoint, convert_state_dict
from cdnsr_plugin.utils.checkpoint import load_weights

from helpers import REPO

spec = importlib.util.spec_from_file_location('convert_checkpoint', REPO / 'tools' / 'convert_checkpoint.py')
tool = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tool)

DIV2K = torch.tensor([0.4488, 0.4371, 0.4040])
TOL = {'atol': 1e-5, 'rtol': 0.0}

# ----------------------------------------------------------------------------- official layouts


def conv(keys: dict, name: str, out_ch: int, in_ch: int, kernel: int, bias: bool = True) -> None:
    keys[f'{name}.weight'] = (out_ch, in_ch, kernel, kernel)
    if bias:
        keys[f'{name}.bias'] = (out_ch, )


def classifier_keys() -> dict:
    """``Classifier`` of every container: five convs (4x4 stride 4 to 128, 1x1 ...) and ``lastOut``."""
    keys = {}
    conv(keys, 'CondNet.0', 128, 3, 4)
    for i in (2, 4, 6):
        conv(keys, f'CondNet.{i}', 128, 128, 1)
    conv(keys, 'CondNet.8', 32, 128, 1)
    keys.update({'lastOut.weight': (3, 32), 'lastOut.bias': (3, )})
    return keys


def fsrcnn_keys(d: int, s: int = 12, m: int = 4) -> dict:
    """``FSRCNN_net(3, 4, d, s, m)``: ``head_conv``, ``body_conv`` (shrink, m convs, PReLU, expand), ``tail_conv``."""
    keys = {}
    conv(keys, 'head_conv.0', d, 3, 5)
    keys['head_conv.1.weight'] = (1, )
    conv(keys, 'body_conv.0.0', s, d, 1)
    keys['body_conv.0.1.weight'] = (1, )
    for i in range(1, m + 1):
        conv(keys, f'body_conv.{i}', s, s, 3)
    keys[f'body_conv.{m + 1}.weight'] = (1, )
    conv(keys, f'body_conv.{m + 2}.0', d, s, 1)
    keys[f'body_conv.{m + 2}.1.weight'] = (1, )
    keys.update({'tail_conv.weight': (d, 3, 9, 9), 'tail_conv.bias': (3, )})
    return keys


def carn_keys(nf: int, group: int = 4, batch_norm: bool = True) -> dict:
    """``CARN_M(3, 3, nf, 4, False, group)``. ``arch_util.BasicBlock(in, nf, 1, 1, 0)``: conv without bias, then
    (ClassSR's defaults) ``BatchNorm2d`` and ReLU, or (CDNSR's defaults, ``bn=False``) ReLU alone."""
    keys = {}
    for shift in ('sub_mean', 'add_mean'):
        conv(keys, shift, 3, 3, 1)
    conv(keys, 'entry', nf, 3, 3)

    def basic(name: str, in_ch: int) -> None:
        conv(keys, f'{name}.0', nf, in_ch, 1, bias=False)
        if batch_norm:
            keys.update({f'{name}.1.{p}': (nf, ) for p in ('weight', 'bias', 'running_mean', 'running_var')})
            keys[f'{name}.1.num_batches_tracked'] = ()

    for b in (1, 2, 3):
        conv(keys, f'b{b}.b1.body.0', nf, nf // group, 3)
        conv(keys, f'b{b}.b1.body.2', nf, nf // group, 3)
        conv(keys, f'b{b}.b1.body.4', nf, nf, 1)
        for j in (1, 2, 3):
            basic(f'b{b}.c{j}', (j + 1) * nf)
    for j in (1, 2, 3):
        basic(f'c{j}', (j + 1) * nf)
    conv(keys, 'upsample.up.body.0', 4 * nf, nf // group, 3)
    conv(keys, 'upsample.up.body.3', 4 * nf, nf // group, 3)
    conv(keys, 'exit', 3, nf, 3)
    return keys


def srresnet_keys(nf: int, nb: int) -> dict:
    """``MSRResNet(3, 3, nf, nb, 4)`` of ClassSR's SRResNet_arch."""
    keys = {}
    conv(keys, 'conv_first', nf, 3, 3)
    for i in range(nb):
        conv(keys, f'recon_trunk.{i}.conv1', nf, nf, 3)
        conv(keys, f'recon_trunk.{i}.conv2', nf, nf, 3)
    conv(keys, 'upconv1', 4 * nf, nf, 3)
    conv(keys, 'upconv2', 4 * nf, nf, 3)
    conv(keys, 'HRconv', nf, nf, 3)
    conv(keys, 'conv_last', 3, nf, 3)
    return keys


def rcan_keys(nf: int, groups: int, blocks: int, reduction: int = 16) -> dict:
    """``RCAN(groups, blocks, nf, 1, 3, rgb_range, 4, reduction)``: ``head``, ``body`` (residual groups of RCABs
    with ``CALayer.conv_du``, each closed by a conv, then one conv), ``tail`` (Upsampler, conv)."""
    keys = {}
    for shift in ('sub_mean', 'add_mean'):
        conv(keys, shift, 3, 3, 1)
    conv(keys, 'head.0', nf, 3, 3)
    for g in range(groups):
        for b in range(blocks):
            name = f'body.{g}.body.{b}.body'
            conv(keys, f'{name}.0', nf, nf, 3)
            conv(keys, f'{name}.2', nf, nf, 3)
            conv(keys, f'{name}.3.conv_du.0', nf // reduction, nf, 1)
            conv(keys, f'{name}.3.conv_du.2', nf, nf // reduction, 1)
        conv(keys, f'body.{g}.body.{blocks}', nf, nf, 3)
    conv(keys, f'body.{groups}', nf, nf, 3)
    conv(keys, 'tail.0.0', 4 * nf, nf, 3)
    conv(keys, 'tail.0.2', 4 * nf, nf, 3)
    conv(keys, 'tail.1', 3, nf, 3)
    return keys


def fill(keys: dict, seed: int, value_range: float = 1.0, trained_shift: bool = True) -> dict:
    """Random tensors for ``keys``: convs ~ N(0, 0.5 / fan_in), small biases, BN statistics in sensible ranges,
    MeanShift ``sub_mean`` / ``add_mean`` near (or, ``trained_shift=False``, at) the DIV2K mean shift."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in keys.items():
        noise = torch.randn(shape, generator=gen)
        if key.endswith('num_batches_tracked'):
            out[key] = torch.tensor(1000)
        elif 'mean.' in key and key.split('.')[-2] in ('sub_mean', 'add_mean'):
            sign = -1.0 if key.split('.')[-2] == 'sub_mean' else 1.0
            if key.endswith('weight'):
                out[key] = (torch.eye(3) + (0.05 * noise[..., 0, 0] if trained_shift else 0)).view(3, 3, 1, 1)
            else:
                out[key] = sign * value_range * DIV2K + (0.02 * value_range * noise if trained_shift else 0)
        elif key.endswith('running_var'):
            out[key] = torch.rand(shape, generator=gen) + 0.5
        elif key.endswith('running_mean'):
            out[key] = 0.1 * noise
        elif key.endswith('.weight') and len(shape) == 1:  # PReLU slope, BN scale
            out[key] = 0.2 + torch.rand(shape, generator=gen)
        elif key.endswith('.weight'):
            out[key] = noise * (0.5 / (shape[1] * shape[-1] * shape[-2]))**0.5 if len(shape) == 4 else noise * 0.2
        else:
            out[key] = 0.01 * noise
    return out


def container(branch_keys: list[dict], seed: int = 0, value_range: float = 1.0, trained_shift: bool = True) -> dict:
    """A full official state dict: ``classifier.*`` and ``net1.*`` ... ``net3.*``."""
    state = {f'classifier.{k}': v for k, v in fill(classifier_keys(), seed).items()}
    for i, keys in enumerate(branch_keys):
        state.update({f'net{i + 1}.{k}': v for k, v in fill(keys, seed + i + 1, value_range, trained_shift).items()})
    return state


def part(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


# ----------------------------------------------------------------------------- the official forward passes


def c2d(x: torch.Tensor, sd: dict, name: str, **kwargs) -> torch.Tensor:
    weight = sd[f'{name}.weight']
    kwargs.setdefault('padding', weight.shape[-1] // 2)
    return F.conv2d(x, weight, sd.get(f'{name}.bias'), **kwargs)


def official_classifier(sd: dict, x: torch.Tensor) -> torch.Tensor:
    h = x
    for i in (0, 2, 4, 6, 8):
        h = c2d(h, sd, f'CondNet.{i}', stride=4 if i == 0 else 1, padding=0)
        h = F.leaky_relu(h, 0.1) if i != 8 else h
    h = F.avg_pool2d(h, h.shape[2]).view(h.shape[0], -1)  # nn.AvgPool2d(out.size()[2])
    return F.linear(h, sd['lastOut.weight'], sd['lastOut.bias'])


def official_fsrcnn(sd: dict, x: torch.Tensor, m: int = 4) -> torch.Tensor:
    h = F.prelu(c2d(x, sd, 'head_conv.0'), sd['head_conv.1.weight'])
    h = F.prelu(c2d(h, sd, 'body_conv.0.0'), sd['body_conv.0.1.weight'])
    for i in range(1, m + 1):
        h = c2d(h, sd, f'body_conv.{i}')
    h = F.prelu(h, sd[f'body_conv.{m + 1}.weight'])
    h = F.prelu(c2d(h, sd, f'body_conv.{m + 2}.0'), sd[f'body_conv.{m + 2}.1.weight'])
    return F.conv_transpose2d(h, sd['tail_conv.weight'], sd['tail_conv.bias'], stride=4, padding=3, output_padding=1)


def official_carn(sd: dict, x: torch.Tensor, group: int = 4, batch_norm: bool = True) -> torch.Tensor:

    def basic(h: torch.Tensor, name: str) -> torch.Tensor:
        h = F.conv2d(h, sd[f'{name}.0.weight'])
        if batch_norm:  # eval mode: running statistics
            h = F.batch_norm(h, sd[f'{name}.1.running_mean'], sd[f'{name}.1.running_var'], sd[f'{name}.1.weight'],
                             sd[f'{name}.1.bias'], False, 0.1, 1e-5)
        return F.relu(h)

    def eres(h: torch.Tensor, name: str) -> torch.Tensor:
        out = F.relu(c2d(h, sd, f'{name}.body.0', groups=group))
        out = F.relu(c2d(out, sd, f'{name}.body.2', groups=group))
        return F.relu(c2d(out, sd, f'{name}.body.4') + h)

    def block(h: torch.Tensor, name: str) -> torch.Tensor:  # one EResidualBlock (b1) used three times
        c = o = h
        for j in (1, 2, 3):
            c = torch.cat([c, eres(o, f'{name}.b1')], dim=1)
            o = basic(c, f'{name}.c{j}')
        return o

    h = c2d(c2d(x, sd, 'sub_mean'), sd, 'entry')
    c = o = h
    for j in (1, 2, 3):
        c = torch.cat([c, block(o, f'b{j}')], dim=1)
        o = basic(c, f'c{j}')
    for i in (0, 3):
        o = F.pixel_shuffle(F.relu(c2d(o, sd, f'upsample.up.body.{i}', groups=group)), 2)
    return c2d(c2d(o, sd, 'exit'), sd, 'add_mean')


def official_srresnet(sd: dict, x: torch.Tensor, nb: int) -> torch.Tensor:
    h = F.leaky_relu(c2d(x, sd, 'conv_first'), 0.1)
    for i in range(nb):
        h = h + c2d(F.relu(c2d(h, sd, f'recon_trunk.{i}.conv1')), sd, f'recon_trunk.{i}.conv2')
    h = F.leaky_relu(F.pixel_shuffle(c2d(h, sd, 'upconv1'), 2), 0.1)
    h = F.leaky_relu(F.pixel_shuffle(c2d(h, sd, 'upconv2'), 2), 0.1)
    out = c2d(F.leaky_relu(c2d(h, sd, 'HRconv'), 0.1), sd, 'conv_last')
    return out + F.interpolate(x, scale_factor=4, mode='bilinear', align_corners=False)


def official_rcan(sd: dict, x255: torch.Tensor, groups: int, blocks: int) -> torch.Tensor:
    """On the official 0-255 input."""
    head = c2d(c2d(x255, sd, 'sub_mean'), sd, 'head.0')
    res = head
    for g in range(groups):
        r = res
        for b in range(blocks):
            name = f'body.{g}.body.{b}.body'
            t = c2d(F.relu(c2d(r, sd, f'{name}.0')), sd, f'{name}.2')
            y = F.relu(c2d(t.mean(dim=(2, 3), keepdim=True), sd, f'{name}.3.conv_du.0'))
            r = t * torch.sigmoid(c2d(y, sd, f'{name}.3.conv_du.2')) + r
        res = c2d(r, sd, f'body.{g}.body.{blocks}') + res
    res = c2d(res, sd, f'body.{groups}') + head
    t = F.pixel_shuffle(c2d(res, sd, 'tail.0.0'), 2)
    t = c2d(F.pixel_shuffle(c2d(t, sd, 'tail.0.2'), 2), sd, 'tail.1')
    return c2d(t, sd, 'add_mean')


# ----------------------------------------------------------------------------- the cases

# name: (branch layouts, official branch forward on the plugin's [0, 1] input, official input range)
CASES = {
    'fsrcnn': ([fsrcnn_keys(d) for d in (16, 36, 56)], lambda sd, x: official_fsrcnn(sd, x), 1.0),
    'carn_classsr': ([carn_keys(nf) for nf in (36, 52, 64)], lambda sd, x: official_carn(sd, x), 1.0),
    'carn_cdnsr': ([carn_keys(nf, batch_norm=False)
                    for nf in (8, 12, 16)], lambda sd, x: official_carn(sd, x, batch_norm=False), 1.0),
    'srresnet': ([srresnet_keys(nf, 2) for nf in (8, 12, 16)], lambda sd, x: official_srresnet(sd, x, 2), 1.0),
    'rcan': ([rcan_keys(nf, 2, 2) for nf in (16, 24, 32)], lambda sd, x: official_rcan(sd, 255 * x, 2, 2) / 255, 255.0),
}


def route_apart(state: dict, x: torch.Tensor) -> None:
    """Set ``classifier.lastOut`` so that the patches ``x`` split over the three classes: logit ``c`` is
    ``-(s - t_c)^2`` up to a common term, ``s`` the pooled features along their spread, ``t_c`` spread quantiles."""
    sd = part(state, 'classifier.')
    h = x
    for i in (0, 2, 4, 6, 8):
        h = c2d(h, sd, f'CondNet.{i}', stride=4 if i == 0 else 1, padding=0)
        h = F.leaky_relu(h, 0.1) if i != 8 else h
    pooled = h.mean(dim=(2, 3))
    direction = pooled[-1] - pooled[0]
    direction = direction / direction.norm()
    scores = (pooled @ direction).sort().values
    centres = scores[[1, len(scores) // 2, -2]]
    scale = 10.0 / float(scores[-1] - scores[0])**2
    state['classifier.lastOut.weight'] = scale * 2 * centres.view(-1, 1) * direction.view(1, -1)
    state['classifier.lastOut.bias'] = -scale * centres**2


def patches() -> torch.Tensor:
    """Six 12x12 patches of different contrast (``route_apart`` sends them to different branches)."""
    x = torch.rand(6, 3, 12, 12, generator=torch.Generator().manual_seed(7))
    gain = torch.linspace(0.05, 1.0, 6).view(-1, 1, 1, 1)
    return (0.5 + (x - 0.5) * gain).contiguous()


@pytest.mark.parametrize('case', sorted(CASES))
def test_converted_network_matches_the_official_forward(case):
    layouts, branch_forward, value_range = CASES[case]
    state = container(layouts, seed=3, value_range=value_range)
    x = patches()
    route_apart(state, x)
    converted = convert_state_dict(state)
    net = build_network(converted.network)
    net.load_state_dict(converted.state_dict, strict=True)
    net.eval()
    with torch.no_grad():
        classifier_sd = part(state, 'classifier.')
        official_input = x * value_range  # RCAN: the official containers take 0-255 images ...
        logits = official_classifier(classifier_sd, official_input / value_range)  # ... and divide them here
        probs = logits.softmax(dim=1)
        outs = [branch_forward(part(state, f'net{i + 1}.'), x) for i in range(3)]
        labels = logits.argmax(dim=1)
        hard = torch.stack([outs[label][k] for k, label in enumerate(labels.tolist())])
        soft = sum(probs[:, i].view(-1, 1, 1, 1) * outs[i] for i in range(3))
        torch.testing.assert_close(net.classify(x), logits, **TOL)
        sr_soft, probs_soft, branch_outs = net(x, routing='soft', return_outputs=True)
        sr_hard, probs_hard = net(x, routing='hard')
    for i, branch_out in enumerate(branch_outs):
        assert branch_out.shape == (6, 3, 48, 48)
        torch.testing.assert_close(branch_out, outs[i], **TOL, msg=lambda m: f'branch {i}: {m}')
    assert set(labels.tolist()) == {0, 1, 2}, 'the patches should exercise every branch'
    torch.testing.assert_close(probs_soft, probs, **TOL)
    torch.testing.assert_close(probs_hard, probs, **TOL)
    torch.testing.assert_close(sr_soft, soft, **TOL)
    torch.testing.assert_close(sr_hard, hard, **TOL)
    assert converted.widths == [layout_width(case, i) for i in range(3)]


def layout_width(case: str, index: int) -> int:
    widths = {'fsrcnn': (16, 36, 56), 'carn_classsr': (36, 52, 64), 'rcan': (16, 24, 32)}
    return widths.get(case, (8, 12, 16))[index]


def test_trained_mean_shift_becomes_the_branch_offset():
    """A moved ``sub_mean`` needs its offset ``-inverse(W) b`` in the plugin's CARN (``rgb_mean``); the untouched
    one keeps the DIV2K default, so the shipped option file fits."""
    moved = convert_state_dict(container([carn_keys(nf) for nf in (8, 12, 16)], seed=1))
    state = part(container([carn_keys(nf) for nf in (8, 12, 16)], seed=1), 'net2.')
    matrix, bias = state['sub_mean.weight'][:, :, 0, 0].double(), state['sub_mean.bias'].double()
    expected = (-torch.linalg.solve(matrix, bias)).float()
    assert moved.network['branches'][1]['rgb_mean'] == pytest.approx(expected.tolist(), abs=1e-7)
    assert abs(moved.network['branches'][1]['rgb_mean'][0] - 0.4488) > 1e-4
    untouched = convert_state_dict(container([carn_keys(nf) for nf in (8, 12, 16)], trained_shift=False))
    assert all('rgb_mean' not in branch for branch in untouched.network['branches'])


@pytest.mark.parametrize('arch, layouts, value_range', [
    ('FSRCNN', [fsrcnn_keys(d) for d in (16, 36, 56)], 1.0),
    ('CARN', [carn_keys(nf) for nf in (36, 52, 64)], 1.0),
    ('SRResNet', [srresnet_keys(nf, 16) for nf in (36, 52, 64)], 1.0),
])
def test_official_widths_give_the_shipped_container(arch, layouts, value_range):
    """At the official widths (and an untrained mean shift) the options are those of options/networks/."""
    converted = convert_state_dict(container(layouts, trained_shift=False, value_range=value_range))
    shipped = yaml.safe_load((REPO / 'options' / 'networks' / f'CDNSR_{arch}_x4.yml').read_text())['network_g']
    assert converted.network == shipped
    build_network(shipped).load_state_dict(converted.state_dict, strict=True)


@pytest.mark.slow
def test_official_rcan_widths_give_the_shipped_container():
    """RCAN at 36 / 50 / 64, 10 groups of 20 blocks (about 30M parameters: slow on two cores)."""
    layouts = [rcan_keys(nf, 10, 20) for nf in (36, 50, 64)]
    converted = convert_state_dict(container(layouts, trained_shift=False, value_range=255.0))
    shipped = yaml.safe_load((REPO / 'options' / 'networks' / 'CDNSR_RCAN_x4.yml').read_text())['network_g']
    assert converted.network == shipped
    assert [b['squeeze_factor'] for b in converted.network['branches']] == [16, 16, 16]


# ----------------------------------------------------------------------------- refusals


@pytest.fixture(scope='module')
def fsrcnn_state() -> dict:
    return container([fsrcnn_keys(d) for d in (16, 36, 56)])


def test_module_prefix_is_stripped(fsrcnn_state):
    plain = convert_state_dict(fsrcnn_state)
    prefixed = convert_state_dict({f'module.{k}': v for k, v in fsrcnn_state.items()})
    assert prefixed.network == plain.network
    assert all(torch.equal(prefixed.state_dict[k], v) for k, v in plain.state_dict.items())


def test_wrong_branch_order_is_refused(fsrcnn_state):
    swapped = {
        k.replace('net1.', 'netX.').replace('net3.', 'net1.').replace('netX.', 'net3.'): v
        for k, v in fsrcnn_state.items()
    }
    with pytest.raises(ValueError, match=r'branch order: net1 has width 56 and net2 width 36'):
        convert_state_dict(swapped)


def test_missing_key_is_named(fsrcnn_state):
    state = dict(fsrcnn_state)
    del state['net2.body_conv.3.bias']
    with pytest.raises(ValueError, match=r'missing key: net2\.body_conv\.3\.bias \(shape \(12,\)\)'):
        convert_state_dict(state)


def test_wrong_shape_is_named(fsrcnn_state):
    state = dict(fsrcnn_state, **{'net3.tail_conv.weight': torch.zeros(56, 3, 7, 7)})
    with pytest.raises(ValueError, match=r'net3\.tail_conv\.weight expected \(56, 3, 9, 9\), found \(56, 3, 7, 7\)'):
        convert_state_dict(state)


def test_carn_batch_norm_key_missing_is_named():
    state = container([carn_keys(nf) for nf in (8, 12, 16)], trained_shift=False)
    del state['net1.b2.c3.1.running_var']
    with pytest.raises(ValueError, match=r'net1\.b2\.c3\.1\.running_var \(shape \(8,\)\)'):
        convert_state_dict(state)


def test_unexpected_and_stray_keys_are_named(fsrcnn_state):
    with pytest.raises(ValueError, match=r'unexpected key: net1\.extra\.weight'):
        convert_state_dict(dict(fsrcnn_state, **{'net1.extra.weight': torch.zeros(1)}))
    with pytest.raises(ValueError, match=r"unexpected key 'optimizer_step'"):
        convert_state_dict(dict(fsrcnn_state, optimizer_step=torch.zeros(1)))


def test_given_arch_must_match_the_keys(fsrcnn_state):
    with pytest.raises(ValueError, match=r"arch 'carn' was given but net1 has the keys of FSRCNN_net"):
        convert_state_dict(fsrcnn_state, arch='carn')
    assert convert_state_dict(fsrcnn_state, arch='fsrcnn').arch == 'fsrcnn'


def test_classes_must_match_branches(fsrcnn_state):
    state = {k: v for k, v in fsrcnn_state.items() if not k.startswith('net3.')}
    with pytest.raises(ValueError, match=r'3 classes but the checkpoint has 2 branches'):
        convert_state_dict(state)


def test_early_exit_carn_is_refused():
    state = container([carn_keys(nf, batch_norm=False) for nf in (8, 12, 16)])
    for k in (1, 2, 3):  # EE_CARN_M: upsample1..3 and exit1..3 instead of upsample and exit
        state[f'net{k}.exit1.weight'] = state.pop(f'net{k}.exit.weight')
    with pytest.raises(ValueError, match=r'net1\.exit1\.weight: an early-exit EE_CARN_M'):
        convert_state_dict(state)


def test_singular_mean_shift_is_refused():
    state = container([carn_keys(nf) for nf in (8, 12, 16)])
    state['net3.sub_mean.weight'] = torch.zeros(3, 3, 1, 1)
    with pytest.raises(ValueError, match=r'net3\.sub_mean\.weight is singular'):
        convert_state_dict(state)


def test_wrappers_and_single_branches_are_refused(fsrcnn_state):
    with pytest.raises(ValueError, match=r"BasicSR checkpoint \(\{'params': \.\.\.\}\)"):
        convert_state_dict({'params': fsrcnn_state})
    with pytest.raises(ValueError, match=r'single-branch checkpoints'):
        convert_state_dict(part(fsrcnn_state, 'net1.'))


# ----------------------------------------------------------------------------- the command line


def test_cli_writes_a_checkpoint_the_tester_loads(tmp_path, fsrcnn_state, capsys):
    source, output, options = tmp_path / 'ClassSR_FSRCNN.pth', tmp_path / 'out' / 'conv.pth', tmp_path / 'conv.yml'
    torch.save(fsrcnn_state, source)
    assert tool.main(['--input', str(source), '--output', str(output), '--network-out', str(options)]) == 0
    assert 'fsrcnn' in capsys.readouterr().out
    saved = torch.load(output, map_location='cpu', weights_only=True)
    assert list(saved) == ['params']
    document = yaml.safe_load(options.read_text())
    assert document['scale'] == 4 and document['network_g'] == convert_checkpoint(source).network
    net = build_network(document['network_g'])
    load_weights(net, output)  # what tools/test_patches.py --network ... --checkpoint ... does
    x = patches()[:2]
    with torch.no_grad():
        torch.testing.assert_close(net.branches[0](x), official_fsrcnn(part(fsrcnn_state, 'net1.'), x), **TOL)
    leftovers = [p.name for p in tmp_path.rglob('*') if p.name.startswith('.')]
    assert leftovers == []


def test_cli_refuses_to_overwrite(tmp_path, fsrcnn_state, capsys):
    source, output = tmp_path / 'in.pth', tmp_path / 'conv.pth'
    torch.save(fsrcnn_state, source)
    output.write_bytes(b'keep me')
    assert tool.main(['--input', str(source), '--output', str(output)]) == 2
    assert 'already exists' in capsys.readouterr().err and output.read_bytes() == b'keep me'
    assert tool.main(['--input', str(source), '--output', str(output), '--overwrite']) == 0
    assert list(torch.load(output, weights_only=True)) == ['params']
    assert output.with_suffix('.yml').is_file()  # the default --network-out
    assert tool.main(['--input', str(source), '--output', str(source), '--overwrite']) == 2
    assert 'is the input' in capsys.readouterr().err


def test_cli_refuses_a_corrupt_file(tmp_path, capsys):
    corrupt = tmp_path / 'broken.pth'
    corrupt.write_bytes(b'PK\x03\x04 not really a checkpoint')
    assert tool.main(['--input', str(corrupt), '--output', str(tmp_path / 'x.pth')]) == 2
    err = capsys.readouterr().err
    assert err.startswith('error: cannot read') and err.count('\n') == 1 and 'broken.pth' in err
    torch.save([1, 2], corrupt)
    assert tool.main(['--input', str(corrupt), '--output', str(tmp_path / 'x.pth')]) == 2
    assert 'holds a list, not a state dict' in capsys.readouterr().err
    assert not (tmp_path / 'x.pth').exists()


@pytest.mark.slow
def test_cli_exits_2_with_one_line_on_a_corrupt_file(tmp_path):
    """As a user runs it: a subprocess, exit status 2, one line on stderr, no traceback."""
    corrupt = tmp_path / 'broken.pth'
    corrupt.write_bytes(b'PK\x03\x04 not really a checkpoint')
    result = subprocess.run([
        sys.executable,
        str(REPO / 'tools' / 'convert_checkpoint.py'), '--input',
        str(corrupt), '--output',
        str(tmp_path / 'x.pth')
    ],
                            capture_output=True,
                            text=True,
                            cwd=REPO)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: cannot read') and 'broken.pth' in lines[0]
    assert 'Traceback' not in result.stderr and not (tmp_path / 'x.pth').exists()


def test_cli_names_a_missing_file_and_a_mismatch(tmp_path, fsrcnn_state, capsys):
    assert tool.main(['--input', str(tmp_path / 'nope.pth'), '--output', str(tmp_path / 'x.pth')]) == 2
    assert capsys.readouterr().err.startswith('error: ') and not (tmp_path / 'x.pth').exists()
    source = tmp_path / 'in.pth'
    torch.save({k: v for k, v in fsrcnn_state.items() if k != 'net2.head_conv.0.bias'}, source)
    assert tool.main(['--input', str(source), '--arch', 'fsrcnn', '--output', str(tmp_path / 'x.pth')]) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'net2.head_conv.0.bias' in err and not (tmp_path / 'x.pth').exists()


@pytest.mark.slow
def test_cli_output_runs_in_the_tester(tmp_path, fsrcnn_state):
    """tools/test_patches.py --network <written yml> --checkpoint <written pth> on a small LR image."""
    import cv2
    import numpy as np
    source, output, options = tmp_path / 'in.pth', tmp_path / 'conv.pth', tmp_path / 'conv.yml'
    torch.save(fsrcnn_state, source)
    assert tool.main(['--input', str(source), '--output', str(output), '--network-out', str(options)]) == 0
    (tmp_path / 'lr').mkdir()
    cv2.imwrite(str(tmp_path / 'lr' / 'a.png'), np.random.default_rng(0).integers(0, 255, (40, 48, 3), np.uint8))
    result = subprocess.run([
        sys.executable,
        str(REPO / 'tools' / 'test_patches.py'), '--input',
        str(tmp_path / 'lr'), '--network',
        str(options), '--checkpoint',
        str(output), '--scale', '4', '--out',
        str(tmp_path / 'res'), '--threads', '1'
    ],
                            capture_output=True,
                            text=True,
                            cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    assert cv2.imread(str(next((tmp_path / 'res').rglob('a.png')))).shape == (160, 192, 3)


# ----------------------------------------------------------------------------- non-finite weights (issue 25)


def test_non_finite_weights_are_refused_naming_the_part(fsrcnn_state):
    state = dict(fsrcnn_state)
    state['net2.body_conv.1.weight'] = state['net2.body_conv.1.weight'].clone()
    state['net2.body_conv.1.weight'][0, 0, 1, 1] = float('nan')
    state['classifier.lastOut.bias'] = torch.full_like(state['classifier.lastOut.bias'], float('inf'))
    with pytest.raises(ValueError) as error:
        convert_state_dict(state)
    message = str(error.value)
    assert message.startswith('non-finite weights (NaN or inf) in classifier: classifier.lastOut.bias (3 of 3 '
                              'values); net2 (becomes branch1): net2.body_conv.1.weight (1 of ')
    assert 'nothing was converted' in message and 'net1' not in message and 'net3' not in message


def test_a_fold_that_overflows_is_refused_naming_the_branch():
    """A finite file whose BatchNorm folds to NaN (running_var below -eps: the square root of a negative)."""
    state = container([carn_keys(nf) for nf in (8, 12, 16)])
    state['net3.c2.1.running_var'] = torch.full_like(state['net3.c2.1.running_var'], -1.0)
    with pytest.raises(ValueError, match=r'non-finite values \(NaN or inf\) in branch2 \(from net3\): branches\.2\.'):
        convert_state_dict(state)


def test_cli_refuses_non_finite_weights_with_exit_2_and_writes_nothing(tmp_path, fsrcnn_state):
    """As a user runs it: a subprocess, exit 2, one line naming the part; the input unchanged, no output."""
    state = dict(fsrcnn_state)
    state['net3.tail_conv.weight'] = torch.full_like(state['net3.tail_conv.weight'], float('nan'))
    source = tmp_path / 'diverged.pth'
    torch.save(state, source)
    before = source.read_bytes()
    result = subprocess.run([
        sys.executable,
        str(REPO / 'tools' / 'convert_checkpoint.py'), '--input',
        str(source), '--output',
        str(tmp_path / 'out.pth')
    ],
                            capture_output=True,
                            text=True,
                            cwd=REPO)
    assert result.returncode == 2 and 'Traceback' not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: non-finite weights (NaN or inf) in net3 (becomes branch2): '
                                                   'net3.tail_conv.weight'), result.stderr
    assert source.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ['diverged.pth']
