"""Editing option files in code (the demo, the reproduction script and the tests start from shipped files)."""
import pytest

from cdnsr_plugin.utils.options import load_options, set_data, set_logging, set_schedule, write_options

from helpers import REPO


def test_schedule_data_and_logging_of_a_staged_file(tmp_path):
    opt = load_options(REPO / 'options' / 'demo' / 'train_CDNSR_FSRCNN_demo.yml')
    assert set_schedule(opt, [3, 4, 5, 6, 7]) == 25
    assert [stage['iters'] for stage in opt['train']['stages']] == [3, 4, 5, 6, 7] and opt['train']['total_iter'] == 25
    assert set_schedule(opt, 2) == 10
    with pytest.raises(ValueError, match='3 stage lengths for 5 stages'):
        set_schedule(opt, [1, 2, 3])
    set_data(opt, train=('t/lq.lmdb', 't/gt.lmdb'), val=('v/lq', 'v/gt'), batch=5)
    train, val = opt['datasets']['train'], opt['datasets']['val']
    assert (train['dataroot_lq'], train['dataroot_gt'], train['batch_size_per_gpu']) == ('t/lq.lmdb', 't/gt.lmdb', 5)
    assert (val['dataroot_lq'], val['dataroot_gt']) == ('v/lq', 'v/gt')
    set_logging(opt, print_freq=7, val_freq=9, tensorboard=False)
    assert opt['logger']['print_freq'] == 7 and opt['val']['val_freq'] == 9 and opt['logger']['use_tb_logger'] is False
    assert load_options(write_options(tmp_path / 'x.yml', opt)) == opt


def test_schedule_of_a_single_stage_file_sets_the_scheduler_period():
    opt = load_options(REPO / 'options' / 'demo' / 'train_FSRCNN_demo.yml')
    assert set_schedule(opt, 40) == 40
    assert opt['train']['total_iter'] == 40 and opt['train']['scheduler']['periods'] == [40]


def test_a_stage_lr_period_keeps_its_ratio_to_the_stage_when_the_schedule_changes():
    """ClassSR's classifier stage decays over 2.5 x its length (the reference's 200k of a 500k period): a shorter
    or longer run keeps that shape instead of a fixed period that would decay a short stage not at all."""
    opt = load_options(REPO / 'options' / 'demo' / 'train_ClassSR_FSRCNN_demo.yml')
    stages = opt['train']['stages']
    ratio = stages[1]['lr_period'] / stages[1]['iters']
    assert ratio == 2.5 and 'lr_period' not in stages[2]
    set_schedule(opt, [10, 40, 7])
    assert stages[1]['lr_period'] == 100 and 'lr_period' not in stages[2]
    set_schedule(opt, 3)
    assert stages[1]['lr_period'] == 8  # 2.5 x 3, rounded
