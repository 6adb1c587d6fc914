"""CDNSRModel in process: stages train only their parts, losses wiring, learning-rate restarts, loading of
parts, option errors; the stage schedule itself is tested in test_stages.py."""
import copy
import math
from pathlib import Path

import pytest
import torch
from basicsr.archs import build_network
from basicsr.models import build_model

from helpers import FOUR_STAGES

FSRCNN_NET = {
    'type': 'CDNSRNet', 'classifier': {'type': 'PatchClassifier', 'num_classes': 3},
    'branches': [{'type': 'FSRCNN', 'd': d, 'upscale': 4} for d in (16, 36, 56)]
}


def model_opt(tmp_path: Path, train_set: Path, train: dict, network: dict = FSRCNN_NET, path: dict = None) -> dict:
    """What basicsr's parse_options would hand the model, without the command line."""
    experiment = tmp_path / 'experiment'
    return {
        'name': 'unit',
        'model_type': 'CDNSRModel',
        'scale': 4,
        'num_gpu': 0,
        'is_train': True,
        'dist': False,
        'rank': 0,
        'world_size': 1,
        'auto_resume': False,
        'network_g': copy.deepcopy(network),
        'path': {
            'pretrain_network_g': None, 'strict_load_g': True, 'resume_state': None,
            'models': str(experiment / 'models'), 'training_states': str(experiment / 'states'),
            'experiments_root': str(experiment), 'log': str(experiment), **(path or {})
        },
        'datasets': {
            'train': {
                'name': 't', 'type': 'DifficultyPairedDataset', 'phase': 'train', 'scale': 4,
                'dataroot_gt': str(train_set / 'gt.lmdb'), 'dataroot_lq': str(train_set / 'lq.lmdb'),
                'io_backend': {'type': 'lmdb'}, 'gt_size': 128
            }
        },
        'train': copy.deepcopy(train),
        'logger': {'print_freq': 1, 'save_checkpoint_freq': 100},
    }


def batch(train_set: Path, labels: list) -> dict:
    from cdnsr_plugin.data.difficulty_dataset import DifficultyPairedDataset
    dataset = DifficultyPairedDataset({
        'name': 'b', 'phase': 'val', 'scale': 4, 'io_backend': {'type': 'lmdb'},
        'dataroot_gt': str(train_set / 'gt.lmdb'), 'dataroot_lq': str(train_set / 'lq.lmdb')
    })
    picks = [dataset.labels.index(label) + i for i, label in enumerate(labels)]
    items = [dataset[dataset.labels.index(label, pick)] for label, pick in zip(labels, picks)]
    return {
        'lq': torch.stack([it['lq'] for it in items]), 'gt': torch.stack([it['gt'] for it in items]),
        'label': torch.tensor([it['label'] for it in items])
    }


def snapshot(module: torch.nn.Module) -> list:
    return [p.detach().clone() for p in module.parameters()]


def changed(before: list, module: torch.nn.Module) -> bool:
    return any(not torch.equal(a, b) for a, b in zip(before, module.parameters()))


def test_each_stage_trains_only_its_parts(tmp_path, training_data):
    train_set, _ = training_data
    model = build_model(model_opt(tmp_path, train_set, FOUR_STAGES))
    net = model.bare_net
    # iteration -> (classifier learns, which branches learn); the batch holds class-0 samples only
    expectations = {
        1: (False, [True, False, False]),  # pretrain: only the branch of the labels
        3: (True, [False, False, False]),  # classifier stage: branches frozen
        5: (False, [True, True, None]),  # distill: classifier frozen; KD moves both students
        7: (True, [True, True, True])
    }  # finetune, soft routing: everything
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


def test_new_stage_starts_with_fresh_optimizer_moments(tmp_path, training_data):
    """A branch that a new stage does not reach must not move: Adam's first moment from the previous stage
    would otherwise keep stepping it (zero gradients still give lr * m / sqrt(v))."""
    train_set, _ = training_data
    train = {
        'optim_g': {'type': 'Adam', 'lr': 1e-2}, 'total_iter': 4,
        'scheduler': {'type': 'CosineAnnealingRestartLR', 'eta_min': 1e-7}, 'losses': {'pixel': {'type': 'L1Loss'}},
        'stages': [{'name': 'pretrain', 'iters': 2, 'losses': {'pixel': 1}},
                   {'name': 'finetune', 'iters': 2, 'routing': 'gumbel', 'losses': {'pixel': 1}}]
    }
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


def test_learning_rate_restarts_at_every_stage_start(tmp_path, training_data):
    """BasicSR steps the scheduler before iteration k > 1, so iteration k runs at step k - 1; the
    filled-in periods put each restart on a stage's first iteration."""
    train = copy.deepcopy(FOUR_STAGES)
    for stage in train['stages']:
        stage['iters'] = 10
    train['total_iter'] = 40
    model = build_model(model_opt(tmp_path, training_data[0], train))
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


def test_option_errors_are_reported_together_before_training(tmp_path, training_data):
    train = copy.deepcopy(FOUR_STAGES)
    train['losses']['flops']['alpha'] = 1.5
    train['stages'][0]['name'] = 'warmup'
    train['stages'][1]['losses']['missing'] = 1
    with pytest.raises(ValueError) as info:
        build_model(model_opt(tmp_path, training_data[0], train))
    message = str(info.value)
    assert 'train.losses.flops' in message and 'alpha' in message
    assert "train.stages[0].name 'warmup'" in message
    assert 'train.stages[1].losses.missing is not configured' in message


def test_missing_vgg_weights_are_reported_before_training(tmp_path, training_data, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train = copy.deepcopy(FOUR_STAGES)
    train['losses']['contrast'] = {'type': 'ContrastiveKDLoss'}
    with pytest.raises(ValueError, match='vgg19-dcbb9e9d.pth'):
        build_model(model_opt(tmp_path, training_data[0], train))


def test_pretrain_needs_labelled_data(tmp_path, training_data):
    opt = model_opt(tmp_path, training_data[0], FOUR_STAGES)
    opt['datasets']['train']['type'] = 'PairedImageDataset'
    with pytest.raises(ValueError, match='DifficultyPairedDataset'):
        build_model(opt)


def test_nan_loss_stops_without_touching_the_weights(tmp_path, training_data):
    model = build_model(model_opt(tmp_path, training_data[0], FOUR_STAGES))
    item = batch(training_data[0], [0, 1, 2])
    item['lq'][0, 0, 0, 0] = float('nan')
    model.feed_data(item)
    before = snapshot(model.bare_net)
    with pytest.raises(FloatingPointError, match='last good one'):
        model.optimize_parameters(1)
    assert not changed(before, model.bare_net)


def test_parts_load_from_their_own_checkpoints(tmp_path, training_data):
    torch.manual_seed(3)
    plain = build_network({'type': 'FSRCNN', 'd': 56, 'upscale': 4})  # a plain BasicSR-style checkpoint
    torch.save({'params': plain.state_dict()}, tmp_path / 'fsrcnn56.pth')
    classifier = build_network({'type': 'PatchClassifier', 'num_classes': 3})
    torch.save(classifier.state_dict(), tmp_path / 'classifier.pth')
    opt = model_opt(
        tmp_path,
        training_data[0],
        FOUR_STAGES,
        path={
            'pretrain_network_branch2': str(tmp_path / 'fsrcnn56.pth'),
            'pretrain_network_classifier': str(tmp_path / 'classifier.pth')
        })
    net = build_model(opt).bare_net
    assert all(torch.equal(a, b) for a, b in zip(net.branches[2].state_dict().values(), plain.state_dict().values()))
    assert torch.equal(net.classifier.lastOut.weight, classifier.lastOut.weight)
    wrong = model_opt(
        tmp_path, training_data[0], FOUR_STAGES, path={'pretrain_network_branch0': str(tmp_path / 'fsrcnn56.pth')})
    with pytest.raises(ValueError, match=r'wrong shapes \[.*head_conv.0.weight'):
        build_model(wrong)
    extra = model_opt(
        tmp_path, training_data[0], FOUR_STAGES, path={'pretrain_network_branch3': str(tmp_path / 'fsrcnn56.pth')})
    with pytest.raises(ValueError, match='path.pretrain_network_branch3'):
        build_model(extra)
