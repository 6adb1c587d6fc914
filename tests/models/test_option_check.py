"""Training option errors are all reported at once, before BasicSR creates the experiment folder
(``cdnsr_plugin.models.option_check``): the eleven bad option sets of the hostile-input battery, in process;
both entries in a subprocess."""
import copy
import shutil
from pathlib import Path

import basicsr
import pytest
import torch
from basicsr.archs import build_network

from cdnsr_plugin.models.option_check import check_training_options
from cdnsr_plugin.utils.options import write_options

from helpers import demo_options, run

DEMO = 'train_CDNSR_FSRCNN_demo.yml'


@pytest.fixture(scope='module')
def good(training_data) -> dict:
    opt = demo_options(DEMO, 'checked', *training_data)
    opt.update(auto_resume=False, is_train=True)
    return opt


def two_branch_checkpoint(path: Path, good: dict) -> Path:
    net_opt = copy.deepcopy(good['network_g'])
    net_opt['branches'] = net_opt['branches'][:2]
    net_opt['classifier']['num_classes'] = 2
    torch.save({'params': build_network(net_opt).state_dict()}, path)
    return path


def relabelled(root: Path, train_set: Path) -> Path:
    """A copy of the set's labels.txt whose first label is 7 (the set has 3 classes)."""
    lines = (train_set / 'labels.txt').read_text().splitlines()
    key, _, psnr = lines[0].split()
    lines[0] = f'{key} 7 {psnr}'
    (root / 'labels.txt').write_text('\n'.join(lines) + '\n')
    return root / 'labels.txt'


def stage(opt: dict, i: int) -> dict:
    return opt['train']['stages'][i]


CASES = {
    'no network_g': (lambda o, t: o.pop('network_g'), 'network_g is missing'),
    'stages as a string': (lambda o, t: o['train'].update(stages='pretrain'), 'train.stages must be a non-empty list'),
    "total_iter 'forty'": (lambda o, t: o['train'].update(total_iter='forty'),
                           "train.total_iter must be a positive integer, got 'forty'"),
    'iters -5': (lambda o, t: stage(o, 0).update(iters=-5), 'train.stages[0].iters must be a positive integer'),
    'iters 0': (lambda o, t: stage(o, 0).update(iters=0), 'train.stages[0].iters must be a positive integer'),
    "iters '10'": (lambda o, t: stage(o, 0).update(iters='10'), "got '10'"),
    'unknown stage': (lambda o, t: stage(o, 1).update(name='warmup'), "train.stages[1].name 'warmup' is not one of"),
    'alpha 1.5': (lambda o, t: o['train']['losses']['flops'].update(alpha=1.5), 'train.losses.flops:'),
    'alpha 0': (lambda o, t: o['train']['losses']['flops'].update(alpha=0), 'train.losses.flops:'),
    'alpha nan': (lambda o, t: o['train']['losses']['flops'].update(alpha=float('nan')), 'train.losses.flops:'),
    "alpha '0.5'": (lambda o, t: o['train']['losses']['flops'].update(alpha='0.5'), 'train.losses.flops:'),
    'branch scale': (lambda o, t: o['network_g']['branches'][1].update(upscale=2), 'upscales x2'),
    'class count': (lambda o, t: o['network_g']['classifier'].update(num_classes=4),
                    'branches has 3 entries but classifier.num_classes is 4'),
    'routing typo': (lambda o, t: stage(o, 2).update(routing='gumble'), 'train.stages[2].routing must be one of'),
    'tau typo': (lambda o, t: stage(o, 2).update(tau=[0.4, 1.0]), 'train.stages[2].tau must be [start, min]'),
    'loss name typo': (lambda o, t: stage(o, 0).update(losses={'pixle': 1}),
                       'train.stages[0].losses.pixle is not configured'),
    'part name typo': (lambda o, t: stage(o, 0).update(train=['branch']), 'train.stages[0].train must list parts'),
    'checkpoint part typo': (lambda o, t: o['path'].update(pretrain_network_clasifier=str(t / 'x.pth')),
                             'path.pretrain_network_clasifier: the network has parts'),
    'NaN loss weight': (lambda o, t: stage(o, 0).update(losses={'pixel': float('nan')}),
                        'train.stages[0].losses.pixel: the weight must be a finite number'),
    'missing dataroot': (lambda o, t: o['datasets']['train'].update(dataroot_gt=str(t / 'nowhere.lmdb')),
                         'nowhere.lmdb does not exist'),
    '2-branch checkpoint as pretrain_network_g': (
        lambda o, t: o['path'].update(pretrain_network_g=str(two_branch_checkpoint(t / 'two.pth', o))),
        'path.pretrain_network_g: checkpoint'),
    'unknown optimizer': (lambda o, t: o['train']['optim_g'].update(type='Adamm'),
                          "train.optim_g.type: 'Adamm' is not an optimizer CDNSRModel builds"),
    'unknown scheduler': (lambda o, t: o['train']['scheduler'].update(type='StepLR'),
                          'train.scheduler.type must be one of MultiStepLR, MultiStepRestartLR, '
                          "CosineAnnealingRestartLR (BasicSR's schedulers), got 'StepLR'"),
    'NaN loss_weight in train.losses': (lambda o, t: o['train']['losses']['pixel'].update(loss_weight=float('nan')),
                                        'train.losses.pixel.loss_weight must be a finite number, got nan'),
    'text inside tau': (lambda o, t: stage(o, 2).update(tau=['x', 0.4]), "train.stages[2].tau must be [start, min]"),
    'misspelled stage keys': (lambda o, t: stage(o, 1).update(routnig='hard', trian=['branches']),
                              'train.stages[1]: unknown key(s) routnig, trian (a stage takes name, iters, losses'),
    'label outside the classes': (lambda o, t: o['datasets']['train'].update(
        label_file=str(relabelled(t,
                                  Path(o['datasets']['train']['dataroot_lq']).parent))), 'label 7 of'),
}


def test_the_demo_options_pass(good):
    assert check_training_options(copy.deepcopy(good)) == []


@pytest.mark.parametrize('case', CASES)
def test_each_bad_option_set_is_named(case, good, tmp_path):
    opt = copy.deepcopy(good)
    edit, expected = CASES[case]
    edit(opt, tmp_path)
    errors = check_training_options(opt)
    assert any(expected in error for error in errors), errors
    if case.startswith('alpha'):  # the failed loss is still configured: no second, misleading message
        assert 'alpha' in ' '.join(errors) and not any('not configured' in error for error in errors), errors


def test_every_problem_comes_in_one_list(good, tmp_path):
    opt = copy.deepcopy(good)
    for case in ('alpha 1.5', 'iters 0', 'missing dataroot'):
        CASES[case][0](opt, tmp_path)
    errors = check_training_options(opt)
    assert len(errors) == 3, errors


def test_checking_leaves_basicsrs_logger_for_the_run(good):
    """BasicSR configures its root logger once; the check must not take that from the run's log file."""
    from basicsr.utils import logger
    before = dict(logger.initialized_logger)
    check_training_options(copy.deepcopy(good))
    assert logger.initialized_logger == before


@pytest.mark.slow
@pytest.mark.parametrize('entry', ['plugin', 'stock'])
def test_both_entries_stop_with_one_message_before_any_folder(entry, good, tmp_path):
    opt = copy.deepcopy(good)
    for case in ('alpha 1.5', 'iters 0', 'missing dataroot'):
        CASES[case][0](opt, tmp_path)
    options = write_options(tmp_path / 'bad.yml', opt)
    if entry == 'stock':
        (tmp_path / 'basicsr').mkdir()
        shutil.copy(Path(basicsr.__file__).parent / 'train.py', tmp_path / 'basicsr' / 'train.py')
        args = ['basicsr/train.py', '-opt', str(options)]
    else:
        args = ['-m', 'cdnsr_plugin.train', '-opt', str(options)]
    result = run(args, cwd=tmp_path, check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    assert '3 problem(s) in the training options' in result.stderr
    assert 'Traceback' not in result.stderr
    assert not (tmp_path / 'experiments').exists() and not (tmp_path / 'tb_logger').exists()
