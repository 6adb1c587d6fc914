"""cdnsr_plugin.inference.policies: the cost knob, the budget solver, forced mixes."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from cdnsr_plugin.inference.policies import (BudgetSolution, cost_aware_labels, eta_limit, forced_mix_labels,
                                             routed_fraction, solve_budget, solve_shared_eta)

COSTS = [0.21, 0.46, 1.01]  # branches 0.2 / 0.45 / 1.0 of the largest, plus a 0.01 classifier
STEP = (COSTS[-1] - COSTS[0]) / 1.0  # the largest change of one patch's cost, relative to largest = 1


@pytest.fixture(scope='module')
def photo_logits(photo_tiles) -> torch.Tensor:
    """Logits of a randomly initialised PatchClassifier on the photo tiles, standardised per class.

    At initialisation the classifier's outputs vary across patches by ~1e-6 only (scaling them by 20
    still leaves every patch switching class at practically the same eta), so each class's logits
    are standardised over the patches and doubled: the patch ranking stays the classifier's.
    """
    from basicsr.archs import build_network
    torch.manual_seed(0)
    net = build_network({'type': 'PatchClassifier', 'num_classes': 3}).eval()
    with torch.no_grad():
        raw = net(photo_tiles)
    return (raw - raw.mean(0)) / raw.std(0) * 2


# ----------------------------------------------------------------------------------------------
# cost_aware_labels / routed_fraction


def test_eta_zero_is_the_classifier_argmax(photo_logits):
    assert torch.equal(cost_aware_labels(photo_logits, COSTS, 0.0), photo_logits.argmax(1))


def test_cost_aware_labels_hand_example():
    # penalties c / max(c) = [0.25, 0.5, 1]; log_softmax only shifts a row, so argmax(l - eta * p)
    logits = torch.tensor([[0.0, 1.0, 2.0]])
    picks = {eta: cost_aware_labels(logits, [1, 2, 4], eta).item() for eta in (-5.0, 0.0, 1.5, 3.0, 10.0)}
    # eta=1.5: [-0.375, 0.25, 0.5] -> 2;  eta=3: [-0.75, -0.5, -1] -> 1;  eta=10: [-2.5, -4, -8] -> 0
    assert picks == {-5.0: 2, 0.0: 2, 1.5: 2, 3.0: 1, 10.0: 0}


def test_ties_go_to_the_cheaper_class():
    logits = torch.zeros(2, 3)
    assert cost_aware_labels(logits, [1, 2, 4], 0.0).tolist() == [0, 0]
    assert cost_aware_labels(logits, [4, 2, 1], 0.0).tolist() == [2, 2]
    assert cost_aware_labels(logits, torch.tensor([3.0, 1.0, 1.0]), 0.0).tolist() == [1, 1]  # equal cost: lower index


@pytest.mark.parametrize('logits, costs, match', [
    (torch.zeros(3), [1, 2, 3], 'logits'),
    (torch.zeros(2, 3), [1, 2], 'costs'),
    (torch.zeros(2, 3), [1, -2, 3], 'costs'),
    (torch.tensor([[0.0, math.inf]]), [1, 2], 'logits'),
])
def test_cost_aware_labels_rejects_bad_shapes(logits, costs, match):
    with pytest.raises(ValueError, match=match):
        cost_aware_labels(logits, costs, 0.0)


def test_routed_fraction_hand_value_and_empty_labels():
    assert routed_fraction(torch.tensor([0, 1, 2, 2]), COSTS, 1.0, 3) == pytest.approx((0.21 + 0.46 + 2.02) / 4)
    assert routed_fraction(torch.tensor([2, 2]), COSTS, 2.0) == pytest.approx(0.505)
    with pytest.raises(ValueError, match='labels'):
        routed_fraction(torch.tensor([], dtype=torch.long), COSTS, 1.0, 3)
    with pytest.raises(ValueError, match='per_patch_costs'):
        routed_fraction(torch.tensor([0]), COSTS, 1.0, 4)


def test_each_patch_cost_is_non_increasing_in_eta(photo_logits):
    costs = torch.tensor(COSTS, dtype=torch.float64)
    per_patch = torch.stack([costs[cost_aware_labels(photo_logits, COSTS, eta)] for eta in np.linspace(-30, 30, 121)])
    assert (per_patch[1:] <= per_patch[:-1]).all()  # hence the mean fraction too
    fractions = per_patch.mean(1)
    assert fractions[0] == pytest.approx(1.01) and fractions[-1] == pytest.approx(0.21)
    assert len(set(fractions.tolist())) > 20  # a real staircase, not one jump


# ----------------------------------------------------------------------------------------------
# solve_budget


@pytest.mark.parametrize('budget', [0.3, 0.5, 0.7])
def test_solve_budget_lands_on_the_budget(photo_logits, budget):
    solution = solve_budget(photo_logits, COSTS, 1.0, budget)
    count = photo_logits.shape[0]
    assert isinstance(solution, BudgetSolution) and solution.budget == budget
    assert solution.reachable == pytest.approx((0.21, 1.01))
    assert abs(solution.fraction - budget) <= min(0.02, STEP / count / 2 + 1e-12)
    assert solution.fraction == pytest.approx(routed_fraction(solution.labels, COSTS, 1.0, 3))
    # every patch takes its choice just below or just above eta*
    below = cost_aware_labels(photo_logits, COSTS, solution.eta - 1e-6)
    above = cost_aware_labels(photo_logits, COSTS, solution.eta + 1e-6)
    assert ((solution.labels == below) | (solution.labels == above)).all()


def test_solve_budget_splits_tied_patches_by_index():
    logits = torch.tensor([[0.0, 1.0, 2.0]]).repeat(100, 1)  # 100 identical patches
    solution = solve_budget(logits, COSTS, 1.0, 0.5)
    # all switch 2 -> 1 at eta* = 1 / (0.55 / 1.01); 1.01 - k * 0.0055 is closest to 0.5 for k = 93
    assert solution.eta == pytest.approx(1.01 / 0.55, abs=1e-6)
    assert solution.labels.tolist() == [1] * 93 + [2] * 7
    assert solution.fraction == pytest.approx(1.01 - 93 * 0.0055)
    assert abs(solution.fraction - 0.5) <= 0.0055 / 2


@pytest.mark.parametrize('budget, label, end', [(0.1, 0, 0.21), (1.5, 2, 1.01)])
def test_unreachable_budget_clamps_and_warns(photo_logits, budget, label, end):
    with pytest.warns(UserWarning, match=r'reachable range \[0\.21, 1\.01\]'):
        solution = solve_budget(photo_logits, COSTS, 1.0, budget)
    assert (solution.labels == label).all() and solution.fraction == pytest.approx(end)
    assert torch.equal(cost_aware_labels(photo_logits, COSTS, solution.eta), solution.labels)


def test_budget_at_the_end_of_the_range_does_not_warn(photo_logits):
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        solution = solve_budget(photo_logits, COSTS, 1.0, 1.01)
    assert (solution.labels == 2).all() and solution.fraction == pytest.approx(1.01)


@pytest.mark.parametrize('budget', [0.0, -0.5, math.nan, math.inf])
def test_invalid_budget_raises(photo_logits, budget):
    with pytest.raises(ValueError, match='budget'):
        solve_budget(photo_logits, COSTS, 1.0, budget)


# ----------------------------------------------------------------------------------------------
# solve_shared_eta: one eta over many images


def set_fraction(images: list, costs=COSTS):
    """eta -> the mean cost of every tile of every image (all tiles weigh the same)."""
    return lambda eta: float(
        np.mean(np.concatenate([np.asarray(costs)[cost_aware_labels(lg, costs, eta).numpy()] for lg in images])))


@pytest.mark.parametrize('budget', [0.3, 0.55, 0.8])
def test_shared_eta_is_the_most_expensive_routing_within_the_budget(photo_logits, budget):
    images = list(photo_logits.split([40, len(photo_logits) - 40]))
    fraction = set_fraction(images)
    solution = solve_shared_eta(fraction, budget, eta_limit(images, COSTS))
    assert solution.fraction == fraction(solution.eta) <= budget
    # a hair more expensive (smaller eta) already exceeds the budget: nothing affordable was left out
    assert fraction(solution.eta - 1e-9 * max(1.0, abs(solution.eta))) > budget
    assert solution.fraction > budget - STEP / len(photo_logits)  # within one tile's cost step of the budget


def test_shared_eta_gives_the_image_that_needs_the_backbone_more_of_it():
    """Two images, one whose tiles the classifier is sure need the backbone, one it finds easy: one eta over
    both spends the budget where it is needed, unlike the same budget met per image."""
    hard = torch.tensor([[0.0, 0.0, 3.0]]).repeat(10, 1)
    easy = torch.tensor([[0.0, 3.0, 0.0]]).repeat(10, 1) + torch.linspace(0, 1, 10)[:, None] * torch.tensor([0, 0, 1])
    solution = solve_shared_eta(set_fraction([hard, easy]), 0.75)
    labels_hard, labels_easy = (cost_aware_labels(lg, COSTS, solution.eta) for lg in (hard, easy))
    assert (labels_hard == 2).all() and (labels_easy == 1).all()
    per_image = [solve_budget(lg, COSTS, 1.0, 0.75).labels for lg in (hard, easy)]
    assert (per_image[0] == 2).sum() < 10  # the per-image knob takes backbone tiles from the hard image


def test_eta_limit_is_where_the_routing_stops_changing(photo_logits):
    limit = eta_limit([photo_logits[:30], photo_logits[30:]], COSTS)
    assert (cost_aware_labels(photo_logits, COSTS, limit) == 0).all()
    assert (cost_aware_labels(photo_logits, COSTS, -limit) == 2).all()


@pytest.mark.parametrize('limit', [None, 'computed'])
def test_shared_eta_clamps_to_the_ends(photo_logits, limit):
    calls = []
    fraction = set_fraction([photo_logits])

    def counted(eta):
        calls.append(eta)
        return fraction(eta)

    bound = eta_limit([photo_logits], COSTS) if limit else None
    with pytest.warns(UserWarning, match='below the cheapest routing'):
        cheapest = solve_shared_eta(counted, 0.1, bound)
    assert (cost_aware_labels(photo_logits, COSTS, cheapest.eta) == 0).all()
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        dearest = solve_shared_eta(counted, 1.2, bound)
    assert (cost_aware_labels(photo_logits, COSTS, dearest.eta) == 2).all() and dearest.fraction <= 1.2
    if limit:  # two evaluations per unreachable budget, not a thousand doublings
        assert len(calls) <= 6


@pytest.mark.parametrize('budget', [0.0, -0.5, math.nan, math.inf])
def test_shared_eta_rejects_invalid_budgets(budget):
    with pytest.raises(ValueError, match='budget'):
        solve_shared_eta(lambda eta: 0.5, budget)


# ----------------------------------------------------------------------------------------------
# forced_mix_labels


def test_forced_mix_gives_exact_counts_in_score_order():
    scores = torch.from_numpy(np.random.default_rng(3).random(10))
    labels = forced_mix_labels(scores, [0.25, 0.25, 0.5])  # cumulative 2.5 -> 3, 5, 10
    assert labels.bincount(minlength=3).tolist() == [3, 2, 5]
    for k in range(2):
        assert scores[labels == k].max() < scores[labels == k + 1].min()
    assert forced_mix_labels(torch.zeros(7), [1 / 3, 1 / 3, 1 / 3]).tolist() == [0, 0, 1, 1, 1, 2, 2]  # ties by index


@pytest.mark.parametrize('mix', [[0.5, 0.6], [-0.1, 1.1], [], [math.nan, 1.0]])
def test_forced_mix_rejects_bad_mix(mix):
    with pytest.raises(ValueError, match='mix'):
        forced_mix_labels(torch.zeros(4), mix)
