"""Knowledge distillation between the SR branches (CDNSR Sec. III-C). ``outputs`` is always the list
of the M branches' outputs on the same patches, ordered small -> large (branch M-1 = backbone);
every branch learns from every larger one, and teachers are detached (students only follow)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
import torchvision
from basicsr.utils.registry import LOSS_REGISTRY
from torch import Tensor, nn

from cdnsr_plugin.registry import register

VGG19_FILE = 'vgg19-dcbb9e9d.pth'
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def _check_outputs(outputs: Sequence[Tensor], name: str) -> None:
    if isinstance(outputs, Tensor) or len(outputs) == 0:
        raise ValueError(f'{name}: outputs must be a non-empty list of branch outputs, small -> large')
    if any(out.shape != outputs[0].shape for out in outputs):
        raise ValueError(f'{name}: branch outputs differ in shape: {[tuple(out.shape) for out in outputs]}')


@register(LOSS_REGISTRY)
class PixelKDLoss(nn.Module):
    """Pixel distillation, the KD term of CDNSR eq. (7): ``sum_{s<t} l(y_s, y_t.detach())``.

    Every branch ``s`` learns from every larger branch ``t > s``; ``l`` is the mean-reduced L1 (or
    MSE) loss. ``L_res`` of eq. (7) is added by the model, not here. Zero for M = 1.

    Args:
        loss_weight: multiplies the loss (``lambda_KD`` of eq. 7).
        criterion: ``'l1'`` (the paper) or ``'mse'``.
    """

    _CRITERIA = {'l1': F.l1_loss, 'mse': F.mse_loss}

    routing_inputs = ('outputs', )

    def __init__(self, loss_weight: float = 1.0, criterion: str = 'l1') -> None:
        super().__init__()
        if criterion not in self._CRITERIA:
            raise ValueError(f'PixelKDLoss: criterion must be one of {sorted(self._CRITERIA)}, got {criterion!r}')
        self.loss_weight = float(loss_weight)
        self.criterion = criterion

    def forward(self, outputs: Sequence[Tensor], lq: Optional[Tensor] = None) -> Tensor:
        """``lq`` is ignored; it is accepted so both KD losses share one call signature."""
        _check_outputs(outputs, 'PixelKDLoss')
        fn = self._CRITERIA[self.criterion]
        total = outputs[0].new_zeros(())
        for s in range(len(outputs)):
            for t in range(s + 1, len(outputs)):
                total = total + fn(outputs[s], outputs[t].detach())
        return self.loss_weight * total


def _vgg19_features(layer: str) -> nn.Sequential:
    """torchvision's VGG-19 ``features`` truncated after ``layer`` (e.g. ``'relu5_4'``), uninitialised.

    Built on the meta device, so the 140M-parameter classifier is never allocated; the layer
    indices, hence the state-dict keys ``features.<i>.*``, are torchvision's.
    """
    with torch.device('meta'):
        features = torchvision.models.vgg19(weights=None, init_weights=False).features
    names, block, index = [], 1, 1
    for module in features:
        if isinstance(module, nn.MaxPool2d):
            names.append(f'pool{block}')
            block, index = block + 1, 1
        elif isinstance(module, nn.Conv2d):
            names.append(f'conv{block}_{index}')
        else:
            names.append(f'relu{block}_{index}')
            index += 1
    if layer not in names:
        raise ValueError(f'ContrastiveKDLoss: layer must be a VGG-19 layer name such as relu5_4, got {layer!r}')
    return features[:names.index(layer) + 1].to_empty(device='cpu')


def _load_features(features: nn.Sequential, path: Path) -> None:
    """Load the ``features.<i>.*`` entries of a torchvision VGG-19 state dict into ``features``; a file that
    cannot be loaded with ``weights_only=True`` is refused in one paragraph naming it (``load_tensors``)."""
    from cdnsr_plugin.utils.checkpoint import load_tensors
    state = load_tensors(path, 'ContrastiveKDLoss: the VGG-19 weights file')
    if not isinstance(state, dict):
        raise ValueError(f'ContrastiveKDLoss: {path} holds a {type(state).__name__}, not a torchvision VGG-19 state '
                         f'dict ({VGG19_FILE})')
    wanted = features.state_dict().keys()
    found = {name: state[f'features.{name}'] for name in wanted if f'features.{name}' in state}
    if found.keys() != wanted:
        raise ValueError(f'ContrastiveKDLoss: {path} is not a torchvision VGG-19 state dict '
                         f"(missing {sorted('features.' + key for key in wanted - found.keys())})")
    features.load_state_dict(found)


@register(LOSS_REGISTRY)
class ContrastiveKDLoss(nn.Module):
    """Contrastive distillation, CDNSR eq. (8).

    For every student ``k`` and teacher ``j > k`` (both branch indices, small -> large) and every
    sample ``b``: ``-log(exp(cos(phi(z_k), phi(z_j))) / sum_s exp(cos(phi(z_k), phi(n_s))))``,
    averaged over the batch and summed over the (k, j) pairs. The anchor ``z_k`` is student k's
    output, the positive ``z_j`` teacher j's output (detached), the negatives ``n_s`` the S other
    LR images of the batch (``lq[(b + 1 + s) % B]``, S = min(num_negatives, B - 1)) bicubically
    upsampled to the SR size and clamped to [0, 1]. Gradients reach the students only.

    ``phi``: frozen VGG-19 features (ImageNet-normalised RGB in [0, 1]) up to ``layer``, global
    average pooling, then a 2-layer MLP (Linear-ReLU-Linear to ``proj_dim``). The paper does not say
    how the MLP is trained; our choice is a frozen MLP initialised (PyTorch's default Linear scheme)
    from ``torch.Generator().manual_seed(0)``, so every rank and every run projects identically.

    Args:
        loss_weight: multiplies the loss (``lambda_CT`` of eq. 9).
        num_negatives: S, negatives per anchor (capped at B - 1).
        feature_extractor: only ``'vgg19'``.
        vgg_weights: torchvision's ImageNet VGG-19 state dict (``vgg19-dcbb9e9d.pth``), a path
            relative to the working directory as in BasicSR. Never downloaded.
        layer: last VGG layer used, e.g. ``'relu5_4'``.
        proj_dim, hidden_dim: MLP output and hidden widths.
        random_weights: for tests only: skip the file and keep a seeded random VGG init.

    Raises:
        FileNotFoundError: ``vgg_weights`` is missing (and ``random_weights`` is false).
        ValueError: unknown ``feature_extractor`` or ``layer``; in ``forward``, a batch of one.
    """

    routing_inputs = ('outputs', 'lq')

    def __init__(self,
                 loss_weight: float = 1.0,
                 num_negatives: int = 6,
                 feature_extractor: str = 'vgg19',
                 vgg_weights: str = f'experiments/pretrained_models/{VGG19_FILE}',
                 layer: str = 'relu5_4',
                 proj_dim: int = 128,
                 hidden_dim: int = 256,
                 random_weights: bool = False) -> None:
        super().__init__()
        if feature_extractor != 'vgg19':
            raise ValueError(f"ContrastiveKDLoss: feature_extractor must be 'vgg19', got {feature_extractor!r}")
        if num_negatives < 1:
            raise ValueError(f'ContrastiveKDLoss: num_negatives must be >= 1, got {num_negatives}')
        path = Path(vgg_weights).expanduser().resolve()
        if not random_weights and not path.is_file():
            raise FileNotFoundError(
                f'ContrastiveKDLoss: VGG-19 weights not found at {path}. Put torchvision\'s ImageNet VGG-19 '
                f'weights ({VGG19_FILE}) at that path, or point vgg_weights to the file. Nothing is '
                'downloaded. (random_weights: true skips the file; it exists for tests only.)')
        self.loss_weight = float(loss_weight)
        self.num_negatives = int(num_negatives)
        generator = torch.Generator().manual_seed(0)
        self.features = _vgg19_features(layer)
        if random_weights:  # torchvision's VGG init scheme, seeded
            for conv in self.features:
                if isinstance(conv, nn.Conv2d):
                    nn.init.kaiming_normal_(conv.weight, mode='fan_out', nonlinearity='relu', generator=generator)
                    nn.init.zeros_(conv.bias)
        else:
            _load_features(self.features, path)
        width = [m for m in self.features if isinstance(m, nn.Conv2d)][-1].out_channels
        self.mlp = nn.Sequential(nn.Linear(width, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, proj_dim))
        for linear in (self.mlp[0], self.mlp[2]):  # PyTorch's default Linear init, from the seeded generator
            bound = 1 / math.sqrt(linear.in_features)
            linear.weight.data.uniform_(-bound, bound, generator=generator)
            linear.bias.data.uniform_(-bound, bound, generator=generator)
        self.requires_grad_(False)
        self.register_buffer('mean', torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer('std', torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.train()

    def train(self, mode: bool = True) -> 'ContrastiveKDLoss':
        super().train(mode)
        self.features.eval()  # frozen: always in eval mode
        return self

    def embed(self, images: Tensor) -> Tensor:
        """``phi``: unit-norm projections (N, proj_dim) of RGB images in [0, 1]."""
        feats = self.features((images - self.mean) / self.std).mean(dim=(2, 3))
        return F.normalize(self.mlp(feats), dim=1)

    def forward(self, outputs: Sequence[Tensor], lq: Tensor) -> Tensor:
        _check_outputs(outputs, 'ContrastiveKDLoss')
        num, batch = len(outputs), outputs[0].shape[0]
        if num < 2:
            return outputs[0].new_zeros(())
        if batch < 2 or lq.shape[0] != batch:
            raise ValueError(f'ContrastiveKDLoss: the negatives are the other LR images of the batch, so the batch '
                             f'must hold >= 2 patches (got outputs of {batch}, lq of {lq.shape[0]})')
        with torch.no_grad():  # the backbone only teaches; the negatives are fixed
            upsampled = F.interpolate(lq, size=outputs[0].shape[-2:], mode='bicubic', align_corners=False)
            fixed = self.embed(torch.cat([outputs[-1], upsampled.clamp(0, 1)]))
        students = self.embed(torch.cat(list(outputs[:-1])))  # one pass for all students
        embedded = torch.cat([students, fixed[:batch]]).view(num, batch, -1)
        negatives = fixed[batch:]
        shift = torch.arange(batch, device=lq.device).view(-1, 1) + 1
        neg_index = (shift + torch.arange(min(self.num_negatives, batch - 1), device=lq.device)) % batch
        total = outputs[0].new_zeros(())
        for k in range(num - 1):
            anchor = embedded[k]
            log_denominator = torch.einsum('bd,bsd->bs', anchor, negatives[neg_index]).logsumexp(dim=1)
            for j in range(k + 1, num):
                positive = (anchor * embedded[j].detach()).sum(dim=1)
                total = total + (log_denominator - positive).mean()
        return self.loss_weight * total
