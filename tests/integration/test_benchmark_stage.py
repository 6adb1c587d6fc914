"""tools/benchmark_stage.py: the stage it runs and the time it reads from a training log."""
import sys

import pytest

from helpers import REPO

sys.path.insert(0, str(REPO / 'tools'))
import benchmark_stage  # noqa: E402


def test_only_the_named_stage_runs_at_the_batch_and_cache_asked(training_data):
    opt = benchmark_stage.stage_options(REPO / 'options' / 'demo' / 'train_CDNSR_FSRCNN_demo.yml', 'classifier',
                                        training_data[0], 96, 50, 8.0, 0)
    stages = opt['train']['stages']
    assert [s['name'] for s in stages] == ['classifier'] and stages[0]['iters'] == opt['train']['total_iter'] == 50
    assert stages[0]['routing'] == 'gumbel' and opt['train']['branch_cache_gb'] == 8.0
    assert opt['datasets']['train']['batch_size_per_gpu'] == 96 and 'val' not in opt['datasets']


def test_seconds_per_iteration_come_from_the_log_timestamps_after_the_warmup():
    log = '\n'.join(f'2026-12-03 21:00:{10 + i:02d},500 INFO: [x..][epoch:  0, iter:   {it:,}, lr:(1e-3,)] l: 1'
                    for i, it in enumerate([10, 20, 1000, 1010, 1030]))
    assert benchmark_stage.seconds_per_iteration(log, 1000) == (pytest.approx(2 / 30), 30)
    with pytest.raises(SystemExit, match='raise --iters'):
        benchmark_stage.seconds_per_iteration(log, 1030)
