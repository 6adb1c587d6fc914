"""CDNSRModel: stages, losses wiring, freezing, loading, errors, and real runs of the demo option files."""
import copy
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from basicsr.archs import build_network
from basicsr.models import build_model

from cdnsr_plugin.models.stages import parse_stages, stage_at
from training_helpers import (REPO, demo_options, make_train_set, make_val_set, read_log, run,
                              write_options)

FSRCNN_NET = {'type': 'CDNSRNet', 'classifier': {'type': 'PatchClassifier', 'num_classes': 3},
              'branches': [{'type': 'FSRCNN', 'd': d, 'upscale': 4} for d in (16, 36, 56)]}


@pytest.fixture(scope='module')
def data(tmp_path_factory, photos):
    root = tmp_path_factory.mktemp('training')
    return make_train_set(root / 'train', photos), make_val_set(root / 'val', photos)


def model_opt(tmp_path: Path, train_set: Path, train: dict, network: dict = FSRCNN_NET, path: dict = None) -> dict:
    """What basicsr's parse_options would hand the model, without the command line."""
    experiment = tmp_path / 'experiment'
    return {
        'name': 'unit', 'model_type': 'CDNSRModel', 'scale': 4, 'num_gpu': 0, 'is_train': True, 'dist': False,
        'rank': 0, 'world_size': 1, 'auto_resume': False, 'network_g': copy.deepcopy(network),
        'path': {'pretrain_network_g': None, 'strict_load_g': True, 'resume_state': None,
                 'models': str(experiment / 'models'), 'training_states': str(experiment / 'states'),
                 'experiments_root': str(experiment), 'log': str(experiment), **(path or {})},
        'datasets': {'train': {'name': 't', 'type': 'DifficultyPairedDataset', 'phase': 'train', 'scale': 4,
                               'dataroot_gt': str(train_set / 'gt.lmdb'), 'dataroot_lq': str(train_set / 'lq.lmdb'),
                               'io_backend': {'type': 'lmdb'}, 'gt_size': 128}},
        'train': copy.deepcopy(train), 'logger': {'print_freq': 1, 'save_checkpoint_freq': 100},
    }


FOUR_STAGES = {
    'optim_g': {'type': 'Adam', 'lr': 1e-3}, 'total_iter': 8,
    'scheduler': {'type': 'CosineAnnealingRestartLR', 'eta_min': 1e-7},
    'losses': {'pixel': {'type': 'L1Loss'}, 'flops': {'type': 'FLOPsRegLoss', 'alpha': 0.5},
               'kd': {'type': 'PixelKDLoss'}, 'class': {'type': 'ClassLoss'}, 'average': {'type': 'AverageLoss'}},
    'stages': [{'name': 'pretrain', 'iters': 2, 'losses': {'pixel': 1}},
               {'name': 'classifier', 'iters': 2, 'routing': 'gumbel', 'losses': {'pixel': 1, 'flops': 1}},
               {'name': 'distill', 'iters': 2, 'losses': {'pixel': 1, 'kd': 1}},
               {'name': 'finetune', 'iters': 2, 'losses': {'pixel': 2000, 'class': 1, 'average': 6}}],
}


def batch(train_set: Path, labels: list) -> dict:
    from cdnsr_plugin.data.difficulty_dataset import DifficultyPairedDataset
    dataset = DifficultyPairedDataset({'name': 'b', 'phase': 'val', 'scale': 4, 'io_backend': {'type': 'lmdb'},
                                       'dataroot_gt': str(train_set / 'gt.lmdb'),
                                       'dataroot_lq': str(train_set / 'lq.lmdb')})
    picks = [dataset.labels.index(label) + i for i, label in enumerate(labels)]
    items = [dataset[dataset.labels.index(label, pick)] for label, pick in zip(labels, picks)]
    return {'lq': torch.stack([it['lq'] for it in items]), 'gt': torch.stack([it['gt'] for it in items]),
            'label': torch.tensor([it['label'] for it in items])}


def snapshot(module: torch.nn.Module) -> list:
    return [p.detach().clone() for p in module.parameters()]


def changed(before: list, module: torch.nn.Module) -> bool:
    return any(not torch.equal(a, b) for a, b in zip(before, module.parameters()))


def test_stage_schedule_and_tau():
    stages, errors = parse_stages(FOUR_STAGES, set(FOUR_STAGES['losses']))
    assert not errors
    assert [stage_at(stages, i).name for i in range(1, 10)] == ['pretrain'] * 2 + ['classifier'] * 2 + \
        ['distill'] * 2 + ['finetune'] * 3
    assert [s.frozen for s in stages] == ['classifier', 'branches', 'classifier', None]
    gumbel = stages[1]
    assert gumbel.tau_at(3) == 1.0 and gumbel.tau_at(4) == pytest.approx(0.5)
    long = parse_stages({'stages': [{'name': 'classifier', 'iters': 100, 'routing': 'gumbel',
                                     'losses': {'pixel': 1}}]}, {'pixel'})[0][0]
    assert [long.tau_at(t) for t in (1, 41, 61, 100)] == pytest.approx([1.0, 0.6, 0.4, 0.4])  # max(0.4, 1 - t/T)


def test_each_stage_trains_only_its_parts(tmp_path, data):
    train_set, _ = data
    model = build_model(model_opt(tmp_path, train_set, FOUR_STAGES))
    net = model.bare_net
    # iteration -> (classifier learns, which branches learn); the batch holds class-0 samples only
    expectations = {1: (False, [True, False, False]),  # pretrain: only the branch of the labels
                    3: (True, [False, False, False]),  # classifier stage: branches frozen
                    5: (False, [True, True, None]),  # distill: classifier frozen; KD moves both students
                    7: (True, [True, True, True])}  # finetune, soft routing: everything
    for current_iter, (classifier_learns, branches_learn) in expectations.items():
        model.feed_data(batch(train_set, [0, 0, 0, 0]))
        before_c, before_b = snapshot(net.classifier), [snapshot(b) for b in net.branches]
        model.optimize_parameters(current_iter)
        assert changed(before_c, net.classifier) == classifier_learns, current_iter
        for j, expected in enumerate(branches_learn):
            if expected is not None:
                assert changed(before_b[j], net.branches[j]) == expected, (current_iter, j)
    log = model.get_current_log()
    assert {'l_pixel', 'l_class', 'l_average', 'l_total', 'cls0', 'cls1', 'cls2', 'flops_pct', 'stage'} <= set(log)
    assert log['stage'] == 4 and 0 < log['flops_pct'] <= 100


def test_new_stage_starts_with_fresh_optimizer_moments(tmp_path, data):
    """A branch that a new stage does not reach must not move: Adam's first moment from the previous stage
    would otherwise keep stepping it (zero gradients still give lr * m / sqrt(v))."""
    train_set, _ = data
    train = {'optim_g': {'type': 'Adam', 'lr': 1e-2}, 'total_iter': 4,
             'scheduler': {'type': 'CosineAnnealingRestartLR', 'eta_min': 1e-7},
             'losses': {'pixel': {'type': 'L1Loss'}},
             'stages': [{'name': 'pretrain', 'iters': 2, 'losses': {'pixel': 1}},
                        {'name': 'finetune', 'iters': 2, 'routing': 'gumbel', 'losses': {'pixel': 1}}]}
    model = build_model(model_opt(tmp_path, train_set, train, dict(FSRCNN_NET, hard_gumbel=True)))
    net = model.bare_net
    for current_iter in (1, 2):  # branch 0 learns from class-0 samples and builds up Adam moments
        model.feed_data(batch(train_set, [0, 0, 0, 0]))
        model.optimize_parameters(current_iter)
    with torch.no_grad():  # the classifier sends everything to branch 2: branch 0 gets exactly zero gradients
        net.classifier.lastOut.bias.copy_(torch.tensor([-1e4, -1e4, 1e4]))
    before_0, before_2 = snapshot(net.branches[0]), snapshot(net.branches[2])
    model.feed_data(batch(train_set, [0, 0, 0, 0]))
    model.optimize_parameters(3)
    assert not changed(before_0, net.branches[0])
    assert changed(before_2, net.branches[2])


def test_learning_rate_restarts_at_every_stage_start(tmp_path, data):
    """BasicSR steps the scheduler before iteration k > 1, so iteration k runs at step k - 1; the
    filled-in periods put each restart on a stage's first iteration."""
    train = copy.deepcopy(FOUR_STAGES)
    for stage in train['stages']:
        stage['iters'] = 10
    train['total_iter'] = 40
    model = build_model(model_opt(tmp_path, data[0], train))
    rates = []
    for current_iter in range(1, 41):
        model.update_learning_rate(current_iter)
        rates.append(model.get_current_learning_rate()[0])
    restart = 1e-7 + 0.5 * (1e-3 - 1e-7) * (1 + math.cos(math.pi / 10))  # BasicSR's first step of a period
    assert rates[0] == pytest.approx(1e-3)
    assert [rates[i] for i in (10, 20, 30)] == pytest.approx([restart] * 3)
    for start in (0, 10, 20, 30):
        stage = rates[start:start + 10]
        assert all(a > b for a, b in zip(stage, stage[1:]))  # cosine decay within the stage


def test_option_errors_are_reported_together_before_training(tmp_path, data):
    train = copy.deepcopy(FOUR_STAGES)
    train['losses']['flops']['alpha'] = 1.5
    train['stages'][0]['name'] = 'warmup'
    train['stages'][1]['losses']['missing'] = 1
    with pytest.raises(ValueError) as info:
        build_model(model_opt(tmp_path, data[0], train))
    message = str(info.value)
    assert 'train.losses.flops' in message and 'alpha' in message
    assert "train.stages[0].name 'warmup'" in message
    assert 'train.stages[1].losses.missing is not configured' in message


def test_missing_vgg_weights_are_reported_before_training(tmp_path, data, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train = copy.deepcopy(FOUR_STAGES)
    train['losses']['contrast'] = {'type': 'ContrastiveKDLoss'}
    with pytest.raises(ValueError, match='vgg19-dcbb9e9d.pth'):
        build_model(model_opt(tmp_path, data[0], train))


def test_pretrain_needs_labelled_data(tmp_path, data):
    opt = model_opt(tmp_path, data[0], FOUR_STAGES)
    opt['datasets']['train']['type'] = 'PairedImageDataset'
    with pytest.raises(ValueError, match='DifficultyPairedDataset'):
        build_model(opt)


def test_nan_loss_stops_without_touching_the_weights(tmp_path, data):
    model = build_model(model_opt(tmp_path, data[0], FOUR_STAGES))
    item = batch(data[0], [0, 1, 2])
    item['lq'][0, 0, 0, 0] = float('nan')
    model.feed_data(item)
    before = snapshot(model.bare_net)
    with pytest.raises(FloatingPointError, match='last good one'):
        model.optimize_parameters(1)
    assert not changed(before, model.bare_net)


def test_parts_load_from_their_own_checkpoints(tmp_path, data):
    torch.manual_seed(3)
    plain = build_network({'type': 'FSRCNN', 'd': 56, 'upscale': 4})  # a plain BasicSR-style checkpoint
    torch.save({'params': plain.state_dict()}, tmp_path / 'fsrcnn56.pth')
    classifier = build_network({'type': 'PatchClassifier', 'num_classes': 3})
    torch.save(classifier.state_dict(), tmp_path / 'classifier.pth')
    opt = model_opt(tmp_path, data[0], FOUR_STAGES, path={
        'pretrain_network_branch2': str(tmp_path / 'fsrcnn56.pth'),
        'pretrain_network_classifier': str(tmp_path / 'classifier.pth')})
    net = build_model(opt).bare_net
    assert all(torch.equal(a, b) for a, b in zip(net.branches[2].state_dict().values(), plain.state_dict().values()))
    assert torch.equal(net.classifier.lastOut.weight, classifier.lastOut.weight)
    wrong = model_opt(tmp_path, data[0], FOUR_STAGES, path={'pretrain_network_branch0': str(tmp_path / 'fsrcnn56.pth')})
    with pytest.raises(ValueError, match=r'wrong shapes \[.*head_conv.0.weight'):
        build_model(wrong)
    extra = model_opt(tmp_path, data[0], FOUR_STAGES, path={'pretrain_network_branch3': str(tmp_path / 'fsrcnn56.pth')})
    with pytest.raises(ValueError, match='path.pretrain_network_branch3'):
        build_model(extra)


DEMOS = ['train_CDNSR_FSRCNN_demo.yml', 'train_CDNSR_EDSR_demo.yml', 'train_ClassSR_FSRCNN_demo.yml', 'train_FSRCNN_demo.yml']


@pytest.mark.parametrize('entry', ['plugin', 'stock'])
@pytest.mark.parametrize('demo', DEMOS)
def test_demo_option_files_train_every_stage(tmp_path, data, demo, entry):
    import basicsr
    opt = demo_options(demo, 'demo_run', *data)
    options = write_options(tmp_path / demo, opt)
    if entry == 'stock':
        (tmp_path / 'basicsr').mkdir()
        (tmp_path / 'basicsr' / 'train.py').write_text((Path(basicsr.__file__).parent / 'train.py').read_text())
        run(['basicsr/train.py', '-opt', str(options)], cwd=tmp_path)
    else:
        run(['-m', 'cdnsr_plugin.train', '-opt', str(options)], cwd=tmp_path)
    experiment = tmp_path / 'experiments' / 'demo_run'
    log = read_log(experiment)
    stages = opt['train'].get('stages', [])
    for i, stage in enumerate(stages):
        assert f'Stage {i + 1}/{len(stages)} "{stage["name"]}"' in log
    assert 'Validation demo_val' in log and '# psnr' in log and '# ssim' in log
    if stages:
        assert 'Routing on demo_val: patches per class' in log
    net = build_network(opt['network_g'])
    saved = torch.load(experiment / 'models' / 'net_g_latest.pth', weights_only=True)['params']
    net.load_state_dict(saved)  # the checkpoint reloads into the option file's network


def test_killed_run_resumes_in_the_right_stage(tmp_path, data):
    opt = demo_options('train_CDNSR_FSRCNN_demo.yml', 'resume_run', *data, stage_iters=40, checkpoint_every=5)
    opt['datasets']['train']['batch_size_per_gpu'] = 4
    options = write_options(tmp_path / 'resume.yml', opt)
    states = tmp_path / 'experiments' / 'resume_run' / 'training_states'
    process = subprocess.Popen([sys.executable, '-m', 'cdnsr_plugin.train', '-opt', str(options)], cwd=tmp_path,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None and not list(states.glob('*.state')):
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    saved = sorted(int(p.stem) for p in states.glob('*.state'))
    assert process.returncode == -signal.SIGKILL and saved, 'the run was not killed mid-way'
    resume_from = saved[-1]
    run(['-m', 'cdnsr_plugin.train', '-opt', str(options), '--auto_resume'], cwd=tmp_path)
    log = read_log(tmp_path / 'experiments' / 'resume_run')
    assert f'Resuming training from epoch: 0, iter: {resume_from}.' in log or \
        f'iter: {resume_from}.' in log.split('Resuming training from')[1].splitlines()[0]
    stage = stage_at(parse_stages(opt['train'], set(opt['train']['losses']))[0], resume_from + 1)
    after_resume = log.split('Resuming training from')[1]
    assert f'Stage {stage.index + 1}/4 "{stage.name}" from iter {stage.start}' in after_resume
    assert (tmp_path / 'experiments' / 'resume_run' / 'models' / 'net_g_latest.pth').is_file()


def test_rcan_option_file_starts_training_through_stock_basicsr_train(tmp_path, data):
    """``python basicsr/train.py -opt options/train_CDNSR_RCAN.yml`` from a BasicSR-like tree: the
    paper-scale file as shipped, cut to one iteration per stage, batch 2 and our small data set."""
    import basicsr
    from cdnsr_plugin.compat import load_yaml
    from training_helpers import to_plain
    opt = to_plain(load_yaml(str(REPO / 'options' / 'train_CDNSR_RCAN.yml')))
    train_set, _ = data
    opt['datasets'] = {'train': dict(opt['datasets']['train'], dataroot_gt=str(train_set / 'gt.lmdb'),
                                     dataroot_lq=str(train_set / 'lq.lmdb'), batch_size_per_gpu=2,
                                     num_worker_per_gpu=0)}
    opt.pop('val')
    for stage in opt['train']['stages']:
        stage['iters'] = 1
    opt['train']['total_iter'] = 4
    opt['train']['losses']['contrast']['random_weights'] = True  # no VGG-19 file in CI (explicit test flag)
    opt['logger'].update(print_freq=1, use_tb_logger=False)
    options = write_options(tmp_path / 'rcan.yml', opt)
    (tmp_path / 'basicsr').mkdir()
    (tmp_path / 'basicsr' / 'train.py').write_text((Path(basicsr.__file__).parent / 'train.py').read_text())
    run(['basicsr/train.py', '-opt', str(options)], cwd=tmp_path)
    log = read_log(tmp_path / 'experiments' / opt['name'])
    assert 'Network [RCAN] is created.' in log and 'Stage 4/4 "finetune"' in log
    assert 'l_contrast' in log and 'iter:       4' in log


def test_two_process_cpu_ddp_keeps_ranks_identical(tmp_path, data):
    opt = demo_options('train_CDNSR_FSRCNN_demo.yml', 'ddp_run', *data, stage_iters=2, checkpoint_every=4)
    options = write_options(tmp_path / 'ddp.yml', opt)
    result = run(['-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', '-m',
                  'cdnsr_plugin.train', '-opt', str(options), '--launcher', 'pytorch'], cwd=tmp_path)
    log = read_log(tmp_path / 'experiments' / 'ddp_run')
    assert 'World size (gpu number): 2' in log
    checks = [line for line in log.splitlines() if 'DDP check: weights identical on 2 ranks' in line]
    assert len(checks) >= 2, result.stdout[-2000:]  # at iteration 4 and 8
    assert 'Stage 4/4 "finetune"' in log and 'Routing on demo_val' in log


def test_trained_checkpoint_runs_through_basicsr_test_pipeline_with_routing(tmp_path, data):
    """``python -m cdnsr_plugin.test`` with model_type CDNSRModel: routed, full-coverage SR images."""
    train_set, val_set = data
    opt = demo_options('train_CDNSR_FSRCNN_demo.yml', 'for_test', train_set, val_set, stage_iters=2)
    run(['-m', 'cdnsr_plugin.train', '-opt', str(write_options(tmp_path / 'train.yml', opt))], cwd=tmp_path)
    test_opt = {
        'name': 'routed_test', 'model_type': 'CDNSRModel', 'scale': 4, 'num_gpu': 0,
        'datasets': {'test_1': dict(opt['datasets']['val'], name='held_out')},
        'network_g': opt['network_g'],
        'path': {'pretrain_network_g': str(tmp_path / 'experiments' / 'for_test' / 'models' / 'net_g_latest.pth'),
                 'strict_load_g': True, 'param_key_g': 'params'},
        'val': {'save_img': True, 'suffix': None, 'patch': 32, 'stride': 28,
                'metrics': {'psnr': {'type': 'calculate_psnr', 'crop_border': 4, 'test_y_channel': True}}},
    }
    run(['-m', 'cdnsr_plugin.test', '-opt', str(write_options(tmp_path / 'test.yml', test_opt))], cwd=tmp_path)
    results = tmp_path / 'results' / 'routed_test'
    log = read_log(results)
    assert 'Routing on held_out: patches per class' in log and '# psnr' in log
    import cv2
    for hr in sorted((val_set / 'HR').glob('*.png')):
        sr = cv2.imread(str(results / 'visualization' / 'held_out' / f'{hr.stem}_routed_test.png'))
        assert sr is not None and sr.shape == cv2.imread(str(hr)).shape  # every pixel, exactly x4
