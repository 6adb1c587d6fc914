"""The stage schedule of CDNSRModel (ClassSR Sec. 3.7, CDNSR Sec. III-D): parsing, stage of an iteration, tau."""
import pytest

from cdnsr_plugin.models.stages import parse_stages, stage_at

from helpers import FOUR_STAGES


def test_stage_schedule_and_tau():
    stages, errors = parse_stages(FOUR_STAGES, set(FOUR_STAGES['losses']))
    assert not errors
    assert [stage_at(stages, i).name for i in range(1, 10)] == ['pretrain'] * 2 + ['classifier'] * 2 + \
        ['distill'] * 2 + ['finetune'] * 3
    assert [s.frozen for s in stages] == ['classifier', 'branches', 'classifier', None]
    gumbel = stages[1]
    assert gumbel.tau_at(3) == 1.0 and gumbel.tau_at(4) == pytest.approx(0.5)
    long = parse_stages({'stages': [{'name': 'classifier', 'iters': 100, 'routing': 'gumbel', 'losses': {'pixel': 1}}]},
                        {'pixel'})[0][0]
    assert [long.tau_at(t) for t in (1, 41, 61, 100)] == pytest.approx([1.0, 0.6, 0.4, 0.4])  # max(0.4, 1 - t/T)
