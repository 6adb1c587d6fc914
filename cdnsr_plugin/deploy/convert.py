"""Import official ClassSR (XPixelGroup/ClassSR) and CDNSR (fangvv/CDNSR) checkpoints into ``CDNSRNet``.

Both repositories save ``network.state_dict()`` as is (``base_model.save_network``): a flat dict of tensors
``classifier.CondNet.{0,2,4,6,8}.*``, ``classifier.lastOut.*`` and ``net1.*`` ... ``netM.*`` (M = 3 in every
released container), possibly with a ``module.`` prefix. ``convert_state_dict`` reads the variant (``fsrcnn``,
``carn``, ``srresnet``, ``rcan``; given or detected from the keys), every branch's hyper-parameters from the
tensor shapes, checks the whole file against the official layout those imply (every key present with its
shape, nothing else), checks the branch order (widths increase net1 < net2 < ...: ``net1`` is the simple
branch, the plugin's ``branches[0]``), maps every tensor, and checks that the result fills the plugin network
exactly (``load_state_dict(strict=True)``). Any mismatch raises ``ValueError`` naming the key, the expected and
the found shape. Non-finite values (NaN or inf) are refused twice, naming the part and the key: in the file
(a diverged or damaged checkpoint: ``net2 (becomes branch1): net2.head_conv.0.weight ...``), and in the result
(a fold that overflows, e.g. a BatchNorm ``running_var`` at or below ``-eps``); nothing is written then.

What each variant becomes (the converted network takes RGB in [0, 1], like every plugin network):

* classifier -> ``PatchClassifier`` (same parameter names). The official one pools with
  ``AvgPool2d(height)``, the global mean on the square patches it is given; the plugin averages over the
  whole map, so the two agree on square inputs (the only ones the official code accepts).
* ``FSRCNN_net`` -> the plugin's ``FSRCNN`` (same names). The official deconvolution has a fixed padding 3,
  output padding 1, which upsamples exactly only x4 (the scale of every ClassSR / CDNSR container); the
  scale is not stored in the weights, so FSRCNN imports are x4.
* ``CARN_M`` -> the plugin's ``CARN``. ClassSR's cascade fusions (``arch_util.BasicBlock(.., 1, 1, 0)``) are
  conv (no bias) + BatchNorm + ReLU; the BatchNorm is folded into the conv (scale and bias from the running
  statistics, eps 1e-5), which reproduces the official network in eval mode, as its tester runs it; CDNSR's
  ``BasicBlock`` defaults drop the BatchNorm, so there the conv just gets a zero bias. The trainable 1x1
  ``MeanShift`` convs (``sub_mean``, ``add_mean``; EDSR's ``self.requires_grad = False`` does not freeze them,
  so trained checkpoints hold moved values) are folded exactly: ``sub_mean``'s matrix into ``entry``,
  ``add_mean`` into ``exit``, and the input offset it implies, ``-inverse(W) b``, becomes the CARN option
  ``rgb_mean`` when it is not the DIV2K default (the offset must be subtracted before ``entry``'s zero
  padding, so it cannot go into a bias).
* ``MSRResNet`` -> BasicSR's ``MSRResNet`` (``recon_trunk`` -> ``body``, ``HRconv`` -> ``conv_hr``).
* ``RCAN`` -> BasicSR's ``RCAN`` with ``img_range: 255``. The official containers feed 0-255 images (their
  RCAN test and data paths skip the /255) and divide by 255 only before the classifier. With
  ``rgb_mean = -inverse(W) b / 255`` from ``sub_mean`` (the DIV2K mean for the released weights, trained at
  ``rgb_range: 255``), ``sub_mean``'s matrix folded into ``conv_first`` and ``add_mean`` into ``conv_last``,
  the converted network gives ``official(255 x) / 255`` on ``x`` in [0, 1], and the classifier sees the same
  ``x``.

Not convertible (a ``ValueError`` says so): single-branch checkpoints (``CARN_branch1.pth`` and the like: no
``classifier.*``), CDNSR's early-exit ``EE_CARN_M`` (three exits; not used by any released container), a
``sub_mean`` whose matrix is singular, classifiers outside ``PatchClassifier``'s 3 to 6 conv layers.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch
from basicsr.archs import build_network

import cdnsr_plugin.archs  # noqa: F401  (registers CDNSRNet, PatchClassifier, FSRCNN, CARN)

ARCHS = ('fsrcnn', 'carn', 'srresnet', 'rcan')
DIV2K_MEAN = (0.4488, 0.4371, 0.4040)  # the default of the plugin's CARN and of BasicSR's RCAN
BN_EPS = 1e-5  # nn.BatchNorm2d's default; the official code never sets another
MAX_CONDITION = 1e4  # of a MeanShift matrix we invert

Shape = tuple[int, ...]
State = dict[str, torch.Tensor]
Layout = dict[str, Shape]


@dataclass
class Converted:
    """The result of a conversion.

    Attributes:
        arch: ``fsrcnn``, ``carn``, ``srresnet`` or ``rcan``.
        network: the ``network_g`` mapping of a ``CDNSRNet`` (classifier, branches with the read widths).
        state_dict: loads with ``strict=True`` into ``build_network(network)``.
        widths: each branch's width (``d`` or ``num_feat``), net1 first.
        scale: the upscaling factor.
        notes: what the conversion did beyond renaming (folds, offsets), one line each.
    """

    arch: str
    network: dict
    state_dict: State
    widths: list[int]
    scale: int
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- reading the file


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = ' '.join(str(exc).split())
    return text if len(text) <= limit else text[:limit] + '...'


def load_official(path: str | Path) -> State:
    """The state dict in ``path`` (``torch.load(..., weights_only=True)``: no code runs from the file).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a readable PyTorch file, or not a flat dict of tensors (see ``as_state_dict``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'{path} does not exist; pass the official .pth file with --input')
    try:
        obj = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as exc:  # zip, pickle, EOF and weights-only errors alike
        raise ValueError(f'cannot read {path} as a weights-only PyTorch checkpoint ({_one_line(exc)})') from exc
    return as_state_dict(obj, str(path))


def as_state_dict(obj: Any, source: str = 'the checkpoint') -> State:
    """``obj`` as a flat ``{name: tensor}`` dict, or a ``ValueError`` saying what it is instead.

    The official repositories save ``network.state_dict()`` directly, so wrappers are refused: a
    ``{'params': ...}`` file is a BasicSR checkpoint (already converted?), and neither repository writes
    ``{'state_dict': ...}``.
    """
    if not isinstance(obj, Mapping):
        raise ValueError(f'{source} holds a {type(obj).__name__}, not a state dict')
    for key in ('params', 'params_ema'):
        if isinstance(obj.get(key), Mapping):
            raise ValueError(f"{source} is a BasicSR checkpoint ({{'{key}': ...}}), not an official ClassSR / CDNSR "
                             'state dict (those save network.state_dict() as is); is it already converted?')
    for key in ('state_dict', 'model', 'net'):
        if isinstance(obj.get(key), Mapping):
            raise ValueError(f"{source} wraps its weights in {{'{key}': ...}}; the official ClassSR / CDNSR code saves "
                             'network.state_dict() as is, so this is not one of their checkpoints')
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise ValueError(f'{source}: entry {key!r} is a {type(value).__name__}, not a tensor: not a state dict')
    if not obj:
        raise ValueError(f'{source} is an empty state dict')
    return dict(obj)


# ----------------------------------------------------------------------------- helpers


def _shape(state: State, key: str, where: str, ndim: int) -> Shape:
    if key not in state:
        raise ValueError(f'{where}{key} is missing (needed to read the layout of {where.rstrip(".") or "it"})')
    shape = tuple(state[key].shape)
    if len(shape) != ndim:
        raise ValueError(f'{where}{key}: expected a {ndim}-D tensor, found shape {shape}')
    return shape


def _indices(state: State, pattern: str) -> list[int]:
    regex = re.compile(pattern)
    return sorted({int(m.group(1)) for m in map(regex.fullmatch, state) if m})


def _conv(layout: Layout, name: str, out_ch: int, in_ch: int, kernel: int, bias: bool = True) -> None:
    layout[f'{name}.weight'] = (out_ch, in_ch, kernel, kernel)
    if bias:
        layout[f'{name}.bias'] = (out_ch, )


def _mean_shift(layout: Layout, name: str) -> None:
    layout[f'{name}.weight'] = (3, 3, 1, 1)
    layout[f'{name}.bias'] = (3, )


def check_layout(state: State, expected: Layout, where: str, optional: frozenset = frozenset()) -> None:
    """``state`` holds exactly the keys of ``expected`` (``optional`` ones may be absent) with those shapes.

    Raises:
        ValueError: naming every wrong shape (expected and found), else every missing key (with its expected
            shape), else every unexpected key; keys are written as in the file (``where`` is their prefix).
    """
    wrong = [(k, s, tuple(state[k].shape)) for k, s in expected.items() if k in state and tuple(state[k].shape) != s]
    if wrong:
        raise ValueError('wrong shape: ' + '; '.join(f'{where}{k} expected {s}, found {f}' for k, s, f in wrong[:6]) +
                         (f' (and {len(wrong) - 6} more)' if len(wrong) > 6 else ''))
    missing = [k for k in expected if k not in state and k not in optional]
    if missing:
        raise ValueError('missing key: ' + ', '.join(f'{where}{k} (shape {expected[k]})' for k in missing[:6]) +
                         (f' (and {len(missing) - 6} more)' if len(missing) > 6 else ''))
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        raise ValueError('unexpected key: ' + ', '.join(f'{where}{k} {tuple(state[k].shape)}' for k in unexpected[:6]) +
                         (f' (and {len(unexpected) - 6} more)' if len(unexpected) > 6 else '') +
                         ' (not part of the official layout read from the shapes)')


class _Reader:
    """Tensors of one part in float64, recording which keys the conversion used."""

    def __init__(self, state: State) -> None:
        self.state, self.used = state, set()

    def __call__(self, key: str) -> torch.Tensor:
        self.used.add(key)
        return self.state[key].detach().to(torch.float64)

    def skip(self, key: str) -> None:
        """Mark ``key`` consumed without reading it (``num_batches_tracked``: no effect in eval mode)."""
        self.used.add(key)


def _input_offset(weight: torch.Tensor, bias: torch.Tensor, key: str, value_range: float) -> torch.Tensor:
    """The offset ``mu`` with ``W (range x) + b = range W (x - mu)``: ``mu = -inverse(W) b / range``."""
    matrix = weight[:, :, 0, 0]
    condition = float(torch.linalg.cond(matrix))
    if not condition < MAX_CONDITION:
        raise ValueError(f'{key} is singular or nearly so (condition number {condition:.3g}): the mean shift '
                         'cannot be folded into the first conv exactly')
    return -torch.linalg.solve(matrix, bias) / value_range


def _fold_input(conv_weight: torch.Tensor, shift_weight: torch.Tensor) -> torch.Tensor:
    """``conv(W x)`` as one conv: the 1x1 matrix ``W`` commutes with zero padding."""
    return torch.einsum('oihw,ij->ojhw', conv_weight, shift_weight[:, :, 0, 0])


def _fold_output(conv_weight: torch.Tensor, conv_bias: torch.Tensor, shift_weight: torch.Tensor,
                 shift_bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``W conv(x) + b`` as one conv."""
    matrix = shift_weight[:, :, 0, 0]
    return torch.einsum('ij,jkhw->ikhw', matrix, conv_weight), matrix @ conv_bias + shift_bias


def _mean_option(mu: torch.Tensor) -> Optional[list[float]]:
    """``mu`` as an option value (float32, as the networks hold it), or ``None`` when it is the default."""
    mu32 = mu.to(torch.float32)
    return None if torch.equal(mu32, torch.tensor(DIV2K_MEAN)) else [float(v) for v in mu32]


# ----------------------------------------------------------------------------- the variants


@dataclass(frozen=True)
class _Variant:
    """How to read, check and map one official branch architecture."""

    name: str
    official: str  # the official class, for messages
    signature: str  # a key only this variant's branches have
    infer: Callable[[State, str], dict]  # hyper-parameters from the shapes
    layout: Callable[[dict], tuple[Layout, frozenset]]  # official keys and shapes (and optional keys)
    convert: Callable[[_Reader, dict, str], tuple[dict, State]]  # plugin branch options and tensors


def _fsrcnn_infer(state: State, where: str) -> dict:
    d, channels = _shape(state, 'head_conv.0.weight', where, 4)[:2]
    s = _shape(state, 'body_conv.0.0.weight', where, 4)[0]
    top = _indices(state, r'body_conv\.(\d+)\..*')
    if not top or top[-1] < 2:
        raise ValueError(f'{where}body_conv has layers {top}: expected shrink, m mapping convs, PReLU, expand')
    return {'width': d, 'd': d, 's': s, 'm': top[-1] - 2, 'channels': channels, 'scale': 4}


def _fsrcnn_layout(h: dict) -> tuple[Layout, frozenset]:
    d, s, m, c = h['d'], h['s'], h['m'], h['channels']
    layout: Layout = {}
    _conv(layout, 'head_conv.0', d, c, 5)
    layout['head_conv.1.weight'] = (1, )
    _conv(layout, 'body_conv.0.0', s, d, 1)
    layout['body_conv.0.1.weight'] = (1, )
    for i in range(1, m + 1):
        _conv(layout, f'body_conv.{i}', s, s, 3)
    layout[f'body_conv.{m + 1}.weight'] = (1, )
    _conv(layout, f'body_conv.{m + 2}.0', d, s, 1)
    layout[f'body_conv.{m + 2}.1.weight'] = (1, )
    layout['tail_conv.weight'] = (d, c, 9, 9)
    layout['tail_conv.bias'] = (c, )
    return layout, frozenset()


def _fsrcnn_convert(read: _Reader, h: dict, where: str) -> tuple[dict, State]:
    options = {'type': 'FSRCNN', 'd': h['d'], 's': h['s'], 'm': h['m'], 'upscale': 4}
    if h['channels'] != 3:
        options.update(num_in_ch=h['channels'], num_out_ch=h['channels'])
    return options, {key: read(key) for key in _fsrcnn_layout(h)[0]}  # the plugin keeps ClassSR's names


def _upsampler_scale(state: State, prefix: str, nf: int, where: str) -> int:
    """The scale of a pixel-shuffle upsampler whose convs are ``<prefix>.<i>.weight``: one conv to 9 x nf
    channels (x3), or one conv to 4 x nf per x2 stage."""
    first = _shape(state, f'{prefix}.0.weight', where, 4)[0]
    if first == 9 * nf:
        return 3
    if first == 4 * nf:
        return 2**len(_indices(state, re.escape(prefix) + r'\.(\d+)\.weight'))
    raise ValueError(f'{where}{prefix}.0.weight has {first} output channels: expected 4 x {nf} (x2 stages) '
                     f'or 9 x {nf} (x3)')


def _carn_infer(state: State, where: str) -> dict:
    if 'exit1.weight' in state:
        raise ValueError(f'{where}exit1.weight: an early-exit EE_CARN_M branch (CDNSR; three upsamplers and exits); '
                         'the plugin\'s CARN has one exit, so it cannot be converted')
    nf = _shape(state, 'entry.weight', where, 4)[0]
    per_group = _shape(state, 'b1.b1.body.0.weight', where, 4)[1]
    if per_group == 0 or nf % per_group:
        raise ValueError(f'{where}b1.b1.body.0.weight has {per_group} input channels per group, which does not '
                         f'divide the width {nf} (entry.weight)')
    scale = _upsampler_scale(state, 'upsample.up.body', nf, where)
    batch_norm = 'c1.1.weight' in state or 'c1.1.running_mean' in state
    return {'width': nf, 'nf': nf, 'groups': nf // per_group, 'scale': scale, 'batch_norm': batch_norm}


def _carn_fusions() -> list[tuple[str, int]]:
    """Every ``arch_util.BasicBlock`` of ``CARN_M`` (name, input channels / width)."""
    inner = [(f'b{b}.c{j}', j + 1) for b in (1, 2, 3) for j in (1, 2, 3)]
    return inner + [(f'c{j}', j + 1) for j in (1, 2, 3)]


def _carn_layout(h: dict) -> tuple[Layout, frozenset]:
    nf, groups, scale = h['nf'], h['groups'], h['scale']
    layout: Layout = {}
    optional = set()
    _mean_shift(layout, 'sub_mean')
    _mean_shift(layout, 'add_mean')
    _conv(layout, 'entry', nf, 3, 3)
    for b in (1, 2, 3):
        _conv(layout, f'b{b}.b1.body.0', nf, nf // groups, 3)
        _conv(layout, f'b{b}.b1.body.2', nf, nf // groups, 3)
        _conv(layout, f'b{b}.b1.body.4', nf, nf, 1)
    for name, factor in _carn_fusions():
        _conv(layout, f'{name}.0', nf, factor * nf, 1, bias=False)
        if h['batch_norm']:
            for stat in ('weight', 'bias', 'running_mean', 'running_var'):
                layout[f'{name}.1.{stat}'] = (nf, )
            layout[f'{name}.1.num_batches_tracked'] = ()
            optional.add(f'{name}.1.num_batches_tracked')
    factors = [3] if scale == 3 else [2] * (scale.bit_length() - 1)
    for i, factor in enumerate(factors):
        _conv(layout, f'upsample.up.body.{3 * i}', factor * factor * nf, nf // groups, 3)
    _conv(layout, 'exit', 3, nf, 3)
    return layout, frozenset(optional)


def _carn_convert(read: _Reader, h: dict, where: str) -> tuple[dict, State]:
    out: State = {}
    mu = _input_offset(read('sub_mean.weight'), read('sub_mean.bias'), f'{where}sub_mean.weight', 1.0)
    out['entry.weight'] = _fold_input(read('entry.weight'), read('sub_mean.weight'))
    out['entry.bias'] = read('entry.bias')
    for b in (1, 2, 3):
        for i in (0, 2, 4):
            for p in ('weight', 'bias'):
                out[f'b{b}.b1.body.{i}.{p}'] = read(f'b{b}.b1.body.{i}.{p}')
    for name, _ in _carn_fusions():
        weight = read(f'{name}.0.weight')
        if h['batch_norm']:  # conv (no bias) -> BN (running statistics) -> ReLU  ==  conv with bias -> ReLU
            scale = read(f'{name}.1.weight') / torch.sqrt(read(f'{name}.1.running_var') + BN_EPS)
            out[f'{name}.body.0.weight'] = weight * scale.view(-1, 1, 1, 1)
            out[f'{name}.body.0.bias'] = read(f'{name}.1.bias') - read(f'{name}.1.running_mean') * scale
            read.skip(f'{name}.1.num_batches_tracked')
        else:
            out[f'{name}.body.0.weight'] = weight
            out[f'{name}.body.0.bias'] = weight.new_zeros(weight.shape[0])
    for key in _carn_layout(h)[0]:
        if key.startswith('upsample.up.'):
            out['upsample.' + key[len('upsample.up.'):]] = read(key)
    weight, bias = _fold_output(read('exit.weight'), read('exit.bias'), read('add_mean.weight'), read('add_mean.bias'))
    out['exit.weight'], out['exit.bias'] = weight, bias - mu  # the plugin adds mu back after exit
    options = {'type': 'CARN', 'num_feat': h['nf'], 'groups': h['groups'], 'upscale': h['scale']}
    mean = _mean_option(mu)
    if mean is not None:
        options['rgb_mean'] = mean
    return options, out


def _srresnet_infer(state: State, where: str) -> dict:
    nf, channels = _shape(state, 'conv_first.weight', where, 4)[:2]
    blocks = len(_indices(state, r'recon_trunk\.(\d+)\.conv1\.weight'))
    first = _shape(state, 'upconv1.weight', where, 4)[0]
    if 'upconv2.weight' in state:
        scale = 4
    elif first in (4 * nf, 9 * nf):
        scale = 2 if first == 4 * nf else 3
    else:
        raise ValueError(f'{where}upconv1.weight has {first} output channels: expected 4 x {nf} (x2, x4) or '
                         f'9 x {nf} (x3)')
    return {'width': nf, 'nf': nf, 'blocks': blocks, 'channels': channels, 'scale': scale}


def _srresnet_layout(h: dict) -> tuple[Layout, frozenset]:
    nf, c, scale = h['nf'], h['channels'], h['scale']
    layout: Layout = {}
    _conv(layout, 'conv_first', nf, c, 3)
    for i in range(h['blocks']):
        _conv(layout, f'recon_trunk.{i}.conv1', nf, nf, 3)
        _conv(layout, f'recon_trunk.{i}.conv2', nf, nf, 3)
    _conv(layout, 'upconv1', (9 if scale == 3 else 4) * nf, nf, 3)
    if scale == 4:
        _conv(layout, 'upconv2', 4 * nf, nf, 3)
    _conv(layout, 'HRconv', nf, nf, 3)
    _conv(layout, 'conv_last', c, nf, 3)  # the bilinear skip needs as many output channels as input ones
    return layout, frozenset()


def _srresnet_convert(read: _Reader, h: dict, where: str) -> tuple[dict, State]:
    renames = (('recon_trunk.', 'body.'), ('HRconv.', 'conv_hr.'))
    out: State = {}
    for key in _srresnet_layout(h)[0]:
        new = key
        for old, replacement in renames:
            new = replacement + new[len(old):] if new.startswith(old) else new
        out[new] = read(key)
    options = {
        'type': 'MSRResNet', 'num_in_ch': h['channels'], 'num_out_ch': h['channels'], 'num_feat': h['nf'],
        'num_block': h['blocks'], 'upscale': h['scale']
    }
    return options, out


def _rcan_infer(state: State, where: str) -> dict:
    nf = _shape(state, 'head.0.weight', where, 4)[0]
    groups = len(_indices(state, r'body\.(\d+)\.body\.0\.body\.0\.weight'))
    blocks = len(_indices(state, r'body\.0\.body\.(\d+)\.body\.0\.weight'))
    squeezed = _shape(state, 'body.0.body.0.body.3.conv_du.0.weight', where, 4)[0]
    if 16 * squeezed <= nf < 16 * (squeezed + 1):
        reduction = 16  # the official value
    elif 0 < squeezed <= nf and nf // (nf // squeezed) == squeezed:
        reduction = nf // squeezed
    else:
        raise ValueError(f'{where}body.0.body.0.body.3.conv_du.0.weight squeezes {nf} channels to {squeezed}: no '
                         'integer reduction gives that')
    scale = _upsampler_scale(state, 'tail.0', nf, where)
    return {
        'width': nf, 'nf': nf, 'groups': groups, 'blocks': blocks, 'squeezed': squeezed, 'reduction': reduction,
        'scale': scale
    }


def _rcan_names(h: dict) -> list[tuple[str, str]]:
    """(official, plugin) module names of every conv of ``RCAN`` but the first and the last."""
    names = []
    for g in range(h['groups']):
        for b in range(h['blocks']):
            official, plugin = f'body.{g}.body.{b}.body', f'body.{g}.residual_group.{b}.rcab'
            names += [(f'{official}.0', f'{plugin}.0'), (f'{official}.2', f'{plugin}.2'),
                      (f'{official}.3.conv_du.0', f'{plugin}.3.attention.1'),
                      (f'{official}.3.conv_du.2', f'{plugin}.3.attention.3')]
        names.append((f'body.{g}.body.{h["blocks"]}', f'body.{g}.conv'))
    names.append((f'body.{h["groups"]}', 'conv_after_body'))
    factors = [3] if h['scale'] == 3 else [2] * (h['scale'].bit_length() - 1)
    names += [(f'tail.0.{2 * i}', f'upsample.{2 * i}') for i in range(len(factors))]
    return names


def _rcan_layout(h: dict) -> tuple[Layout, frozenset]:
    nf, squeezed = h['nf'], h['squeezed']
    layout: Layout = {}
    _mean_shift(layout, 'sub_mean')
    _mean_shift(layout, 'add_mean')
    _conv(layout, 'head.0', nf, 3, 3)
    for official, _ in _rcan_names(h):
        if official.endswith('conv_du.0'):
            _conv(layout, official, squeezed, nf, 1)
        elif official.endswith('conv_du.2'):
            _conv(layout, official, nf, squeezed, 1)
        elif official.startswith('tail.'):
            _conv(layout, official, (9 if h['scale'] == 3 else 4) * nf, nf, 3)
        else:
            _conv(layout, official, nf, nf, 3)
    _conv(layout, 'tail.1', 3, nf, 3)
    return layout, frozenset()


def _rcan_convert(read: _Reader, h: dict, where: str) -> tuple[dict, State]:
    out: State = {}
    mu = _input_offset(read('sub_mean.weight'), read('sub_mean.bias'), f'{where}sub_mean.weight', 255.0)
    out['conv_first.weight'] = _fold_input(read('head.0.weight'), read('sub_mean.weight'))
    out['conv_first.bias'] = read('head.0.bias')
    for official, plugin in _rcan_names(h):
        out[f'{plugin}.weight'], out[f'{plugin}.bias'] = read(f'{official}.weight'), read(f'{official}.bias')
    weight, bias = _fold_output(
        read('tail.1.weight'), read('tail.1.bias'), read('add_mean.weight'), read('add_mean.bias'))
    out['conv_last.weight'], out['conv_last.bias'] = weight, bias - 255.0 * mu  # BasicSR: /255 + mu after it
    options = {
        'type': 'RCAN', 'num_in_ch': 3, 'num_out_ch': 3, 'num_feat': h['nf'], 'num_group': h['groups'],
        'num_block': h['blocks'], 'squeeze_factor': h['reduction'], 'upscale': h['scale'], 'res_scale': 1,
        'img_range': 255.0
    }
    mean = _mean_option(mu)
    if mean is not None:
        options['rgb_mean'] = mean
    return options, out


VARIANTS = {
    'fsrcnn': _Variant('fsrcnn', 'FSRCNN_net', 'head_conv.0.weight', _fsrcnn_infer, _fsrcnn_layout, _fsrcnn_convert),
    'carn': _Variant('carn', 'CARN_M', 'entry.weight', _carn_infer, _carn_layout, _carn_convert),
    'srresnet': _Variant('srresnet', 'MSRResNet', 'recon_trunk.0.conv1.weight', _srresnet_infer, _srresnet_layout,
                         _srresnet_convert),
    'rcan': _Variant('rcan', 'RCAN', 'head.0.weight', _rcan_infer, _rcan_layout, _rcan_convert),
}

# ----------------------------------------------------------------------------- the classifier


def _classifier(state: State) -> tuple[dict, State]:
    where = 'classifier.'
    convs = _indices(state, r'CondNet\.(\d+)\.weight')
    if not convs:
        raise ValueError('classifier.CondNet.0.weight is missing: no classifier conv layers')
    num_conv = len(convs)
    if not 3 <= num_conv <= 6:
        raise ValueError(f'classifier.CondNet has {num_conv} conv layers; the plugin\'s PatchClassifier has 3 to 6 '
                         '(the official Classifier has 5)')
    num_feat, channels, kernel = _shape(state, 'CondNet.0.weight', where, 4)[:3]
    out_feat = _shape(state, f'CondNet.{2 * (num_conv - 1)}.weight', where, 4)[0]
    classes = _shape(state, 'lastOut.weight', where, 2)[0]
    layout: Layout = {}
    _conv(layout, 'CondNet.0', num_feat, channels, kernel)
    for i in range(1, num_conv - 1):
        _conv(layout, f'CondNet.{2 * i}', num_feat, num_feat, 1)
    _conv(layout, f'CondNet.{2 * (num_conv - 1)}', out_feat, num_feat, 1)
    layout['lastOut.weight'] = (classes, out_feat)
    layout['lastOut.bias'] = (classes, )
    check_layout(state, layout, where)
    options = {'type': 'PatchClassifier', 'num_classes': classes, 'num_conv': num_conv}
    extra = {
        'num_in_ch': (channels, 3), 'num_feat': (num_feat, 128), 'out_feat': (out_feat, 32), 'first_kernel': (kernel, 4)
    }
    options.update({key: found for key, (found, default) in extra.items() if found != default})
    return options, {key: state[key].detach().to(torch.float64) for key in layout}


# ----------------------------------------------------------------------------- the whole checkpoint


def _split(state: State) -> tuple[State, dict[int, State]]:
    """``classifier.*`` and ``net<k>.*`` (``module.`` prefixes dropped), or a ``ValueError`` naming a stray key."""
    state = {key[len('module.'):] if key.startswith('module.') else key: value for key, value in state.items()}
    classifier, branches, stray = {}, {}, []
    for key, value in state.items():
        match = re.fullmatch(r'net(\d+)\.(.+)', key)
        if key.startswith('classifier.'):
            classifier[key[len('classifier.'):]] = value
        elif match:
            branches.setdefault(int(match.group(1)), {})[match.group(2)] = value
        else:
            stray.append(key)
    if not classifier and not branches:
        raise ValueError(f'no classifier.* or net<k>.* keys (first keys: {sorted(state)[:4]}): not a ClassSR / CDNSR '
                         'container checkpoint; single-branch checkpoints such as CARN_branch1.pth are not converted')
    if stray:
        raise ValueError(f'unexpected key {stray[0]!r}' + (f' (and {len(stray) - 1} more)' if len(stray) > 1 else '') +
                         ': an official ClassSR / CDNSR checkpoint holds only classifier.* and net1.* ... netM.*')
    if not classifier:
        raise ValueError('no classifier.* keys: the checkpoint holds branches only')
    if not branches:
        raise ValueError('no net<k>.* keys: the checkpoint holds a classifier only')
    numbers = sorted(branches)
    if numbers != list(range(1, len(numbers) + 1)):
        raise ValueError(f'branch keys net{", net".join(map(str, numbers))}: expected net1 ... net{len(numbers)} '
                         'without gaps')
    return classifier, branches


def _non_finite(state: State, prefix: str) -> Optional[str]:
    """The first tensor of ``state`` with a NaN or an inf, described (``prefix`` + key, how many), or ``None``."""
    for key, tensor in state.items():
        if tensor.is_floating_point() or tensor.is_complex():
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                return f'{prefix}{key} ({bad} of {tensor.numel()} values)'
    return None


def check_finite(classifier: State, branches: dict[int, State]) -> None:
    """Every floating tensor of the official parts is finite; otherwise a ``ValueError`` naming each bad part
    (official name, the plugin part it becomes) and its first bad key."""
    parts = [('classifier', 'classifier', classifier)]
    parts += [(f'net{k}', f'branch{k - 1}', state) for k, state in sorted(branches.items())]
    bad = [(name, plugin, found) for name, plugin, state in parts for found in [_non_finite(state, f'{name}.')]
           if found]
    if bad:
        raise ValueError('non-finite weights (NaN or inf) in ' +
                         '; '.join(f'{name}' + (f' (becomes {plugin})' if plugin != name else '') + f': {found}'
                                   for name, plugin, found in bad) +
                         ': the checkpoint is damaged or the training that wrote it diverged; '
                         'nothing was converted (use another checkpoint)')


def detect_arch(branch: State) -> Optional[str]:
    """The variant whose signature key ``branch`` (one ``net<k>``, prefix removed) holds, else ``None``."""
    found = [name for name, variant in VARIANTS.items() if variant.signature in branch]
    return found[0] if len(found) == 1 else None


def convert_state_dict(state: Mapping[str, torch.Tensor], arch: Optional[str] = None) -> Converted:
    """Map an official ClassSR / CDNSR state dict onto ``CDNSRNet`` (see the module docstring).

    Args:
        state: the official state dict (``load_official``).
        arch: ``fsrcnn``, ``carn``, ``srresnet`` or ``rcan``; ``None`` to detect it from net1's keys.

    Raises:
        ValueError: the layout is unknown or does not match; the message names the key, and the expected and
            found shapes, or the mismatch (branch order, number of classes, scales).
    """
    if arch is not None and arch not in VARIANTS:
        raise ValueError(f'arch must be one of {", ".join(ARCHS)}, got {arch!r}')
    classifier_state, branch_states = _split(as_state_dict(state))
    check_finite(classifier_state, branch_states)
    detected = detect_arch(branch_states.get(1, {}))
    if arch is None:
        if detected is None:
            raise ValueError(f'unknown branch layout: net1 has none of the keys '
                             f'{", ".join(v.signature for v in VARIANTS.values())} '
                             f'(first keys: {sorted(branch_states.get(1, {}))[:4]}); pass --arch if it is one of '
                             f'{", ".join(ARCHS)}')
        arch = detected
    elif detected is not None and detected != arch:
        raise ValueError(f'arch {arch!r} was given but net1 has the keys of {VARIANTS[detected].official} '
                         f'({detected}: net1.{VARIANTS[detected].signature})')
    variant = VARIANTS[arch]
    classifier_opt, classifier_out = _classifier(classifier_state)
    if classifier_opt['num_classes'] != len(branch_states):
        raise ValueError(f'classifier.lastOut.weight gives {classifier_opt["num_classes"]} classes but the checkpoint '
                         f'has {len(branch_states)} branches (net1 ... net{len(branch_states)})')
    hypers = {}
    for k, branch in branch_states.items():
        where = f'net{k}.'
        hypers[k] = variant.infer(branch, where)
        expected, optional = variant.layout(hypers[k])
        check_layout(branch, expected, where, optional)
    widths = [hypers[k]['width'] for k in sorted(hypers)]
    for k in range(1, len(widths)):
        if widths[k] <= widths[k - 1]:
            raise ValueError(f'branch order: net{k} has width {widths[k - 1]} and net{k + 1} width {widths[k]}; '
                             f'net1 is the simple (smallest) branch and becomes branches[0], so the widths must '
                             f'increase net1 < net2 < ... (found ' + ', '.join(f'net{i + 1}={w}'
                                                                               for i, w in enumerate(widths)) + ')')
    scales = {k: h['scale'] for k, h in hypers.items()}
    if len(set(scales.values())) != 1:
        raise ValueError('branches upscale by different factors: ' + ', '.join(f'net{k} x{s}'
                                                                               for k, s in scales.items()))
    out: State = {f'classifier.{key}': value for key, value in classifier_out.items()}
    branch_opts = []
    for k, branch in branch_states.items():
        read = _Reader(branch)
        options, tensors = variant.convert(read, hypers[k], f'net{k}.')
        unused = sorted(set(branch) - read.used)
        if unused:  # every key of the layout is mapped; this would be a bug of the mapping
            raise ValueError(f'net{k}.{unused[0]} was not used by the {arch} mapping')
        branch_opts.append(options)
        out.update({f'branches.{k - 1}.{key}': value for key, value in tensors.items()})
    scale = next(iter(scales.values()))
    network = {
        'type': 'CDNSRNet', 'routing': 'hard', 'scale': scale, 'classifier': classifier_opt, 'branches': branch_opts
    }
    state_dict = _fit(network, out)
    return Converted(arch, network, state_dict, widths, scale, _notes(arch, hypers, branch_opts))


def _fit(network: dict, tensors: State) -> State:
    """``tensors`` in the plugin network's dtypes, checked to fill ``build_network(network)`` exactly."""
    try:
        own = build_network(dict(network)).state_dict()
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f'the converted options do not build ({_one_line(exc)}): {network}') from exc
    missing = sorted(set(own) - set(tensors))
    extra = sorted(set(tensors) - set(own))
    wrong = [(k, tuple(own[k].shape), tuple(tensors[k].shape)) for k in own
             if k in tensors and own[k].shape != tensors[k].shape]
    if missing or extra or wrong:
        raise ValueError(f'the mapping does not fill the plugin network: missing {missing[:4]}, extra {extra[:4]}, '
                         f'wrong shapes (key, plugin, mapped) {wrong[:4]}')
    result = {key: tensors[key].to(own[key].dtype).contiguous() for key in own}
    found = _non_finite(result, '')
    if found:  # the file is finite (check_finite): a fold overflowed
        part = re.match(r'branches\.(\d+)\.', found)
        where = f'branch{part.group(1)} (from net{int(part.group(1)) + 1})' if part else 'the classifier'
        raise ValueError(f'the conversion gives non-finite values (NaN or inf) in {where}: {found}, although the '
                         'checkpoint is finite: a folded BatchNorm or mean shift overflows (e.g. a running_var at or '
                         'below -1e-5, or values beyond float32); nothing was converted')
    return result


def _notes(arch: str, hypers: dict[int, dict], branch_opts: list[dict]) -> list[str]:
    notes = []
    if arch == 'fsrcnn':
        notes.append('FSRCNN: x4 (the official deconvolution padding 3 / output padding 1 is exact only at x4)')
    if arch == 'carn':
        if hypers[1]['batch_norm']:
            notes.append('CARN (ClassSR layout): each cascade fusion\'s BatchNorm folded into its 1x1 conv (running '
                         'statistics: the official network in eval mode)')
        else:
            notes.append('CARN (CDNSR layout, no BatchNorm): the bias-free fusion convs get a zero bias')
    if arch in ('carn', 'rcan'):
        first, last = ('entry', 'exit') if arch == 'carn' else ('conv_first', 'conv_last')
        notes.append(f'sub_mean / add_mean folded into {first} / {last}; input offset per branch: ' +
                     ', '.join(f'net{i + 1} ' + (str([round(v, 6)
                                                      for v in o['rgb_mean']]) if 'rgb_mean' in o else 'DIV2K default')
                               for i, o in enumerate(branch_opts)))
    if arch == 'rcan':
        notes.append('RCAN: the converted network takes [0, 1] input and gives official(255 x) / 255 '
                     '(img_range 255); the classifier is unchanged (the official one divided by 255 first)')
    return notes


def convert_checkpoint(path: str | Path, arch: Optional[str] = None) -> Converted:
    """``convert_state_dict(load_official(path), arch)``."""
    return convert_state_dict(load_official(path), arch)


def option_document(converted: Converted, name: str) -> dict:
    """An option file in the shape of ``options/networks/*.yml``: ``name``, ``scale``, ``num_gpu``, ``network_g``."""
    return {'name': name, 'scale': converted.scale, 'num_gpu': 'auto', 'network_g': converted.network}
