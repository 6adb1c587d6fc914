"""Channel pruning: a narrower branch cut out of a trained wider one (CDNSR Sec. III-A).

CDNSR builds its smaller SR-Nets "by slimming the base SR-Net ... borrowing the idea of channel pruning"
(its ref. [28], Li et al., *Pruning Filters for Efficient ConvNets*, ICLR 2017): in each prunable layer the
filters with the largest L1 norms are kept, and the matching input channels of the layers that read them.

A network's channels fall into *groups* that must be pruned together: the output channels of a layer and
the input channels of every layer that reads them, and, across an identity skip or a shared block, every
layer on the same trunk. Each group's importance is the sum of the L1 norms of the filters that produce
it (Li et al.'s criterion, summed over a trunk's producers); the ``width`` most important channels are
kept, in their original order. Layouts per architecture (``_LAYOUTS``) say which parameter dimension reads
which group:

* ``FSRCNN`` (``d``): the 5x5 feature extraction (and the 1x1 shrink's inputs) and the 1x1 expansion (and
  the deconvolution's inputs); the shrunk mapping layers (``s``) are not pruned, as in ClassSR.
* ``MSRResNet`` and BasicSR's ``EDSR`` (``num_feat``): the trunk (first conv, every block's second conv,
  all coupled by the identity skips), each block's inner channels, and the upsampling convs (pixel-shuffle
  groups of ``r * r`` channels are kept or dropped together).
* ``CARN`` (``num_feat``, CARN-M): the trunk (entry conv, every cascade fusion, every efficient residual
  block's output; the shared block and the concatenations couple them), each shared block's two grouped
  convs, and the grouped upsampler. Grouped convolutions keep ``width / groups`` channels of every group, so
  the pruned network keeps CARN-M's grouping.
* ``RCAN`` is not pruned: each of its 200 channel-attention blocks squeezes ``num_feat`` to
  ``num_feat // 16`` channels, so the ClassSR widths 36 / 50 / 64 give 2 / 3 / 4 squeezed channels, a
  squeeze that is not a subset of the wider one's (and ``img_range`` scaling makes L1 norms of the first
  and last layers incomparable). Train RCAN branches from their own initialisation, or prune by hand.

Pruning to the network's own width keeps every channel in order, so it reproduces the network exactly.

Examples:
    >>> small = prune({'type': 'FSRCNN', 'd': 56}, trained_fsrcnn56, 16)   # doctest: +SKIP
"""
from __future__ import annotations

import re
from copy import deepcopy
from dataclasses import dataclass
from typing import Callable, Mapping, Optional

import torch
from torch import nn

Segment = tuple[str, int]  # (group, expansion): channel c of the group stands for indices c*r .. c*r+r-1


@dataclass(frozen=True)
class Read:
    """How one dimension of one parameter reads groups: the concatenation of ``segments``. ``produces``
    marks a convolution's output dimension: its filters' L1 norms score the group."""

    dim: int
    segments: tuple[Segment, ...]
    produces: bool = False


@dataclass
class Layout:
    """Which dimension of which parameter reads which group; the grouped convolutions (name -> groups);
    ``balance``: channels are kept in equal numbers from that many equal blocks of every group."""

    reads: dict[str, tuple[Read, ...]]
    grouped: dict[str, int]
    balance: int = 1

    def conv(self, name: str, out: tuple[Segment, ...], read: Optional[tuple[Segment, ...]], groups: int = 1) -> None:
        """A convolution ``name`` that produces ``out`` and reads ``read`` (``None``: an input never pruned)."""
        self.reads[f'{name}.weight'] = (Read(0, out, produces=True), ) + ((Read(1, read), ) if read else ())
        self.reads[f'{name}.bias'] = (Read(0, out), )
        if groups > 1:
            self.grouped[f'{name}.weight'] = groups

    def upsampling(self,
                   convs: list[str],
                   source: tuple[Segment, ...],
                   scale: int,
                   groups: int = 1) -> tuple[Segment, ...]:
        """Pixel-shuffle stages: each conv's outputs come in runs of ``r * r``; returns the last stage's group."""
        factor = 3 if scale == 3 else 2
        for index, name in enumerate(convs):
            self.conv(name, ((f'up{index}', factor * factor), ), source, groups)
            source = ((f'up{index}', 1), )
        return source


WIDTH_KEYS = {'FSRCNN': 'd', 'MSRResNet': 'num_feat', 'EDSR': 'num_feat', 'CARN': 'num_feat'}
DEFAULT_WIDTHS = {'FSRCNN': 56, 'MSRResNet': 64, 'EDSR': 64, 'CARN': 64}
TRUNK: tuple[Segment, ...] = (('trunk', 1), )


def _numbers(pattern: str, names: list[str]) -> list[int]:
    return sorted({int(match[1]) for match in map(re.compile(pattern).fullmatch, names) if match})


def _fsrcnn(opt: Mapping, names: list[str]) -> Layout:
    layout = Layout({}, {})
    expand = 2 + int(opt.get('m', 4))  # body_conv: shrink, m mapping convs, PReLU, expansion
    layout.conv('head_conv.0', (('head', 1), ), None)
    layout.reads['body_conv.0.0.weight'] = (Read(1, (('head', 1), )), )
    layout.conv(f'body_conv.{expand}.0', (('expand', 1), ), None)
    layout.reads['tail_conv.weight'] = (Read(0, (('expand', 1), )), )  # transposed: dim 0 is its input
    return layout


def _resnet(opt: Mapping, names: list[str]) -> Layout:
    """MSRResNet and EDSR: trunk, per-block inner channels, pixel-shuffle upsampling."""
    layout = Layout({}, {})
    layout.conv('conv_first', TRUNK, None)
    for block in _numbers(r'body\.(\d+)\.conv1\.weight', names):
        layout.conv(f'body.{block}.conv1', ((f'block{block}', 1), ), TRUNK)
        layout.conv(f'body.{block}.conv2', TRUNK, ((f'block{block}', 1), ))
    if 'conv_after_body.weight' in names:  # EDSR
        layout.conv('conv_after_body', TRUNK, TRUNK)
    ups = [name[:-len('.weight')] for name in names if re.fullmatch(r'(upconv\d|upsample\.\d+)\.weight', name)]
    source = layout.upsampling(ups, TRUNK, int(opt.get('upscale', 4)))
    if 'conv_hr.weight' in names:  # MSRResNet
        layout.conv('conv_hr', (('hr', 1), ), source)
        source = (('hr', 1), )
    layout.reads['conv_last.weight'] = (Read(1, source), )
    return layout


def _carn(opt: Mapping, names: list[str]) -> Layout:
    """CARN-M: one trunk group (identity skips, shared blocks and concatenations tie it), grouped convs that
    keep ``width / groups`` channels of every group."""
    groups = int(opt.get('groups', 4))
    layout = Layout({}, {}, balance=groups)
    layout.conv('entry', TRUNK, None)
    for prefix in ('b1.', 'b2.', 'b3.', ''):  # the three cascading blocks' fusions, then the global ones
        for k in (1, 2, 3):  # the k-th fusion reads k + 1 trunk-wide pieces
            layout.conv(f'{prefix}c{k}.body.0', TRUNK, TRUNK * (k + 1))
    for block in ('b1', 'b2', 'b3'):  # each cascade's shared efficient residual block
        first, second = ((f'{block}.first', 1), ), ((f'{block}.second', 1), )
        layout.conv(f'{block}.b1.body.0', first, TRUNK, groups)
        layout.conv(f'{block}.b1.body.2', second, first, groups)
        layout.conv(f'{block}.b1.body.4', TRUNK, second)
    ups = [f'upsample.body.{n}' for n in _numbers(r'upsample\.body\.(\d+)\.weight', names)]
    source = layout.upsampling(ups, TRUNK, int(opt.get('upscale', 4)), groups)
    layout.reads['exit.weight'] = (Read(1, source), )
    return layout


_LAYOUTS: dict[str, Callable[[Mapping, list[str]],
                             Layout]] = {'FSRCNN': _fsrcnn, 'MSRResNet': _resnet, 'EDSR': _resnet, 'CARN': _carn}


def _dense(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """A grouped conv weight ``(out, in / g, k, k)`` as the block-diagonal dense ``(out, in, k, k)``."""
    if groups == 1:
        return weight
    out, per_group = weight.shape[:2]
    dense = weight.new_zeros(out, per_group * groups, *weight.shape[2:])
    block = out // groups
    for g in range(groups):
        dense[g * block:(g + 1) * block, g * per_group:(g + 1) * per_group] = weight[g * block:(g + 1) * block]
    return dense


def _grouped(dense: torch.Tensor, groups: int) -> torch.Tensor:
    """The inverse of ``_dense``: the diagonal blocks, stacked."""
    if groups == 1:
        return dense
    out, width = dense.shape[:2]
    block, per_group = out // groups, width // groups
    return torch.cat([dense[g * block:(g + 1) * block, g * per_group:(g + 1) * per_group] for g in range(groups)])


def _importance(state: Mapping[str, torch.Tensor], layout: Layout) -> dict[str, torch.Tensor]:
    """Per group, the summed L1 norm of the filters that produce each channel (Li et al.'s criterion)."""
    scores: dict[str, torch.Tensor] = {}
    for name, reads in layout.reads.items():
        for read in (read for read in reads if read.produces):
            (group, expand), = read.segments
            norms = _dense(state[name], layout.grouped.get(name, 1)).abs().flatten(1).sum(1)
            scores[group] = scores.get(group, 0) + norms.view(-1, expand).sum(1)
    return scores


def _keep(scores: torch.Tensor, width: int, balance: int) -> torch.Tensor:
    """The ``width`` highest-scoring channels, ``width / balance`` from each of ``balance`` equal blocks, in
    their original order (equal scores: the lower index first)."""
    blocks = scores.reshape(balance, -1)
    order = torch.sort(-blocks, dim=1, stable=True).indices[:, :width // balance]
    return (order + torch.arange(balance)[:, None] * blocks.shape[1]).flatten().sort().values


def _indices(segments: tuple[Segment, ...], kept: Mapping[str, torch.Tensor], sizes: Mapping[str, int]) -> torch.Tensor:
    """Indices along a dimension that reads ``segments``: each segment's kept channels, expanded, offset."""
    parts, offset = [], 0
    for group, expand in segments:
        parts.append(offset + (kept[group][:, None] * expand + torch.arange(expand)).flatten())
        offset += sizes[group] * expand
    return torch.cat(parts)


def kept_channels(opt: Mapping, net: nn.Module, width: int) -> dict[str, torch.Tensor]:
    """The channels ``prune`` keeps, per group, in their original order."""
    state = net.state_dict()
    layout = _layout(opt, list(state))
    return {group: _keep(score, width, layout.balance) for group, score in _importance(state, layout).items()}


def _layout(opt: Mapping, names: list[str]) -> Layout:
    arch = opt.get('type')
    if arch not in _LAYOUTS:
        raise ValueError(f'cannot prune {arch!r}: layouts exist for {sorted(_LAYOUTS)} (see cdnsr_plugin/archs/'
                         'pruning.py for why RCAN is not pruned); train that branch from its own initialisation')
    layout = _LAYOUTS[arch](opt, names)
    missing = sorted(set(layout.reads) - set(names))
    if missing:
        raise ValueError(f'the network is not the {arch} of these options: it has no parameters {missing[:3]}')
    return layout


def prunable(arch: str) -> bool:
    """Whether ``prune`` knows the layout of ``arch`` (a registered arch name)."""
    return arch in _LAYOUTS


def prune(opt: Mapping, net: nn.Module, width: int) -> tuple[dict, nn.Module]:
    """The network of ``opt`` at ``width`` channels, made of the ``width`` most important channels of ``net``.

    Args:
        opt: ``net``'s options (``{type: FSRCNN, d: 56, ...}``); the width key is ``WIDTH_KEYS[type]``.
        net: the trained network built from ``opt``.
        width: the new width: at most the old one (and a multiple of ``groups`` for CARN).

    Returns:
        The options of the pruned network and the network (a new module; ``net`` is not changed).

    Raises:
        ValueError: an arch without a pruning layout, a width out of range, or ``net`` not built from ``opt``.
    """
    from basicsr.archs import build_network
    state = net.state_dict()
    layout = _layout(opt, list(state))
    key = WIDTH_KEYS[opt['type']]
    old = int(opt.get(key, DEFAULT_WIDTHS[opt['type']]))
    if not 0 < width <= old or width % layout.balance:
        raise ValueError(f'{opt["type"]}.{key}: cannot prune {old} channels to {width}; choose 1..{old}' +
                         (f', a multiple of groups ({layout.balance})' if layout.balance > 1 else ''))
    new_opt = {**deepcopy(dict(opt)), key: width}
    small = build_network(deepcopy(new_opt))
    scores = _importance(state, layout)
    kept = {group: _keep(score, width, layout.balance) for group, score in scores.items()}
    sizes = {group: len(score) for group, score in scores.items()}
    target = small.state_dict()
    pruned = {}
    for name, value in state.items():
        groups = layout.grouped.get(name, 1)
        value = _dense(value, groups)
        for read in layout.reads.get(name, ()):
            value = value.index_select(read.dim, _indices(read.segments, kept, sizes))
        pruned[name] = _grouped(value, groups).clone()
        if pruned[name].shape != target[name].shape:
            raise ValueError(f'pruning {name} gave {tuple(pruned[name].shape)}; the {opt["type"]} with {key}={width} '
                             f'has {tuple(target[name].shape)}')
    small.load_state_dict(pruned)
    return new_opt, small
