"""cdnsr_plugin.inference.laplacian: edge energy, the training-free router, fitting it on a prepared set."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cdnsr_plugin.inference.laplacian import LaplacianRouter, laplacian_scores


@pytest.fixture(scope='module')
def prepared(tmp_path_factory, photos) -> Path:
    """A real prepared set (bicubic reference, 3 classes, sub-images of three bundled photos)."""
    from helpers import make_train_set
    return make_train_set(tmp_path_factory.mktemp('prepared'), photos)


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
    assert router.agreement == pytest.approx((shares**2).sum().item(), abs=0.05)  # independent labels: chance
    assert router.fitted_on == '1000 scores'


def test_fit_on_score_ordered_labels_agrees_fully_and_handles_empty_classes():
    scores = torch.linspace(0, 1, 90)
    labels = torch.tensor([0] * 30 + [2] * 60)
    router = LaplacianRouter.fit(scores, labels, 3)
    assert router.agreement == 1.0
    assert router.labels_from_scores(scores).bincount(minlength=3).tolist() == [30, 0, 60]
    low = LaplacianRouter.fit(scores, torch.full((90, ), 2), 3)
    assert low.labels_from_scores(scores).tolist() == [2] * 90  # no score at or below an empty class's threshold


def test_router_labels_tiles_by_thresholds(photo_tiles):
    scores = laplacian_scores(photo_tiles)
    router = LaplacianRouter((float(scores.median()), ))
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
    from cdnsr_plugin.data.prepared_set import read_labels
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
