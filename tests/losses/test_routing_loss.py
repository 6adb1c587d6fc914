"""Routing losses: hand-computed values of ClassSR eqs. (3)-(4) and CDNSR eqs. (2)-(3), gradient flow through
the classifier's softmax. AverageLoss under a real 2-process group: integration/test_distributed.py."""
from __future__ import annotations

import pytest
import torch
from basicsr.losses import build_loss

from cdnsr_plugin.losses import AverageLoss, ClassLoss, DualFLOPsLoss, FLOPsRegLoss, OracleLabelLoss
from cdnsr_plugin.losses.routing_loss import oracle_labels

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
    """Eq. (4) as printed (``normalize: false``), and divided by its largest value 2B(M-1)/M (the default, as
    ClassSR's reference code: 4B/M for M = 3)."""
    literal = AverageLoss(normalize=False)
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])  # sums 2.6, 1.4; B/M = 2
    assert literal(probs).item() == pytest.approx(0.6 + 0.6)
    assert AverageLoss()(probs).item() == pytest.approx(1.2 / (2 * 4 * 1 / 2))
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8], [0.2, 0.6, 0.2]])  # sums 0.8, 1.0, 1.2; B/M = 1
    assert literal(probs).item() == pytest.approx(0.2 + 0.0 + 0.2)
    assert AverageLoss(loss_weight=6, normalize=False)(probs).item() == pytest.approx(6 * 0.4)
    assert AverageLoss()(probs).item() == pytest.approx(0.4 / (4 * 3 / 3))  # the reference's / (4 n / m)
    assert AverageLoss()(torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])).item() == 0


def test_normalised_average_loss_does_not_grow_with_the_batch():
    one_class = torch.tensor([[1.0, 0.0, 0.0]])
    for batch in (3, 16, 96):
        assert AverageLoss()(one_class.repeat(batch, 1)).item() == pytest.approx(1.0)  # its largest value
        assert AverageLoss(normalize=False)(one_class.repeat(batch, 1)).item() == pytest.approx(4 * batch / 3)


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


# ---- beyond the papers: losses that make routers meet a budget ---------------------------------
def test_flops_reg_on_the_sample_and_in_the_reference_units():
    costs = torch.tensor([1e8, 2e8, 4e8])  # paper FLOPs
    probs = torch.tensor([[0.0, 0.0, 1.0]])
    sample = torch.tensor([[1.0, 0.0, 0.0]])
    on_sample = FLOPsRegLoss(alpha=0.5, apply_to='sample')
    assert on_sample.routing_inputs == ('weights', 'costs')
    assert on_sample(sample, costs).item() == 0  # the sample, not the probabilities, pays: 0.25 < 0.5
    assert FLOPsRegLoss(alpha=0.5)(probs, costs).item() == pytest.approx(0.5)
    # the reference's scale: hinge / ((C_max - C_min) in GFLOPs) / 1000 (it weights its L1 by 1000)
    assert FLOPsRegLoss(alpha=0.5, units='reference')(probs, costs).item() == pytest.approx(0.5 / 0.3 / 1000)
    with pytest.raises(ValueError, match='units'):
        FLOPsRegLoss(units='gflops')


def test_oracle_labels_hand_example():
    # four patches, errors per branch; costs 1 : 2 : 4 (relative 0.25, 0.5, 1)
    errors = torch.tensor([
        [0.10, 0.10, 0.10],  # no branch better: cheapest at any price
        [0.30, 0.10, 0.09],  # the backbone only marginally better than the middle
        [0.50, 0.20, 0.05],  # large gains from the backbone
        [0.20, 0.19, 0.18]
    ])
    costs = torch.tensor([1.0, 2.0, 4.0])
    labels, price = oracle_labels(errors, costs, target=1.0)
    assert labels.tolist() == [0, 2, 2, 2] and price == 0  # the most accurate branch (ties: the cheapest)
    labels, price = oracle_labels(errors, costs, target=0.5)
    # mean relative cost <= 0.5 with the smallest price: the backbone keeps only the patch that gains most
    assert labels.tolist() == [0, 1, 2, 0] and (0.25 + 0.5 + 1 + 0.25) / 4 <= 0.5 and price > 0
    assert oracle_labels(errors, costs, target=0.1)[0].tolist() == [0, 0, 0, 0]  # below every branch: cheapest


def test_oracle_label_loss_is_cross_entropy_to_those_labels():
    gt = torch.zeros(4, 3, 2, 2)
    outputs = [torch.full_like(gt, v) for v in (0.3, 0.2, 0.0)]  # errors 0.09, 0.04, 0 on every patch
    logits = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), requires_grad=True)
    probs = torch.softmax(logits, dim=1)
    loss = OracleLabelLoss(target=1.0)
    value = loss(probs, outputs, gt, torch.tensor([1.0, 2.0, 4.0]))
    expected = torch.nn.functional.cross_entropy(logits, torch.full((4, ), 2))
    assert value.item() == pytest.approx(expected.item(), rel=1e-6)
    value.backward()
    assert logits.grad[:, 2].lt(0).all()  # pushed towards the labelled branch


def test_dual_price_makes_the_argmax_meet_the_budget_on_a_toy_problem():
    """Patches with a quality gain g_b for the expensive branch (4x the cheap one's cost): the reconstruction
    loss alone sends every patch there; the price rises until only the patches with the largest gains stay.
    At the budget 0.5 a third of the patches keep the backbone: those with g_b > 0.75 lambda*, so lambda* is
    the 2/3 quantile of the gains / 0.75."""
    torch.manual_seed(0)
    gains = torch.rand(256) * 0.1  # what the backbone saves per patch, over the cheap branch
    features = torch.stack([gains * 10, torch.ones(256)], dim=1)  # a classifier that can see the gain
    layer = torch.nn.Linear(2, 2)
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.01)
    costs = torch.tensor([1.0, 4.0])
    dual = DualFLOPsLoss(alpha=0.5, initial_price=0.05)
    fractions = []
    for _ in range(2000):
        probs = torch.softmax(layer(features), dim=1)
        reconstruction = (probs[:, 0] * gains).mean()  # the cheap branch loses g_b
        loss = reconstruction + dual(probs, probs, costs)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        fractions.append((costs[probs.argmax(dim=1)] / costs.max()).mean().item())
    assert sum(fractions[-200:]) / 200 == pytest.approx(0.5, abs=0.02)  # the budget, in the argmax
    assert float(dual.price) == pytest.approx(torch.quantile(gains, 2 / 3).item() / 0.75, rel=0.15)
    with torch.no_grad():
        choice = layer(features).argmax(dim=1)
    assert gains[choice == 1].min() >= gains[choice == 0].max() - 1e-3  # the expensive branch got the largest gains
