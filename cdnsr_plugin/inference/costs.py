"""FLOPs accounting with ptflops, in two labelled conventions.

* ``macs``: multiply-accumulates as ptflops counts them (pytorch backend, functional counting off
  so module activations are not counted twice): convolution and linear weights, their biases,
  activations, pooling, normalisation. A transposed convolution is counted on its INPUT grid,
  which is what the hardware does. CDNSR reports its classifier in this convention (Table III:
  1.739M / 2.804M / 3.869M for 3 / 4 / 5 conv layers).
* ``paper``: 2 x the multiply-accumulates of convolution and linear weights only (no bias, no
  activations), with a transposed convolution counted on its OUTPUT grid. This is the convention
  behind ClassSR's published per-patch costs (FSRCNN 141M/304M/468M, CARN 0.38G/0.77G/1.15G,
  SRResNet 1.66G/3.44G/5.20G, RCAN 10.33G/19.90G/32.60G, classifier ~7.6M at 32x32, x4).

Why they differ so much for FSRCNN: its 9x9 stride-4 deconvolution touches each of its input
positions with all 81 taps, so per input pixel it does ``81 * d * 3`` MACs. Counting those taps
for every OUTPUT pixel instead (16x as many positions at x4) is what the paper convention does and
over-counts the deconvolution by ``scale**2``: FSRCNN-56 costs ~25M MACs, not 234M (468M / 2).
For networks without transposed convolutions the two conventions differ only by the factor 2
and the small bias/activation terms.

Modules whose type subclasses ``nn.Conv2d``/``nn.ConvTranspose2d``/``nn.Linear`` are hooked too
(ptflops would silently count them as zero). ptflops switches the model to ``eval()``; the
functions here restore every module's training flag afterwards.
"""
from __future__ import annotations

import io
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import numpy as np
import torch
from ptflops import get_model_complexity_info
from ptflops.pytorch_ops import MODULES_MAPPING
from torch import nn

CONVENTIONS = ('paper', 'macs')
_WEIGHTED = (nn.ConvTranspose2d, nn.Conv2d, nn.Linear)  # ConvTranspose2d first: order matters below


def _conv_weight_macs(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
    """Weight MACs on the OUTPUT grid, for convolutions and transposed convolutions alike."""
    taps = int(np.prod(module.kernel_size)) * (module.in_channels // module.groups)
    module.__flops__ += taps * output.numel()


def _linear_weight_macs(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
    module.__flops__ += module.in_features * output.numel()


def _subclass_hooks(net: nn.Module, hooks: dict[type, Callable]) -> dict[type, Callable]:
    """Map every module type in ``net`` that subclasses a weighted layer to that layer's hook."""
    found = dict(hooks)
    for module in net.modules():
        kind = type(module)
        if kind in found or kind in MODULES_MAPPING:
            continue
        for base in _WEIGHTED:
            if isinstance(module, base) and base in found:
                found[kind] = found[base]
                break
    return found


def _run_ptflops(net: nn.Module, shape: tuple[int, ...], hooks: dict[type, Callable], ignore: list[type]) -> int:
    modes = {module: module.training for module in net.modules()}
    try:
        macs, _ = get_model_complexity_info(
            net,
            shape,
            as_strings=False,
            print_per_layer_stat=False,
            ost=io.StringIO(),
            backend='pytorch',
            custom_modules_hooks=_subclass_hooks(net, hooks),
            ignore_modules=ignore,
            backend_specific_config={'count_functional': False})
    finally:
        for module, training in modes.items():
            module.training = training
    if macs is None:
        raise RuntimeError(f'ptflops could not count {type(net).__name__} on input {shape}')
    return int(round(macs))


def count_macs(net: nn.Module, shape: tuple[int, ...]) -> int:
    """MACs of one forward pass on a (C, H, W) input, ``macs`` convention."""
    base_hooks = {kind: MODULES_MAPPING[kind] for kind in _WEIGHTED}
    return _run_ptflops(net, shape, base_hooks, ignore=[])


def count_paper_flops(net: nn.Module, shape: tuple[int, ...]) -> int:
    """FLOPs of one forward pass on a (C, H, W) input, ``paper`` convention (see module docstring)."""
    hooks = {nn.Conv2d: _conv_weight_macs, nn.ConvTranspose2d: _conv_weight_macs, nn.Linear: _linear_weight_macs}
    ignore = [kind for kind in MODULES_MAPPING if kind not in hooks]
    return 2 * _run_ptflops(net, shape, hooks, ignore)


@dataclass(frozen=True)
class Cost:
    """Cost of one part (classifier or branch) on one LR patch."""

    name: str
    macs: int
    paper_flops: int
    params: int

    def value(self, convention: str) -> int:
        if convention not in CONVENTIONS:
            raise ValueError(f'convention must be one of {CONVENTIONS}, got {convention!r}')
        return self.macs if convention == 'macs' else self.paper_flops


def measure_cost(net: nn.Module, name: str, shape: tuple[int, ...]) -> Cost:
    """Both conventions and the parameter count of ``net`` on a (C, H, W) input."""
    params = sum(p.numel() for p in net.parameters())
    return Cost(name, count_macs(net, shape), count_paper_flops(net, shape), params)


@dataclass(frozen=True)
class CostTable:
    """Per-patch costs of a routed network: the classifier and each branch, at one LR patch size.

    ``routed(counts)`` gives the mean cost per patch of a class assignment, classifier included,
    which is how ClassSR and CDNSR report FLOPs (average over all 32x32 patches of a test set).
    """

    patch: int
    scale: int
    classifier: Optional[Cost]
    branches: tuple[Cost, ...]

    def largest(self, convention: str = 'paper') -> int:
        return max(branch.value(convention) for branch in self.branches)

    def percent_of_largest(self, index: int, convention: str = 'paper') -> float:
        return 100.0 * self.branches[index].value(convention) / self.largest(convention)

    def per_class(self, convention: str = 'paper') -> list[int]:
        """Cost of routing one patch to each class: classifier + branch."""
        extra = self.classifier.value(convention) if self.classifier else 0
        return [extra + branch.value(convention) for branch in self.branches]

    def routed(self, counts: list[int] | np.ndarray, convention: str = 'paper') -> float:
        """Mean cost per patch when ``counts[j]`` patches go to branch ``j``."""
        counts = np.asarray(counts, dtype=np.float64)
        if counts.shape != (len(self.branches), ) or counts.sum() <= 0:
            raise ValueError(f'counts must hold one non-negative count per branch ({len(self.branches)}), '
                             f'with a positive total; got {counts.tolist()}')
        return float(np.dot(counts, self.per_class(convention)) / counts.sum())

    def routed_percent(self, counts: list[int] | np.ndarray, convention: str = 'paper') -> float:
        """``routed(counts)`` in % of the largest branch on one patch: how ClassSR and CDNSR report FLOPs."""
        return 100.0 * self.routed(counts, convention) / self.largest(convention)

    def to_dict(self) -> dict:
        """JSON-ready: per branch its name, macs, paper_flops and percent of the largest branch."""
        branches = []
        for i, branch in enumerate(self.branches):
            row = asdict(branch)
            row['percent_of_largest'] = {c: round(self.percent_of_largest(i, c), 2) for c in CONVENTIONS}
            branches.append(row)
        return {
            'patch': self.patch, 'scale': self.scale, 'conventions': {
                'paper': '2 x weight MACs of conv/linear layers, transposed convs on the output grid (ClassSR)',
                'macs': 'ptflops MACs incl. bias and activations, transposed convs on the input grid (hardware)'
            }, 'classifier': asdict(self.classifier) if self.classifier else None, 'branches': branches
        }


def describe_branches(opts: list[dict]) -> list[str]:
    """Short names such as ``FSRCNN(d=16)``: the type plus the options that differ between branches."""
    keys = sorted({key for opt in opts for key in opt if key != 'type'})
    varying = [key for key in keys if len({repr(opt.get(key)) for opt in opts}) > 1]
    return [f"{opt['type']}({', '.join(f'{key}={opt.get(key)}' for key in varying)})" for opt in opts]


def cost_table(net: nn.Module, patch: int = 32, num_in_ch: int = 3) -> CostTable:
    """Cost table of a ``CDNSRNet`` (classifier + branches) or of a single SR network (one branch).

    Args:
        net: the network; a routed container is recognised by its ``branches`` and ``classifier``.
        patch: LR patch side.
        num_in_ch: input channels.
    """
    if patch < 1:
        raise ValueError(f'patch must be a positive LR patch size, got {patch}')
    shape = (num_in_ch, patch, patch)
    if hasattr(net, 'branches') and hasattr(net, 'classifier'):
        names = describe_branches(net.branch_opts)
        branches = tuple(measure_cost(branch, name, shape) for branch, name in zip(net.branches, names))
        classifier = measure_cost(net.classifier, net.classifier_opt.get('type', 'classifier'), shape)
        return CostTable(patch, net.scale, classifier, branches)
    with torch.no_grad():
        scale = net(torch.zeros(1, *shape)).shape[-1] // patch
    return CostTable(patch, scale, None, (measure_cost(net, type(net).__name__, shape), ))


def _human(value: float) -> str:
    for unit, size in (('G', 1e9), ('M', 1e6), ('K', 1e3)):
        if abs(value) >= size:
            return f'{value / size:.2f}{unit}'
    return f'{value:.0f}'


def format_table(table: CostTable) -> str:
    """Plain-text cost table, one row per part, both conventions labelled."""
    lines = [
        f'Per-patch cost at LR {table.patch}x{table.patch}, x{table.scale}',
        f"{'part':<34}{'params':>10}{'MACs':>11}{'paper FLOPs':>13}{'% largest (paper/MACs)':>26}"
    ]
    if table.classifier:
        c = table.classifier
        lines.append(f"{'classifier ' + c.name:<34}{_human(c.params):>10}{_human(c.macs):>11}"
                     f"{_human(c.paper_flops):>13}{'':>26}")
    for i, b in enumerate(table.branches):
        pct = f'{table.percent_of_largest(i, "paper"):.1f}% / {table.percent_of_largest(i, "macs"):.1f}%'
        lines.append(f"{f'branch {i} ' + b.name:<34}{_human(b.params):>10}{_human(b.macs):>11}"
                     f'{_human(b.paper_flops):>13}{pct:>26}')
    lines.append('paper = 2 x weight MACs, transposed convs on the output grid (ClassSR/CDNSR tables); '
                 'MACs = ptflops, transposed convs on the input grid (what the hardware runs).')
    return '\n'.join(lines)


def full_image_coefficients(net: nn.Module, probe: int = 32, num_in_ch: int = 3) -> dict[str, tuple[float, float]]:
    """``(a, b)`` per convention with cost = ``a * pixels + b`` for ``net`` on a whole image.

    A convolutional SR network does the same work per output pixel in every convolution; the few
    size-independent terms (e.g. RCAN's channel attention on pooled 1x1 maps) make ``b``. Both are measured
    with ptflops at ``probe`` and ``2 * probe``; compute them once per network, then call ``full_image_cost``.
    """
    small, large = probe * probe, 4 * probe * probe
    at_small = measure_cost(net, 'probe', (num_in_ch, probe, probe))
    at_large = measure_cost(net, 'probe', (num_in_ch, 2 * probe, 2 * probe))
    result = {}
    for convention in CONVENTIONS:
        a = (at_large.value(convention) - at_small.value(convention)) / (large - small)
        result[convention] = (a, at_small.value(convention) - a * small)
    return result


def full_image_cost(net_or_coefficients: nn.Module | dict,
                    height: int,
                    width: int,
                    probe: int = 32) -> dict[str, float]:
    """Cost of a network on a whole ``height x width`` image, both conventions, without running it on the image.

    Args:
        net_or_coefficients: the network, or its ``full_image_coefficients`` (faster for many images).

    Returns:
        ``{'paper': flops, 'macs': macs}`` for one forward pass on the whole image.
    """
    coefficients = (
        net_or_coefficients if isinstance(net_or_coefficients, dict) else full_image_coefficients(
            net_or_coefficients, probe))
    return {convention: a * height * width + b for convention, (a, b) in coefficients.items()}


def executed_cost(processed: np.ndarray | list[int], passes: np.ndarray | list[int], coefficients: list[dict],
                  tiles: int, classifier: Optional[Cost]) -> dict[str, float]:
    """What a routed run with tiling ``regions`` executed, both conventions: per branch ``a * pixels + b *
    passes`` (``full_image_coefficients`` of the branch; exact for convolutional networks, whose cost is linear
    in the pixels they process; ``b`` holds the size-independent terms, e.g. RCAN's channel attention, once per
    region) plus the classifier on every tile.

    Args:
        processed: LR pixels each branch processed, halos included (``Plan.processed``).
        passes: regions each branch ran (``Plan.passes``).
        coefficients: ``full_image_coefficients`` of each branch.
        tiles: tiles the classifier saw; ``classifier``: its per-tile cost (``CostTable.classifier``), or None.
    """
    result = {}
    for convention in CONVENTIONS:
        total = sum(c[convention][0] * pixels + c[convention][1] * count
                    for c, pixels, count in zip(coefficients, processed, passes))
        result[convention] = float(total + (tiles * classifier.value(convention) if classifier else 0))
    return result
