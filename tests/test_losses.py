"""Losses: hand-computed values of ClassSR eqs. (3)-(4) and CDNSR eqs. (3), (7), (8), gradient flow,
the VGG weight file contract, and AverageLoss over a real 2-process gloo group."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from basicsr.losses import build_loss

import cdnsr_plugin.losses  # noqa: F401  (registers the losses)
from cdnsr_plugin.losses import AverageLoss, ClassLoss, ContrastiveKDLoss, FLOPsRegLoss, PixelKDLoss
from conftest import load_photos

TINY_CKD = {'type': 'ContrastiveKDLoss', 'random_weights': True, 'layer': 'relu1_2', 'hidden_dim': 32, 'proj_dim': 16}


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope='module')
def ckd() -> ContrastiveKDLoss:
    return build_loss(TINY_CKD)


@pytest.fixture(scope='module')
def hr_lq() -> tuple[torch.Tensor, torch.Tensor]:
    """Three 32x32 RGB crops of real photos in [0, 1] and their x4 bicubic LR."""
    crops = [photo[100:132, 100:132, ::-1].astype(np.float32) / 255 for photo in load_photos(3)]
    hr = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).contiguous()
    return hr, F.interpolate(hr, scale_factor=0.25, mode='bicubic', antialias=True).clamp(0, 1)


@pytest.mark.parametrize('opt, cls', [({'type': 'ClassLoss'}, ClassLoss), ({'type': 'AverageLoss'}, AverageLoss),
                                      ({'type': 'FLOPsRegLoss', 'alpha': 0.6}, FLOPsRegLoss),
                                      ({'type': 'PixelKDLoss'}, PixelKDLoss), (TINY_CKD, ContrastiveKDLoss)])
def test_build_from_options(opt, cls):
    loss = build_loss({**opt, 'loss_weight': 0.5})
    assert type(loss) is cls and loss.loss_weight == 0.5


# ---- ClassSR eq. (3) -------------------------------------------------------------------------
def test_class_loss_hand_values():
    loss = ClassLoss()
    assert loss(torch.tensor([[0.9, 0.05, 0.05]])).item() == pytest.approx(-1.7)
    assert loss(torch.full((1, 3), 1 / 3)).item() == pytest.approx(0, abs=1e-7)
    batch = torch.tensor([[0.9, 0.05, 0.05], [0.5, 0.3, 0.2]])  # -1.7 and -(0.2 + 0.3 + 0.1) = -0.6
    assert loss(batch).item() == pytest.approx((-1.7 - 0.6) / 2)
    assert ClassLoss(loss_weight=3)(batch).item() == pytest.approx(3 * (-1.7 - 0.6) / 2)


@pytest.mark.parametrize('num_classes', [2, 5])
def test_class_loss_matches_double_loop(num_classes):
    probs = torch.softmax(rand(4, num_classes) * 4, dim=1)
    expected = sum(-sum(abs(row[i] - row[j]) for i in range(num_classes) for j in range(i + 1, num_classes))
                   for row in probs.tolist()) / 4
    assert ClassLoss()(probs).item() == pytest.approx(expected, rel=1e-6)


# ---- ClassSR eq. (4) -------------------------------------------------------------------------
def test_average_loss_hand_values():
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])  # sums 2.6, 1.4; B/M = 2
    assert AverageLoss()(probs).item() == pytest.approx(0.6 + 0.6)
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8], [0.2, 0.6, 0.2]])  # sums 0.8, 1.0, 1.2; B/M = 1
    assert AverageLoss()(probs).item() == pytest.approx(0.2 + 0.0 + 0.2)
    assert AverageLoss(loss_weight=6)(probs).item() == pytest.approx(6 * 0.4)
    assert AverageLoss()(torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])).item() == 0


# ---- CDNSR eqs. (2)-(3) ----------------------------------------------------------------------
def test_flops_reg_hinge():
    probs, costs = torch.tensor([[1.0, 0, 0], [0, 0, 1.0]]), torch.tensor([1.0, 2.0, 4.0])  # E[F]/Cmax = 0.625
    assert FLOPsRegLoss(alpha=0.5)(probs, costs).item() == pytest.approx(0.125)
    assert FLOPsRegLoss(alpha=0.5, loss_weight=4)(probs, [1, 2, 4]).item() == pytest.approx(0.5)
    assert FLOPsRegLoss(alpha=0.7)(probs, costs).item() == 0


@pytest.mark.parametrize('alpha', [0, -0.1, 1.5])
def test_flops_reg_rejects_alpha(alpha):
    with pytest.raises(ValueError, match='alpha'):
        FLOPsRegLoss(alpha=alpha)


@pytest.mark.parametrize('costs', [[1.0, 2.0], [1.0, 0.0, 4.0], [1.0, 2.0, -4.0]])
def test_flops_reg_rejects_costs(costs):
    with pytest.raises(ValueError, match='costs'):
        FLOPsRegLoss()(torch.full((2, 3), 1 / 3), costs)


# ---- gradients through the classifier's softmax -----------------------------------------------
@pytest.mark.parametrize('loss, extra', [(ClassLoss(), ()), (AverageLoss(), ()),
                                         (FLOPsRegLoss(alpha=0.2), (torch.tensor([1.0, 2.0, 4.0]),))])
def test_routing_losses_reach_logits(loss, extra):
    logits = (rand(5, 3) * 3).requires_grad_()
    loss(torch.softmax(logits, dim=1), *extra).backward()
    assert logits.grad.abs().sum() > 0


def test_flops_reg_no_gradient_under_budget():
    logits = torch.tensor([[3.0, 0.0, 0.0], [2.0, 1.0, 0.0]], requires_grad=True)
    value = FLOPsRegLoss(alpha=0.9)(torch.softmax(logits, dim=1), torch.tensor([1.0, 2.0, 4.0]))
    value.backward()
    assert value.item() == 0 and torch.count_nonzero(logits.grad) == 0


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


# ---- AverageLoss over a real 2-process gloo group ---------------------------------------------
def _average_loss_rank(rank: int, world: int, init_file: str, x: torch.Tensor, weight: torch.Tensor,
                       out_dir: str) -> None:
    import torch.distributed as dist
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world)
    try:
        weight = weight.clone().requires_grad_()
        logits = x.chunk(world)[rank] @ weight
        logits.retain_grad()
        value = AverageLoss()(torch.softmax(logits, dim=1))
        value.backward()
        grad = weight.grad.clone()
        dist.all_reduce(grad)  # what DDP does to a shared parameter's gradient: the mean over ranks
        torch.save({'value': value.detach(), 'logit_grad': logits.grad, 'weight_grad': grad / world},
                   Path(out_dir) / f'{rank}.pt')
    finally:
        dist.destroy_process_group()


def test_average_loss_distributed_matches_global_batch(tmp_path):
    import torch.multiprocessing as mp
    x, weight = rand(8, 4, seed=3) * 2 - 1, rand(4, 3, seed=4) * 4 - 2  # 8 patches, M = 3, 4 per rank
    mp.spawn(_average_loss_rank, args=(2, str(tmp_path / 'init'), x, weight, str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f'{rank}.pt') for rank in range(2)]

    weight = weight.clone().requires_grad_()
    logits = x @ weight
    logits.retain_grad()
    single = AverageLoss()(torch.softmax(logits, dim=1))
    single.backward()
    assert single.item() > 0.1  # a non-trivial imbalance
    for rank, result in enumerate(ranks):
        assert result['value'].item() == pytest.approx(single.item(), rel=1e-6)  # the global-batch loss
        # each rank's own gradient is world x that of the global loss (the world*local share) ...
        torch.testing.assert_close(result['logit_grad'], 2 * logits.grad[4 * rank:4 * rank + 4])
        # ... so DDP's mean over ranks gives the shared parameter exactly the single-process gradient
        torch.testing.assert_close(result['weight_grad'], weight.grad)
