"""Tests for cdnsr_plugin.routing.routers: the cost knob, the budget solver and the Laplacian router."""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from cdnsr_plugin.routing.patches import decompose
from cdnsr_plugin.routing.routers import (BudgetSolution, LaplacianRouter, cost_aware_labels, forced_mix_labels,
                                          laplacian_scores, routed_fraction, solve_budget)

COSTS = [0.21, 0.46, 1.01]  # branches 0.2 / 0.45 / 1.0 of the largest, plus a 0.01 classifier
STEP = (COSTS[-1] - COSTS[0]) / 1.0  # the largest change of one patch's cost, relative to largest = 1


@pytest.fixture(scope='module')
def photo_tiles(photos) -> torch.Tensor:
    """221 tiles (32 / 28) of a 360x480 crop of a real photo, RGB in [0, 1]."""
    photo = photos[0]
    y, x = photo.shape[0] // 3, photo.shape[1] // 3
    crop = photo[y:y + 360, x:x + 480, ::-1].astype(np.float32) / 255.0
    tiles, _ = decompose(torch.from_numpy(crop.copy()).permute(2, 0, 1).contiguous(), 32, 28)
    return tiles


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


@pytest.fixture(scope='module')
def prepared(tmp_path_factory, photos) -> Path:
    """A real prepared set (bicubic reference, 3 classes, sub-images of three bundled photos)."""
    from training_helpers import make_train_set
    return make_train_set(tmp_path_factory.mktemp('prepared'), photos)


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
# laplacian_scores


def test_laplacian_constant_tile_is_zero_and_impulse_has_hand_value():
    assert laplacian_scores(torch.full((2, 3, 8, 8), 0.37)).abs().max() < 1e-6
    impulse = torch.zeros(1, 3, 3, 3)
    impulse[0, :, 1, 1] = 1.0  # Y: 235/255 at the centre, 16/255 around it -> |4*16 - 4*235| / 255
    assert laplacian_scores(impulse).item() == pytest.approx(876 / 255, rel=1e-6)


def test_laplacian_ranks_checkerboard_above_gradient():
    ramp = torch.linspace(0, 1, 32).view(1, 1, 1, 32).expand(1, 3, 32, 32)
    checker = ((torch.arange(32).view(-1, 1) + torch.arange(32)) % 2).float().expand(1, 3, 32, 32)
    gradient_score, checker_score = laplacian_scores(torch.cat([ramp, checker])).tolist()
    assert gradient_score < 1e-5  # linear: zero Laplacian
    assert checker_score == pytest.approx(4 * 219 / 255, rel=1e-6)  # |4 * (+-219/255)| everywhere


def test_laplacian_matches_basicsr_y_channel_on_real_tiles(photo_tiles):
    from basicsr.utils.color_util import rgb2ycbcr
    tiles = photo_tiles[:16]
    expected = []
    for tile in tiles.permute(0, 2, 3, 1).numpy():
        y = rgb2ycbcr(tile, y_only=True).astype(np.float64)
        lap = y[:-2, 1:-1] + y[2:, 1:-1] + y[1:-1, :-2] + y[1:-1, 2:] - 4 * y[1:-1, 1:-1]
        expected.append(np.abs(lap).mean())
    scores = laplacian_scores(tiles)
    assert scores.dtype == torch.float32
    np.testing.assert_allclose(scores.numpy(), expected, rtol=1e-4)
    assert torch.equal(laplacian_scores(tiles[3:4]), scores[3:4])  # no cross-talk within a batch


# ----------------------------------------------------------------------------------------------
# LaplacianRouter


def synthetic(seed: int = 0, count: int = 1000, shares=(0.5, 0.3, 0.2)) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    scores = torch.from_numpy(rng.random(count))
    labels = torch.from_numpy(rng.choice(len(shares), count, p=shares))
    return scores, labels


def test_fit_reproduces_class_proportions():
    scores, labels = synthetic()
    router = LaplacianRouter.fit(scores, labels, 3)
    assert router.num_classes == 3 and list(router.thresholds) == sorted(router.thresholds)
    assert torch.equal(router.labels_from_scores(scores).bincount(minlength=3), labels.bincount(minlength=3))
    shares = labels.bincount(minlength=3).double() / len(labels)
    assert router.agreement == pytest.approx((shares ** 2).sum().item(), abs=0.05)  # independent labels: chance
    assert router.fitted_on == '1000 scores'


def test_fit_on_score_ordered_labels_agrees_fully_and_handles_empty_classes():
    scores = torch.linspace(0, 1, 90)
    labels = torch.tensor([0] * 30 + [2] * 60)
    router = LaplacianRouter.fit(scores, labels, 3)
    assert router.agreement == 1.0
    assert router.labels_from_scores(scores).bincount(minlength=3).tolist() == [30, 0, 60]
    low = LaplacianRouter.fit(scores, torch.full((90,), 2), 3)
    assert low.labels_from_scores(scores).tolist() == [2] * 90  # no score at or below an empty class's threshold


def test_router_labels_tiles_by_thresholds(photo_tiles):
    scores = laplacian_scores(photo_tiles)
    router = LaplacianRouter((float(scores.median()),))
    labels = router(photo_tiles)
    assert torch.equal(labels, (scores > scores.median()).long())  # equal to a threshold -> lower class


def test_router_save_load_round_trip(tmp_path):
    router = LaplacianRouter.fit(*synthetic(), 3, fitted_on='synthetic')
    path = router.save(tmp_path / 'router.json')
    assert path == tmp_path / 'router.json' and sorted(p.name for p in tmp_path.iterdir()) == ['router.json']
    assert LaplacianRouter.load(path) == router
    assert LaplacianRouter.from_dict(json.loads(path.read_text())) == router


def test_router_load_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match='missing.json'):
        LaplacianRouter.load(tmp_path / 'missing.json')
    broken = tmp_path / 'broken.json'
    broken.write_text(json.dumps({'agreement': 0.5}))
    with pytest.raises(ValueError, match=r"broken\.json.*'thresholds'"):
        LaplacianRouter.load(broken)
    with pytest.raises(ValueError, match='ascending'):
        LaplacianRouter((0.3, 0.1))


def test_from_prepared_fits_a_real_prepared_set(prepared):
    from cdnsr_plugin.data.difficulty_dataset import read_labels
    router = LaplacianRouter.from_prepared(prepared)
    total = json.loads((prepared / 'summary.json').read_text())['num_pairs']
    assert router.num_classes == 3 and f'{total} of {total} sub-images' in router.fitted_on
    assert router.agreement > 0.5  # well above chance (1/3): edge energy tracks bicubic difficulty (0.75 here)
    # the same fit from the sub-images read independently, through basicsr's LMDB client
    from basicsr.utils import FileClient, imfrombytes
    client = FileClient('lmdb', db_paths=[str(prepared / 'lq.lmdb')], client_keys=['lq'])
    labelled = read_labels(prepared / 'labels.txt')
    keys = sorted(labelled)
    tiles = np.stack([imfrombytes(client.get(key, 'lq'), float32=True)[..., ::-1] for key in keys])
    scores = laplacian_scores(torch.from_numpy(tiles.copy()).permute(0, 3, 1, 2))
    labels = torch.tensor([labelled[key][0] for key in keys])
    refit = LaplacianRouter.fit(scores, labels, 3)
    assert router.thresholds == pytest.approx(refit.thresholds) and router.agreement == refit.agreement
    assert torch.equal(router.labels_from_scores(scores).bincount(minlength=3), labels.bincount(minlength=3))


def test_from_prepared_subsamples_deterministically_and_validates(prepared, tmp_path):
    first = LaplacianRouter.from_prepared(prepared, max_samples=30, seed=1)
    assert first == LaplacianRouter.from_prepared(prepared, max_samples=30, seed=1)
    assert '30 of ' in first.fitted_on and 'seed 1' in first.fitted_on
    assert first.thresholds != LaplacianRouter.from_prepared(prepared, max_samples=30, seed=2).thresholds
    with pytest.raises(ValueError, match='num_classes=4'):
        LaplacianRouter.from_prepared(prepared, num_classes=4)
    with pytest.raises(FileNotFoundError, match='summary.json'):
        LaplacianRouter.from_prepared(tmp_path)


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
