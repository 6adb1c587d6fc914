"""tools/fit_router.py: the targets are the engine's per-cell errors, the GainRouter's scores drive the cost knob
as the oracle's rule with predicted errors, a fit learns to rank real cells, and the written model loads."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from basicsr.utils import tensor2img
from scipy.stats import spearmanr

from cdnsr_plugin import weights
from cdnsr_plugin.analysis.router_fit import (CellData, cell_errors, collect_cells, fit_router, routed_state,
                                              target_gains, with_router)
from cdnsr_plugin.analysis.routing import _luma
from cdnsr_plugin.analysis.run import load_routed
from cdnsr_plugin.archs.gain_router_arch import GainRouter
from cdnsr_plugin.inference.engine import EngineOptions, RoutedEngine
from cdnsr_plugin.inference.laplacian import laplacian_scores
from cdnsr_plugin.inference.policies import cost_aware_labels
from cdnsr_plugin.tester.config import network_options
from cdnsr_plugin.utils.image import bicubic_resize, to_tensor
from cdnsr_plugin.utils.io import write_image

from helpers import make_net

REPO = Path(__file__).resolve().parents[2]


def load_tool(name: str = 'fit_router'):
    spec = importlib.util.spec_from_file_location(f'{name}_tool', REPO / 'tools' / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cell_errors_add_up_to_each_branch_on_the_whole_image(photos):
    engine = RoutedEngine(make_net(), EngineOptions())
    gt = np.ascontiguousarray(photos[0][:200, :280])  # LR 50x70: the last cell row and column are narrower
    lr = to_tensor(bicubic_resize(gt, 0.25))
    cells, se_y, se_rgb, pixels = cell_errors(engine, lr, gt)
    assert cells.shape == (6, 3, 32, 32) and cells.dtype == np.uint8 and pixels.sum() == 200 * 280
    assert np.array_equal(cells[0], (lr[:, :32, :32] * 255).round().to(torch.uint8).numpy())
    target = torch.from_numpy(gt[..., ::-1].copy()).permute(2, 0, 1).double()
    for branch in range(3):
        sr = torch.from_numpy(tensor2img(engine.branch_full(lr, branch), rgb2bgr=False).astype(np.float64))
        sr = sr.permute(2, 0, 1)
        assert se_y[:, branch].sum() == pytest.approx(
            float(((_luma(sr / 255) - _luma(target / 255))**2).sum()), rel=1e-6)
        assert se_rgb[:, branch].sum() == pytest.approx(float(((sr - target)**2).mean(0).sum()), rel=1e-6)


def test_gain_router_scores_make_the_knob_the_oracle_rule_with_predicted_errors():
    torch.manual_seed(0)
    router = GainRouter(num_classes=3, num_feat=4).eval()
    router.gain_scale.fill_(7.0)
    x = torch.rand(64, 3, 32, 32)
    with torch.no_grad():
        scores = router(x)
        gains = router.gains(x) * 7.0
    assert scores.shape == (64, 3) and bool((scores[:, 0] == 0).all())
    assert torch.allclose(scores[:, 2] - scores[:, 1], gains[:, 1], atol=1e-5)
    costs = torch.tensor([1.0, 3.0, 6.0], dtype=torch.float64)
    for eta in (-5.0, 0.0, 0.3, 2.0, 50.0):
        # predicted error of branch j relative to branch 0: -scores_j; the oracle's rule argmin(error + eta * c / c_max)
        expected = (-scores.double() + eta * costs / costs.max()).argmin(dim=1)
        assert torch.equal(cost_aware_labels(scores, costs.tolist(), eta), expected)


@pytest.fixture(scope='module')
def shipped_cells(photos, tmp_path_factory):
    """The shipped cdnsr_carn_x4's errors on every cell of three scikit-image photos (and their 90-degree turns)."""
    folder = tmp_path_factory.mktemp('photos')
    for index, photo in enumerate(photos[:3]):
        write_image(folder / f'p{index}.png', photo)
    net = load_routed(network_options(weights.FOLDER / 'cdnsr_carn_x4.yml'), weights.checkpoint('cdnsr_carn_x4'))
    data, failures = collect_cells(net, sorted(folder.glob('*.png')), scales=(1.0, ), rotations=2)
    assert not failures
    return net, folder, data


def test_a_fit_ranks_its_cells_by_the_backbone_gain_better_than_the_edge_energy(shipped_cells):
    """A property that fails if targets and cells were misaligned (shuffled, flipped sign, wrong branch order):
    on the cells it was fitted on the router ranks the backbone's gain over the smallest branch better than the
    Laplacian edge energy (one of its own inputs) does."""
    _, _, data = shipped_cells
    result = fit_router(data, 3, epochs=40, num_feat=8, hidden=32, batch=64)
    assert result.history[-1] < 0.5 * result.history[0]
    cells = torch.from_numpy(data.cells).float() / 255
    with torch.no_grad():
        predicted = result.router(cells)[:, -1].numpy()
    mse = data.mse('y')
    true_gain = mse[:, 0] - mse[:, -1]
    edge = laplacian_scores(cells).numpy()
    fitted = spearmanr(predicted, true_gain).statistic
    assert fitted > spearmanr(edge, true_gain).statistic and fitted > 0.6
    # and the gains it predicts are in MSE units: the same order of magnitude as the true ones
    assert 0.2 < np.abs(predicted).mean() / np.abs(true_gain).mean() < 5
    assert target_gains(mse, 'l2').shape == (len(mse), 2)


def test_the_tool_writes_a_model_that_loads_with_the_branches_unchanged(shipped_cells, tmp_path):
    net, folder, data = shipped_cells
    data.save(tmp_path / 'cells.npz')
    assert np.array_equal(CellData.load(tmp_path / 'cells.npz').se_y, data.se_y)
    out = tmp_path / 'fit'
    tool = load_tool()
    code = tool.main([
        '--checkpoint',
        str(weights.checkpoint('cdnsr_carn_x4')), '--network',
        str(weights.FOLDER / 'cdnsr_carn_x4.yml'), '--cells',
        str(tmp_path / 'cells.npz'), '--out',
        str(out), '--epochs', '2', '--num-feat', '4'
    ])
    assert code == 0
    fitted = load_routed(network_options(out / 'network.yml'), out / 'net_g.pth')
    assert isinstance(fitted.classifier, GainRouter)
    for mine, theirs in zip(fitted.branches.state_dict().items(), net.branches.state_dict().items()):
        assert mine[0] == theirs[0] and torch.equal(mine[1], theirs[1])
    # a second fit into the same folder is refused: nothing written there is replaced
    before = (out / 'net_g.pth').read_bytes()
    assert tool.main(['--checkpoint', 'x', '--network', 'y', '--cells', 'z', '--out', str(out)]) == 2
    assert (out / 'net_g.pth').read_bytes() == before


def test_compare_routers_scores_routers_of_one_set_of_branches_on_the_same_cells(shipped_cells, tmp_path):
    net, folder, data = shipped_cells
    router = fit_router(data, 3, epochs=2, num_feat=0, hidden=16).router
    state = routed_state(net, router)
    fitted = load_routed(with_router(net_options(), router, 0, 16), None)
    fitted.load_state_dict(state)
    torch.save({'params': fitted.state_dict()}, tmp_path / 'fit.pth')
    (tmp_path / 'fit.yml').write_text(
        yaml.safe_dump({'network_g': json.loads(json.dumps(with_router(net_options(), router, 0, 16)))}))
    lr_dir, hr_dir = weights.write_check_pair(tmp_path / 'pair')
    compare = load_tool('compare_routers')
    shipped = f"shipped={weights.FOLDER / 'cdnsr_carn_x4.yml'}:{weights.checkpoint('cdnsr_carn_x4')}"
    out = tmp_path / 'routers.json'
    assert compare.main([
        '--model', shipped, '--model', f"fit={tmp_path / 'fit.yml'}:{tmp_path / 'fit.pth'}", '--lr',
        str(lr_dir), '--gt',
        str(hr_dir), '--budgets', '0.6', '--json',
        str(out)
    ]) == 0
    results = json.loads(out.read_text())['results']
    a, b = results['shipped']['budgets'][0], results['fit']['budgets'][0]
    # one collection of the branches: the oracle and the Laplacian router are the same for both models
    assert a['oracle_psnr'] == b['oracle_psnr'] and a['laplacian_psnr'] == b['laplacian_psnr']
    for row in (a, b):
        assert row['learned_regret'] == pytest.approx(row['oracle_psnr'] - row['learned_psnr'])
    # routers of other branches are refused, naming the model
    long = f"long={weights.FOLDER / 'cdnsr_carn_x4_long.yml'}:{weights.checkpoint('cdnsr_carn_x4_long')}"
    assert compare.main(['--model', shipped, '--model', long, '--lr', str(lr_dir), '--gt', str(hr_dir)]) == 2


def net_options():
    return network_options(weights.FOLDER / 'cdnsr_carn_x4.yml')
