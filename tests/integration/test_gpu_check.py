"""The device check (``tools/gpu_check.sh``, issue 26) and its CUDA tests.

``test_cuda_*`` are the project's CUDA tests: they run on the device named by ``CDNSR_CHECK_DEVICE`` (default
``cuda``; skipped where CUDA is missing), so ``gpu_check.sh`` runs them on the GPU and ``gpu_check.sh --dry-run`` runs
the same selection on the CPU (``CDNSR_CHECK_DEVICE=cpu``; the fp16/bf16 tests then skip). The subprocess runs of
the check itself are ``slow`` (the dry-run takes about 3 minutes on a 2-core CPU).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cdnsr_plugin.inference.engine import EngineOptions, RoutedEngine
from cdnsr_plugin.utils.options import load_options, write_options
from cdnsr_plugin.utils.timing import measure

from helpers import REPO, make_net

DEVICE_ENV = 'CDNSR_CHECK_DEVICE'
SECTIONS = ('cuda-tests', 'backbones', 'batching', 'memory-8k', 'training')
NETWORKS = ('FSRCNN', 'CARN', 'SRResNet', 'RCAN')


@pytest.fixture
def device() -> torch.device:
    name = os.environ.get(DEVICE_ENV, 'cuda')
    if name.startswith('cuda') and not torch.cuda.is_available():
        pytest.skip(f'needs CUDA ({DEVICE_ENV}=cpu runs these tests on the CPU)')
    return torch.device(name)


@pytest.fixture
def exact_fp32():
    """TF32 off, so that fp32 results on the GPU compare with the CPU's at float32 precision."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def mixed_labels(engine: RoutedEngine, lr: torch.Tensor) -> torch.Tensor:
    return torch.arange(len(engine.grid(lr))) % engine.num_classes


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float().cpu(), b.float().cpu()
    return float((a - b).abs().max() / b.abs().max())


# ---------------------------------------------------------------------- the CUDA tests
@pytest.mark.parametrize('tiling', ['paper', 'regions'])
def test_cuda_routed_render_matches_the_cpu(device, exact_fp32, lr_image, tiling):
    net = make_net()
    cpu = RoutedEngine(net, EngineOptions(tiling=tiling), 'cpu')
    engine = RoutedEngine(net, EngineOptions(tiling=tiling), device)
    labels = mixed_labels(cpu, lr_image)
    sr = engine.render(lr_image.to(device), labels)
    assert sr.device.type == device.type and sr.shape == (3, 4 * 90, 4 * 120)
    assert relative_difference(sr, cpu.render(lr_image, labels)) < 1e-4
    assert next(net.parameters()).device.type == 'cpu'  # the engine worked on a copy


@pytest.mark.parametrize('tiling', ['paper', 'regions'])
def test_cuda_batched_render_equals_the_per_patch_loop(device, exact_fp32, lr_image, tiling):
    engine = RoutedEngine(make_net(), EngineOptions(tiling=tiling), device)
    lr = lr_image.to(device)
    labels = mixed_labels(engine, lr)
    assert relative_difference(engine.render(lr, labels), engine.render_loop(lr, labels)) < 1e-4


def test_cuda_tiled_backbone_equals_the_whole_image(device, exact_fp32, lr_image):
    engine = RoutedEngine(make_net(), EngineOptions(tile=32), device)
    lr = lr_image.to(device)
    assert engine.tile_choice.exact and engine.tile_choice.tile == 32  # several tiles on a 90x120 input
    assert relative_difference(engine.backbone_tiled(lr), engine.backbone_full(lr)) < 1e-4


@pytest.mark.parametrize('precision, tolerance', [('fp16', 1e-2), ('bf16', 5e-2)])
def test_cuda_half_precision_stays_close_to_fp32(device, lr_image, precision, tolerance):
    """Measured on the CPU with the backbone cast to half: 2e-3 (fp16) and 1.2e-2 (bf16) of the output's range."""
    if device.type != 'cuda':
        pytest.skip(f'{precision} runs on CUDA only')
    net = make_net()
    lr = lr_image.to(device)
    full = RoutedEngine(net, EngineOptions(), device)
    half = RoutedEngine(net, EngineOptions(precision=precision), device)
    labels = mixed_labels(full, lr)
    routed = half.render(lr, labels)
    assert routed.dtype == torch.float32 and torch.isfinite(routed).all()  # the merge accumulates in float32
    assert relative_difference(routed, full.render(lr, labels)) < tolerance
    assert relative_difference(half.backbone_full(lr), full.backbone_full(lr)) < tolerance
    assert next(net.parameters()).dtype == torch.float32


def test_cuda_measure_reports_the_peak_memory_of_a_block(device):
    """CUDA: allocated tensors (reset at entry); CPU: the process's resident set. A 64 MiB tensor must show."""
    with measure(device) as baseline:
        pass
    with measure(device) as m:
        block = torch.ones(16 * 2**20, device=device)  # 64 MiB of float32, written
        block += 1
    assert m.memory_kind == ('cuda_allocated' if device.type == 'cuda' else 'process_rss')
    assert m.seconds > 0 and float(block[0]) == 2.0
    floor = 0.0 if device.type == 'cuda' else baseline.peak_memory_mb
    assert m.peak_memory_mb - floor >= 60


# ---------------------------------------------------------------------- the check itself
def gpu_check(*args: str, cwd: Path = REPO, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, 'CUDA_VISIBLE_DEVICES': '', 'PYTHONPATH': str(REPO), 'PYTHON': sys.executable}
    return subprocess.run(['bash', str(REPO / 'tools' / 'gpu_check.sh'), *args],
                          cwd=cwd,
                          env=env,
                          capture_output=True,
                          text=True,
                          timeout=timeout)


def rows_by_item(report: dict, section: str) -> dict:
    return {row['item']: row for row in report['rows'] if row['section'] == section}


@pytest.mark.slow
def test_the_dry_run_passes_every_section_with_sane_values(tmp_path):
    out = tmp_path / 'check.json'
    result = gpu_check('--dry-run', '--json', str(out))
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-6000:]
    table = result.stdout
    assert 'PASSED' in table and 'FAIL' not in table
    for name in SECTIONS + NETWORKS:
        assert name in table, name
    report = json.loads(out.read_text())
    assert report['passed'] and report['mode'].startswith('dry-run') and 0 < report['wall_s'] < report['budget_s']
    assert all(report['sections'][section] > 0 for section in SECTIONS)

    tests = rows_by_item(report, 'cuda-tests')['pytest -k test_cuda_']
    assert tests['status'] == 'PASS' and tests['data']['counts']['passed'] >= 6 and tests['data']['device'] == 'cpu'

    backbones = rows_by_item(report, 'backbones')
    for name in NETWORKS:
        row = backbones[f'{name} fp32']
        assert row['status'] == 'PASS', row
        assert all(row['data'][key] > 0 for key in ('routed_s', 'full_s', 'tiled_s', 'patch_s', 'classify_s'))
        # the forced mix routes 40% of the cells past the backbone; RCAN's halo of 16 px on its regions costs more
        # than that against the whole image (tools/gpu_check.py), not against the backbone on the papers' tiles
        assert 0 < row['data']['flops_ratio_patch']['paper'] < 1, row
        assert row['data']['flops_ratio_full']['paper'] < 1 or name == 'RCAN', row
        assert row['data']['counts'][0] > row['data']['counts'][2]
        assert backbones[f'{name} fp16']['status'] == 'SKIP' and 'CPU' in backbones[f'{name} fp16']['result']

    for name, row in rows_by_item(report, 'batching').items():
        assert row['status'] == 'PASS' and row['data']['batched_s'] > 0 and row['data']['loop_s'] > 0, row
        assert row['data']['relative_difference'] < 1e-4 and row['data']['tiles'] >= 4

    memory = rows_by_item(report, 'memory-8k')
    for name in NETWORKS:
        data = memory[f'{name} fp32']['data']
        assert all(data[f'{what}_peak_mb'] > 0 and data[f'{what}_s'] > 0 for what in ('routed', 'whole', 'tiled'))

    training = [row for row in report['rows'] if row['section'] == 'training']
    assert [row['status'] for row in training] == ['PASS', 'PASS'], training
    data = training[1]['data']
    assert data['finished'] and data['last_iter'] == data['total_iter'] == 4
    assert data['stages_run'] == data['stages'] == 4 and data['it_per_s'] > 0


@pytest.mark.slow
def test_a_failing_section_is_reported_with_its_reason(tmp_path):
    """A training option error: the section fails with the option checker's message, the rest is not selected."""
    opt = load_options(REPO / 'options' / 'train_CDNSR_RCAN.yml')
    opt['train']['stages'][1]['losses']['no_such_loss'] = 1
    broken = write_options(tmp_path / 'broken.yml', opt)
    out = tmp_path / 'check.json'
    result = gpu_check('--dry-run', '--only', 'training', '--train-options', str(broken), '--json', str(out))
    assert result.returncode == 1, result.stdout + result.stderr
    assert 'FAILED' in result.stdout and 'no_such_loss' in result.stdout
    report = json.loads(out.read_text())
    rows = {(row['section'], row['item']): row for row in report['rows']}
    failed = rows[('training', 'broken.yml x4')]
    assert failed['status'] == 'FAIL' and 'exited with status 2' in failed['result'], failed
    assert rows[('training', 'prepare data')]['status'] == 'PASS'
    assert all(rows[(section, '-')]['status'] == 'SKIP' for section in SECTIONS if section != 'training')


@pytest.mark.slow
def test_a_spent_budget_skips_the_remaining_sections_and_fails(tmp_path):
    out = tmp_path / 'check.json'
    result = gpu_check('--dry-run', '--max-minutes', '0', '--json', str(out), timeout=300)
    assert result.returncode == 1 and 'BUDGET' in result.stdout
    rows = json.loads(out.read_text())['rows']
    assert {row['section'] for row in rows} == set(SECTIONS)
    assert all(row['status'] == 'BUDGET' and 'budget' in row['result'] for row in rows), rows
