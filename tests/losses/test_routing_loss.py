"""Routing losses: hand-computed values of ClassSR eqs. (3)-(4) and CDNSR eqs. (2)-(3), gradient flow through
the classifier's softmax. AverageLoss under a real 2-process group: integration/test_distributed.py."""
from __future__ import annotations

import pytest
import torch
from basicsr.losses import build_loss

from cdnsr_plugin.losses import AverageLoss, ClassLoss, FLOPsRegLoss

from helpers import rand


@pytest.mark.parametrize('opt, cls', [({'type': 'ClassLoss'}, ClassLoss), ({'type': 'AverageLoss'}, AverageLoss),
                                      ({'type': 'FLOPsRegLoss', 'alpha': 0.6}, FLOPsRegLoss)])
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
                                         (FLOPsRegLoss(alpha=0.2), (torch.tensor([1.0, 2.0, 4.0]), ))])
def test_routing_losses_reach_logits(loss, extra):
    logits = (rand(5, 3) * 3).requires_grad_()
    loss(torch.softmax(logits, dim=1), *extra).backward()
    assert logits.grad.abs().sum() > 0


def test_flops_reg_no_gradient_under_budget():
    logits = torch.tensor([[3.0, 0.0, 0.0], [2.0, 1.0, 0.0]], requires_grad=True)
    value = FLOPsRegLoss(alpha=0.9)(torch.softmax(logits, dim=1), torch.tensor([1.0, 2.0, 4.0]))
    value.backward()
    assert value.item() == 0 and torch.count_nonzero(logits.grad) == 0
