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
    # a batch of 4 gives a branch less than one sample's worth of soft weight: the floor (tested below) is off here
    model = build_model(model_opt(tmp_path, train_set, {**FOUR_STAGES, 'min_branch_weight': 0}))
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


def test_a_branch_no_sample_reaches_does_not_move_within_a_stage(tmp_path, training_data):
    """Straight-through Gumbel: a branch the batch does not go through has exactly zero gradients; Adam must
    not step it from the moments of an earlier batch (the drift that degraded CDNSR's unused backbone)."""
    train_set, _ = training_data
    train = {
        'optim_g': {'type': 'Adam', 'lr': 1e-2}, 'total_iter': 3,
        'scheduler': {'type': 'CosineAnnealingRestartLR', 'eta_min': 1e-7}, 'losses': {'pixel': {'type': 'L1Loss'}},
        'stages': [{'name': 'finetune', 'iters': 3, 'routing': 'gumbel', 'losses': {'pixel': 1}}]
    }
    model = build_model(model_opt(tmp_path, train_set, train, dict(FSRCNN_NET, hard_gumbel=True)))
    net = model.bare_net
    bias = net.classifier.lastOut.bias
    with torch.no_grad():  # iteration 1: every sample to branch 2, which builds up Adam moments
        bias.copy_(torch.tensor([-1e4, -1e4, 1e4]))
    model.feed_data(batch(train_set, [0, 1, 2, 2]))
    before_2 = snapshot(net.branches[2])
    model.optimize_parameters(1)
    assert changed(before_2, net.branches[2])
    for current_iter in (2, 3):  # then every sample to branch 0: branch 2 stays exactly where it was
        with torch.no_grad():
            bias.copy_(torch.tensor([1e4, -1e4, -1e4]))
        before_0, before_2 = snapshot(net.branches[0]), snapshot(net.branches[2])
        model.feed_data(batch(train_set, [0, 1, 2, 2]))
        model.optimize_parameters(current_iter)
        assert changed(before_0, net.branches[0])
        assert not changed(before_2, net.branches[2]), current_iter


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
    with pytest.raises(FloatingPointError, match='No checkpoint was saved yet'):
        model.optimize_parameters(1)
    assert not changed(before, model.bare_net)
    for folder in ('models', 'states'):
        (tmp_path / 'experiment' / folder).mkdir(parents=True)
    model.save(0, 5)
    with pytest.raises(FloatingPointError, match=r'The last good checkpoint is .*net_g_5\.pth'):
        model.optimize_parameters(1)


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


def stages_of(*stages: dict, lr: float = 1e-3) -> dict:
    """A schedule of the given stages with L1 and the oracle loss configured."""
    return {
        'optim_g': {'type': 'Adam', 'lr': lr}, 'total_iter': sum(s['iters'] for s in stages),
        'scheduler': {'type': 'CosineAnnealingRestartLR', 'eta_min': 1e-7}, 'losses': {
            'pixel': {'type': 'L1Loss'}, 'oracle': {'type': 'OracleLabelLoss', 'target': 0.5},
            'dual': {'type': 'DualFLOPsLoss', 'alpha': 0.5}
        }, 'stages': list(stages)
    }


def test_backbone_and_all_routings_train_the_branches_they_name(tmp_path, training_data):
    train = stages_of({'name': 'pretrain', 'iters': 1, 'routing': 'backbone', 'losses': {'pixel': 1}},
                      {'name': 'pretrain', 'iters': 1, 'routing': 'all', 'losses': {'pixel': 1}})
    model = build_model(model_opt(tmp_path, training_data[0], train))
    branches = model.bare_net.branches
    for current_iter, learn in ((1, [False, False, True]), (2, [True, True, True])):
        model.feed_data(batch(training_data[0], [0, 0, 0, 0]))  # class-0 samples: labels would train branch 0 only
        before = [snapshot(b) for b in branches]
        model.optimize_parameters(current_iter)
        assert [changed(b0, b) for b0, b in zip(before, branches)] == learn, current_iter


def test_prune_stage_cuts_the_smaller_branches_out_of_the_largest(tmp_path, training_data):
    """At the stage's first iteration (its update, at BasicSR's eta_min 1e-7, moves a weight by about 1e-7)."""
    from cdnsr_plugin.archs.pruning import prune
    train = stages_of(
        {'name': 'pretrain', 'iters': 2, 'routing': 'backbone', 'losses': {'pixel': 1}},
        {'name': 'pretrain', 'iters': 1, 'routing': 'all', 'prune': True, 'lr': 1e-30, 'losses': {'pixel': 1}})
    model = build_model(model_opt(tmp_path, training_data[0], train))
    net = model.bare_net
    for current_iter in (1, 2, 3):
        if current_iter == 3:
            expected = [prune(net.branch_opts[-1], net.branches[-1], d)[1].state_dict() for d in (16, 36)]
        model.update_learning_rate(current_iter)  # as BasicSR's training loop does
        model.feed_data(batch(training_data[0], [0, 1, 2, 2]))
        model.optimize_parameters(current_iter)
    for branch, state in zip(net.branches[:2], expected):
        assert all(torch.allclose(branch.state_dict()[k], v, rtol=0, atol=1e-6) for k, v in state.items())


def test_stage_learning_rates_and_hard_flops_in_the_log(tmp_path, training_data):
    train = stages_of(
        {'name': 'pretrain', 'iters': 5, 'routing': 'backbone', 'losses': {'pixel': 1}},
        {'name': 'classifier', 'iters': 5, 'routing': 'soft', 'lr': 2e-4, 'losses': {'oracle': 1}},
        {'name': 'classifier', 'iters': 5, 'routing': 'gumbel', 'lr': 5e-4, 'losses': {'pixel': 1, 'dual': 1}})
    model = build_model(model_opt(tmp_path, training_data[0], train))
    rates = []
    for current_iter in range(1, 16):
        model.update_learning_rate(current_iter)
        rates.append(model.get_current_learning_rate()[0])
    first_step = 0.5 * (1 + math.cos(math.pi / 5))  # BasicSR's first step of a 5-iteration period
    expected = [1e-3] + [1e-7 + (lr - 1e-7) * first_step for lr in (2e-4, 5e-4)]
    assert [rates[i] for i in (0, 5, 10)] == pytest.approx(expected)  # each stage restarts at its own lr
    model.feed_data(batch(training_data[0], [0, 1, 2, 2]))
    model.optimize_parameters(11)
    log = model.get_current_log()
    shares = torch.tensor([log[f'cls{j}'] for j in range(3)], dtype=torch.float64)
    relative = model.branch_costs / model.branch_costs.max()
    assert log['flops_hard_pct'] == pytest.approx(100 * float(shares @ relative))  # what the argmax costs
    assert 0 < log['flops_pct'] <= 100 and log['price_dual'] > 0


def test_stages_that_route_without_the_classifier_refuse_classifier_losses(tmp_path, training_data):
    train = stages_of({'name': 'pretrain', 'iters': 1, 'routing': 'all', 'losses': {'pixel': 1, 'oracle': 1}})
    with pytest.raises(ValueError, match="routes by all, so \\['oracle'\\] would see no classifier output"):
        build_model(model_opt(tmp_path, training_data[0], train))
    carn = {**FSRCNN_NET, 'branches': [{'type': 'FSRCNN', 'd': 16}, {'type': 'CARN', 'num_feat': 32}]}
    carn['classifier'] = {'type': 'PatchClassifier', 'num_classes': 2}
    train = stages_of({'name': 'pretrain', 'iters': 1, 'routing': 'all', 'prune': True, 'losses': {'pixel': 1}})
    with pytest.raises(ValueError, match='share one prunable arch'):
        build_model(model_opt(tmp_path, training_data[0], train, network=carn))


@pytest.mark.parametrize('keep_price', [False, True])
def test_the_dual_price_restarts_at_each_stage_unless_kept(tmp_path, training_data, keep_price):
    stage = {'name': 'classifier', 'iters': 3, 'routing': 'gumbel', 'losses': {'pixel': 1, 'dual': 1}}
    train = stages_of(stage, dict(stage))
    train['losses']['dual'].update(initial_price=0.01, step=5.0, keep_price=keep_price)
    model = build_model(model_opt(tmp_path, training_data[0], train))
    dual, prices = model.losses['dual'], [0.01]
    for current_iter in range(1, 5):
        model.feed_data(batch(training_data[0], [2, 2, 2, 2]))
        model.optimize_parameters(current_iter)
        prices.append(float(dual.price))
    assert prices[3] != pytest.approx(0.01)  # stage 1 moved it
    # iteration 4 starts stage 2 and updates the price once, from 0.01 again or from where stage 1 left it
    hard = model.get_current_log()['flops_hard_pct'] / 100
    start = prices[3] if keep_price else 0.01
    assert prices[4] == pytest.approx(start * math.exp(5.0 * (hard - 0.5)), rel=1e-5)


def test_a_longer_lr_period_decays_a_stage_less_and_resume_states_stay_plain(tmp_path, training_data):
    """ClassSR's classifier stage: 200k iterations of a 500k cosine period end at 65% of the rate."""
    train = stages_of({'name': 'pretrain', 'iters': 4, 'routing': 'backbone', 'losses': {'pixel': 1}},
                      {'name': 'classifier', 'iters': 10, 'lr': 2e-4, 'lr_period': 25, 'losses': {'oracle': 1}})
    model = build_model(model_opt(tmp_path, training_data[0], train))
    rates = []
    for current_iter in range(1, 15):
        model.update_learning_rate(current_iter)
        rates.append(model.get_current_learning_rate()[0])
    assert rates[3] == pytest.approx(1e-7)  # the first stage's own period ends at eta_min
    assert rates[13] == pytest.approx(1e-7 + (2e-4 - 1e-7) * 0.5 * (1 + math.cos(math.pi * 10 / 25)))
    state = model.schedulers[0].state_dict()
    torch.save(state, tmp_path / 'state.pt')
    assert torch.load(tmp_path / 'state.pt', weights_only=True)['last_epoch'] == 13


def test_a_branch_the_soft_gumbel_weights_all_but_abandon_does_not_move(tmp_path, training_data):
    """The paper's soft Gumbel weights: a branch whose weight is ~1e-9 gets gradients that small, which Adam would
    normalise into full-size steps (the drift of CDNSR's unused backbone in fine-tuning); below
    ``train.min_branch_weight`` (summed over the batch) it is not stepped, and with the floor at 0 it is."""
    train_set, _ = training_data
    moved = {}
    for floor in (1.0, 0):
        train = {
            'optim_g': {'type': 'Adam', 'lr': 1e-2}, 'total_iter': 2, 'min_branch_weight': floor,
            'scheduler': {'type': 'CosineAnnealingRestartLR', 'eta_min': 1e-7}, 'losses': {'pixel': {'type': 'L1Loss'}},
            'stages': [{'name': 'finetune', 'iters': 2, 'routing': 'gumbel', 'tau': [1.0, 1.0], 'losses': {'pixel': 1}}]
        }
        model = build_model(model_opt(tmp_path / str(floor), train_set, train, dict(FSRCNN_NET, hard_gumbel=False)))
        net = model.bare_net
        with torch.no_grad():  # branch 2 gets a weight of about exp(-25) ~ 1e-11 per sample
            net.classifier.lastOut.bias.copy_(torch.tensor([12.5, 12.5, -12.5]))
        before = snapshot(net.branches[2]), snapshot(net.branches[0])
        model.feed_data(batch(train_set, [0, 1, 2, 2]))
        model.optimize_parameters(1)
        assert changed(before[1], net.branches[0])  # the branches the batch goes through learn either way
        moved[floor] = changed(before[0], net.branches[2])
    assert moved == {1.0: False, 0: True}


def test_in_distillation_the_floor_holds_the_teacher_and_the_students_still_learn(tmp_path, training_data):
    """PixelKDLoss trains every smaller branch towards the larger ones' detached outputs, whatever their routing
    weight; the largest branch, the teacher, gets only the mixture's tiny gradient and must not drift (the students
    would follow it)."""
    train_set, _ = training_data
    train = {
        'optim_g': {'type': 'Adam',
                    'lr': 1e-2}, 'total_iter': 1, 'scheduler': {'type': 'CosineAnnealingRestartLR', 'eta_min': 1e-7},
        'losses': {'pixel': {'type': 'L1Loss'}, 'kd': {'type': 'PixelKDLoss'}}, 'stages': [{
            'name': 'distill', 'iters': 1, 'routing': 'gumbel', 'tau': [1.0, 1.0], 'losses': {'pixel': 1, 'kd': 1}
        }]
    }
    model = build_model(model_opt(tmp_path, train_set, train, dict(FSRCNN_NET, hard_gumbel=False)))
    net = model.bare_net
    with torch.no_grad():  # the batch goes (softly) to branch 1; branches 0 and 2 get weights of about 1e-11
        net.classifier.lastOut.bias.copy_(torch.tensor([-12.5, 12.5, -12.5]))
    before = [snapshot(branch) for branch in net.branches]
    model.feed_data(batch(train_set, [0, 1, 2, 2]))
    model.optimize_parameters(1)
    assert [changed(b, branch) for b, branch in zip(before, net.branches)] == [True, True, False]
