"""CDNSRNet: a patch classifier plus M SR branches of any registered architecture."""
from __future__ import annotations

from copy import deepcopy
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from basicsr.archs import build_network
from basicsr.utils.registry import ARCH_REGISTRY
from torch import nn

from cdnsr_plugin.registry import register

ROUTING_MODES = ('soft', 'gumbel', 'hard')
_PROBE_SIZE = 8  # LR side of the dummy input used to measure a branch's scale


def _arch_known(name: str) -> bool:
    return name in ARCH_REGISTRY or f'{name}_basicsr' in ARCH_REGISTRY


def build_part(opt: Any, key: str) -> nn.Module:
    """Build ``{type: ..., **kwargs}`` with basicsr's ``build_network``; errors name ``key``."""
    if not isinstance(opt, Mapping):
        raise ValueError(f"{key} must be a mapping such as {{type: FSRCNN, d: 16}}, got {type(opt).__name__}")
    if 'type' not in opt:
        raise ValueError(f"{key} has no 'type': name a registered arch, e.g. {key}: {{type: FSRCNN, d: 16}}")
    if not _arch_known(opt['type']):
        raise ValueError(f"{key}.type: no arch named {opt['type']!r} in basicsr's ARCH registry; "
                         f"known: {', '.join(sorted(ARCH_REGISTRY.keys()))}")
    try:
        return build_network(dict(opt))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{key}: cannot build {opt['type']} from {dict(opt)} ({exc})") from exc


def measure_scale(net: nn.Module, key: str, num_in_ch: int) -> int:
    """Upscaling factor of ``net``, measured by one forward pass on a small zero input."""
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            out = net(torch.zeros(1, num_in_ch, _PROBE_SIZE, _PROBE_SIZE))
    except Exception as exc:
        raise ValueError(f'{key}: a {_PROBE_SIZE}x{_PROBE_SIZE} test input failed ({exc}); '
                         'is num_in_ch right?') from exc
    finally:
        net.train(was_training)
    if not isinstance(out, torch.Tensor) or out.dim() != 4:
        raise ValueError(f'{key}: expected an SR network returning one NCHW tensor')
    height, width = out.shape[-2:]
    if height != width or height % _PROBE_SIZE:
        raise ValueError(f'{key}: output {tuple(out.shape)} is not an integer upscaling of the input')
    return height // _PROBE_SIZE


def count_classes(classifier: nn.Module, num_in_ch: int) -> int:
    """M of a classifier: its ``num_classes`` attribute, else the width of its output on a 32x32 patch."""
    if hasattr(classifier, 'num_classes'):
        return int(classifier.num_classes)
    with torch.no_grad():
        return int(classifier(torch.zeros(1, num_in_ch, 32, 32)).shape[-1])


@register(ARCH_REGISTRY)
class CDNSRNet(nn.Module):
    """Classifier plus M SR branches, each branch any arch in basicsr's ARCH registry.

    Routing modes of ``forward`` (the classifier gives logits ``z``, probabilities ``p = softmax(z)``):

    * ``soft``: ``y = sum_i p_i f_i(x)`` (ClassSR eq. 1); every branch sees every patch.
    * ``gumbel``: ``y = sum_i w_i f_i(x)`` with ``w = softmax((log p + g) / tau)``, ``g`` Gumbel noise
      (CDNSR eqs. 5-6); with ``hard_gumbel`` the forward pass uses the one-hot argmax of the noisy
      logits and the backward pass the soft weights (straight-through).
    * ``hard``: ``j = argmax_i p_i`` (ClassSR Sec. 3.2, test time). Patches are grouped by class and each
      branch runs once on its group (in chunks of ``max_batch``); outputs are scattered back in input
      order. The only Python loop is over the M branches.

    Branch order is cost order by convention: branch 0 is the smallest ("simple"), branch M-1 the
    backbone ("hard"); the data tools label the lowest-PSNR patches M-1.

    Args:
        classifier: option dict of the classifier, e.g. ``{type: PatchClassifier, num_classes: 3}``.
        branches: list of M option dicts, e.g. ``[{type: MSRResNet, num_feat: 36}, ...]``.
        routing: default routing mode, one of ``soft``, ``gumbel``, ``hard``.
        tau: default Gumbel-softmax temperature.
        hard_gumbel: straight-through one-hot Gumbel weights.
        scale: optional expected upscaling factor; checked against the branches.
        num_in_ch: input channels (used to probe the branches' scale).

    Raises:
        ValueError: a part cannot be built, M differs from the classifier's classes, the branches
            upscale by different factors; the message names the offending key.

    Examples:
        >>> net = CDNSRNet(classifier={'type': 'PatchClassifier', 'num_classes': 2},
        ...                branches=[{'type': 'FSRCNN', 'd': 16, 'upscale': 2},
        ...                          {'type': 'FSRCNN', 'd': 56, 'upscale': 2}])
        >>> sr, probs = net(torch.zeros(4, 3, 32, 32))
        >>> tuple(sr.shape), tuple(probs.shape)
        ((4, 3, 64, 64), (4, 2))
    """

    def __init__(self,
                 classifier: Mapping,
                 branches: Sequence[Mapping],
                 routing: str = 'hard',
                 tau: float = 1.0,
                 hard_gumbel: bool = False,
                 scale: Optional[int] = None,
                 num_in_ch: int = 3) -> None:
        super().__init__()
        if isinstance(branches, (str, bytes, Mapping)) or not isinstance(branches, Sequence) or not branches:
            raise ValueError('branches must be a non-empty list of arch options, one per class')
        self._check_routing(routing, 'routing')
        self.classifier_opt = deepcopy(dict(classifier)) if isinstance(classifier, Mapping) else classifier
        self.branch_opts = [deepcopy(dict(opt)) if isinstance(opt, Mapping) else opt for opt in branches]
        self.classifier = build_part(classifier, 'classifier')
        self.branches = nn.ModuleList(build_part(opt, f'branches[{i}]') for i, opt in enumerate(branches))
        self.num_classes = count_classes(self.classifier, num_in_ch)
        if self.num_classes != len(self.branches):
            raise ValueError(f'branches has {len(self.branches)} entries but classifier.num_classes is '
                             f'{self.num_classes}: give one branch per class')
        self.scale = self._common_scale(num_in_ch, scale)
        self.routing, self.tau, self.hard_gumbel = routing, float(tau), bool(hard_gumbel)

    def _common_scale(self, num_in_ch: int, expected: Optional[int]) -> int:
        scales = [measure_scale(branch, f'branches[{i}]', num_in_ch) for i, branch in enumerate(self.branches)]
        for i, found in enumerate(scales):
            if found != scales[0]:
                raise ValueError(f'branches[{i}] upscales x{found} but branches[0] upscales x{scales[0]}: '
                                 'all branches must share the scale')
        if expected is not None and expected != scales[0]:
            raise ValueError(f'scale is {expected} but the branches upscale x{scales[0]}')
        return scales[0]

    @staticmethod
    def _check_routing(mode: str, key: str) -> None:
        if mode not in ROUTING_MODES:
            raise ValueError(f'{key} must be one of {ROUTING_MODES}, got {mode!r}')

    def named_parts(self) -> dict[str, nn.Module]:
        """``{'classifier': ..., 'branch0': ..., ...}``: the parts that load from their own checkpoints
        (``path.pretrain_network_<part>``)."""
        return {'classifier': self.classifier, **{f'branch{i}': b for i, b in enumerate(self.branches)}}

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits, shape (N, M)."""
        return self.classifier(x)

    def branch_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every branch applied to the whole batch."""
        return [branch(x) for branch in self.branches]

    @staticmethod
    def mix(outputs: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
        """``sum_i weights[:, i] * outputs[i]`` (ClassSR eq. 1 with ``weights = p``)."""
        out = None
        for i, y in enumerate(outputs):
            term = weights[:, i].view(-1, 1, 1, 1) * y
            out = term if out is None else out + term
        return out

    def route(self, x: torch.Tensor, labels: torch.Tensor, max_batch: Optional[int] = None) -> torch.Tensor:
        """Run patch ``k`` through branch ``labels[k]``, one batched pass per branch (per chunk).

        Args:
            x: patches (N, C, h, w).
            labels: class index per patch (N,), values in ``[0, M)``.
            max_batch: largest number of patches per forward pass; ``None`` for no limit.
        """
        if labels.shape != (x.shape[0], ):
            raise ValueError(f'labels must have shape ({x.shape[0]},), got {tuple(labels.shape)}')
        out: Optional[torch.Tensor] = None
        for j, branch in enumerate(self.branches):
            index = torch.nonzero(labels == j, as_tuple=True)[0]
            if index.numel() == 0:
                continue
            for chunk in index.split(max_batch or index.numel()):
                y = branch(x.index_select(0, chunk))
                if out is None:
                    out = y.new_empty((x.shape[0], ) + tuple(y.shape[1:]))
                out = out.index_copy(0, chunk, y) if y.requires_grad else out.index_copy_(0, chunk, y)
        if out is None:  # empty batch
            return x.new_empty((0, x.shape[1], x.shape[2] * self.scale, x.shape[3] * self.scale))
        return out

    def forward(self,
                x: torch.Tensor,
                routing: Optional[str] = None,
                tau: Optional[float] = None,
                labels: Optional[torch.Tensor] = None,
                frozen: Optional[str] = None,
                return_outputs: bool = False,
                return_weights: bool = False,
                outputs: Optional[Sequence[torch.Tensor]] = None,
                hard_gumbel: Optional[bool] = None) -> tuple[torch.Tensor, ...]:
        """SR patches and class probabilities ``softmax(logits)``, shapes (N, C, sh, sw) and (N, M).

        Args:
            x: LR patches (N, C, h, w).
            routing: ``soft``, ``gumbel`` or ``hard``; default ``self.routing``.
            tau: Gumbel temperature; default ``self.tau``.
            labels: route by these classes (N,) instead of the classifier (``hard`` routing; the
                returned probabilities are their one-hot vectors). Used to pre-train each branch on
                its own class and for forced class mixes.
            frozen: ``'classifier'`` or ``'branches'``: that part runs without autograd (a training
                stage that freezes it); ``None`` for neither.
            return_outputs: also return every branch's output on every patch (knowledge
                distillation); then ``hard`` routing selects among them instead of grouping.
            return_weights: also return, last, the (N, M) weights the branches were mixed with: the
                Gumbel-softmax sample, the soft probabilities, or the one-hot choice (FLOPs terms that
                act on the sample, as CDNSR's reference code does).
            hard_gumbel: straight-through one-hot Gumbel weights (``gumbel`` routing); default
                ``self.hard_gumbel``.
            outputs: every branch's output on ``x``, computed before (frozen branches only: a stage that trains
                the classifier reuses them, ``models/branch_cache.py``); mixed or selected instead of running the
                branches.

        Returns:
            ``(sr, probs)``, then ``outputs`` with ``return_outputs``, then ``weights`` with ``return_weights``.
        """
        mode = routing or self.routing
        self._check_routing(mode, 'routing')
        if frozen not in (None, 'classifier', 'branches'):
            raise ValueError(f"frozen must be None, 'classifier' or 'branches', got {frozen!r}")
        grad = torch.is_grad_enabled()
        if outputs is not None and (frozen != 'branches' or len(outputs) != self.num_classes):
            raise ValueError(f'outputs: {len(outputs)} precomputed branch outputs need frozen branches and one per '
                             f'class ({self.num_classes}), got frozen={frozen!r}')
        if labels is not None:
            if mode == 'gumbel':
                raise ValueError('labels route directly; they cannot be combined with gumbel routing')
            logits, probs = None, F.one_hot(labels, self.num_classes).to(x.dtype)
        else:
            with torch.set_grad_enabled(grad and frozen != 'classifier'):
                logits = self.classify(x)
            probs = logits.softmax(dim=1)
        if mode == 'soft' or labels is not None:
            weights = probs
        elif mode == 'gumbel':
            hard = self.hard_gumbel if hard_gumbel is None else hard_gumbel
            weights = F.gumbel_softmax(logits, tau=self.tau if tau is None else tau, hard=hard)
        else:
            weights = F.one_hot(probs.argmax(dim=1), self.num_classes).to(x.dtype)
        if outputs is None:
            with torch.set_grad_enabled(grad and frozen != 'branches'):
                if mode == 'hard' and not return_outputs:
                    sr = self.route(x, probs.argmax(dim=1) if labels is None else labels)
                    return (sr, probs, weights) if return_weights else (sr, probs)
                outputs = self.branch_outputs(x)
        sr = self.mix(outputs, weights)
        return (sr, probs) + ((outputs, ) if return_outputs else ()) + ((weights, ) if return_weights else ())
