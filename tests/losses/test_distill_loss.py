"""Distillation losses: CDNSR eq. (7)'s pixel KD term and eq. (8)'s contrastive loss by hand, gradient flow,
and the VGG weight file contract."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from basicsr.losses import build_loss

from cdnsr_plugin.losses import ContrastiveKDLoss, PixelKDLoss

from helpers import load_photos, rand

TINY_CKD = {'type': 'ContrastiveKDLoss', 'random_weights': True, 'layer': 'relu1_2', 'hidden_dim': 32, 'proj_dim': 16}


@pytest.fixture(scope='module')
def ckd() -> ContrastiveKDLoss:
    return build_loss(TINY_CKD)


@pytest.fixture(scope='module')
def hr_lq() -> tuple[torch.Tensor, torch.Tensor]:
    """Three 32x32 RGB crops of real photos in [0, 1] and their x4 bicubic LR."""
    crops = [photo[100:132, 100:132, ::-1].astype(np.float32) / 255 for photo in load_photos(3)]
    hr = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).contiguous()
    return hr, F.interpolate(hr, scale_factor=0.25, mode='bicubic', antialias=True).clamp(0, 1)


@pytest.mark.parametrize('opt, cls', [({'type': 'PixelKDLoss'}, PixelKDLoss), (TINY_CKD, ContrastiveKDLoss)])
def test_build_from_options(opt, cls):
    loss = build_loss({**opt, 'loss_weight': 0.5})
    assert type(loss) is cls and loss.loss_weight == 0.5


# ---- CDNSR eq. (7), KD term --------------------------------------------------------------------
def test_pixel_kd_values_and_gradients():
    outs = [rand(2, 3, 8, 8, seed=i).requires_grad_() for i in range(3)]
    pairs = [(0, 1), (0, 2), (1, 2)]
    expected = sum((outs[s] - outs[t]).abs().mean().item() for s, t in pairs)
    value = build_loss({'type': 'PixelKDLoss', 'loss_weight': 2.0})(outs)
    assert value.item() == pytest.approx(2 * expected, rel=1e-6)
    value.backward()
    assert outs[2].grad is None  # the backbone only teaches
    assert outs[0].grad.abs().sum() > 0 and outs[1].grad.abs().sum() > 0
    # branch 1 is pulled towards branch 2 only: its gradient is that of the (1, 2) term alone
    torch.testing.assert_close(outs[1].grad, 2 * torch.sign(outs[1] - outs[2]).detach() / outs[1].numel())
    assert PixelKDLoss()(outs[:1]).item() == 0


# ---- CDNSR eq. (8) -------------------------------------------------------------------------------
def test_contrastive_matches_eq8_by_hand(ckd):
    outs, lq = [rand(3, 3, 16, 16, seed=i) for i in range(3)], rand(3, 3, 4, 4, seed=9)
    loss = build_loss({**TINY_CKD, 'num_negatives': 6})  # capped at B - 1 = 2
    phi = [loss.embed(out) for out in outs]
    neg = loss.embed(F.interpolate(lq, size=16, mode='bicubic', align_corners=False).clamp(0, 1))
    expected = 0.0
    for k, j in [(0, 1), (0, 2), (1, 2)]:
        for b in range(3):
            pos = torch.exp(F.cosine_similarity(phi[k][b], phi[j][b], dim=0))
            den = sum(torch.exp(F.cosine_similarity(phi[k][b], neg[(b + 1 + s) % 3], dim=0)) for s in range(2))
            expected += -torch.log(pos / den).item() / 3
    assert loss(outs, lq).item() == pytest.approx(expected, rel=1e-5)


def test_contrastive_decreases_towards_teacher(ckd, hr_lq):
    hr, lq = hr_lq
    near = (hr + 0.05 * rand(*hr.shape, seed=1) - 0.025).clamp(0, 1)
    far = rand(*hr.shape, seed=2)
    near_value, far_value = ckd([near, hr], lq), ckd([far, hr], lq)
    assert torch.isfinite(near_value) and torch.isfinite(far_value)
    assert near_value < far_value - 0.05


def test_contrastive_gradients_reach_students_only(ckd, hr_lq):
    hr, lq = hr_lq
    outs = [rand(*hr.shape, seed=i).requires_grad_() for i in range(2)] + [hr.clone().requires_grad_()]
    lq = lq.clone().requires_grad_()
    ckd.train()
    ckd(outs, lq).backward()
    assert outs[2].grad is None and lq.grad is None  # teacher and negatives get nothing
    assert outs[0].grad.abs().sum() > 0 and outs[1].grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in ckd.parameters())
    assert not ckd.features.training  # frozen VGG stays in eval mode under .train()


def test_contrastive_needs_two_patches(ckd):
    with pytest.raises(ValueError, match='batch'):
        ckd([rand(1, 3, 16, 16), rand(1, 3, 16, 16)], rand(1, 3, 4, 4))
    assert ckd([rand(2, 3, 16, 16)], rand(2, 3, 4, 4)).item() == 0  # M = 1: nothing to distil


def test_contrastive_rejects_unknown_extractor():
    with pytest.raises(ValueError, match='feature_extractor'):
        ContrastiveKDLoss(feature_extractor='resnet50', random_weights=True)


def test_contrastive_missing_weights_says_where(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as info:
        build_loss({'type': 'ContrastiveKDLoss'})
    message = str(info.value)
    assert 'vgg19-dcbb9e9d.pth' in message and 'random_weights' in message and 'downloaded' in message
    assert str(tmp_path.resolve() / 'experiments' / 'pretrained_models') in message


def test_contrastive_loads_torchvision_state_dict(tmp_path, monkeypatch, ckd):
    import torchvision
    torch.manual_seed(123)
    state = torchvision.models.vgg19(weights=None).state_dict()
    target = tmp_path / 'experiments' / 'pretrained_models' / 'vgg19-dcbb9e9d.pth'
    target.parent.mkdir(parents=True)
    torch.save(state, target)
    monkeypatch.chdir(tmp_path)  # BasicSR's convention: the default path, relative to the working directory
    loaded = build_loss({**TINY_CKD, 'random_weights': False})
    torch.testing.assert_close(loaded.features[2].weight, state['features.2.weight'])
    images = rand(2, 3, 16, 16)
    assert not torch.allclose(loaded.features(images), ckd.features(images))
    torch.save({'classifier.0.weight': torch.zeros(1)}, target)
    with pytest.raises(ValueError, match='not a torchvision VGG-19'):
        build_loss({**TINY_CKD, 'random_weights': False})
