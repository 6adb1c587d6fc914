"""CDNSRNet routing: batched hard routing, soft/gumbel mixtures, labels, frozen parts."""
import pytest
import torch

from helpers import brightness_router, make_net


def patches(n):
    """Random patches of varied brightness."""
    return torch.rand(n, 1, 1, 1) * torch.rand(n, 3, 32, 32)


@pytest.mark.parametrize('scale', [2, 3, 4])
def test_hard_routing_equals_one_patch_at_a_time(scale):
    net = make_net(scale)
    x = torch.rand(23, 3, 32, 32)
    labels = torch.randint(0, 3, (23, ))
    with torch.no_grad():
        batched = net.route(x, labels)
        chunked = net.route(x, labels, max_batch=4)
        single = torch.cat([net.branches[int(k)](x[i:i + 1]) for i, k in enumerate(labels)])
    assert (batched - single).abs().max() < 1e-5
    assert (chunked - single).abs().max() < 1e-5


def test_hard_forward_uses_argmax_and_groups_by_class():
    x = patches(16)
    net = brightness_router(make_net(), x)
    calls = []
    hooks = [
        b.register_forward_hook(lambda m, i, o, j=j: calls.append((j, i[0].shape[0])))
        for j, b in enumerate(net.branches)
    ]
    with torch.no_grad():
        sr, probs = net(x, routing='hard')
    for hook in hooks:
        hook.remove()
    labels = probs.argmax(1)
    assert len(labels.unique()) >= 2, 'the test needs patches of several classes'
    assert sorted(calls) == sorted((j, int((labels == j).sum())) for j in labels.unique().tolist())
    with torch.no_grad():
        expected = torch.cat([net.branches[int(k)](x[i:i + 1]) for i, k in enumerate(labels)])
    assert (sr - expected).abs().max() < 1e-5


def test_hard_routing_is_invariant_to_patch_order():
    x = patches(20)
    net = brightness_router(make_net(), x)
    perm = torch.randperm(20)
    with torch.no_grad():
        sr, probs = net(x)
        sr_p, probs_p = net(x[perm])
    assert (sr[perm] - sr_p).abs().max() < 1e-5
    assert torch.allclose(probs[perm], probs_p, atol=1e-6)


def test_soft_routing_is_probability_weighted_sum():
    net = make_net()
    x = torch.rand(6, 3, 32, 32)
    with torch.no_grad():
        sr, probs = net(x, routing='soft')
        expected = sum(probs[:, i, None, None, None] * b(x) for i, b in enumerate(net.branches))
    assert (sr - expected).abs().max() < 1e-5


def test_gumbel_hard_straight_through_selects_one_branch_and_passes_gradients():
    net = make_net()
    net.hard_gumbel = True
    x = torch.rand(6, 3, 32, 32)
    sr, _ = net(x, routing='gumbel', tau=0.5)
    outputs = torch.stack([b(x) for b in net.branches])  # (M, N, C, H, W)
    distance = (outputs - sr.unsqueeze(0)).flatten(2).abs().amax(2)  # (M, N)
    assert (distance.min(0).values < 1e-5).all()  # each patch equals exactly one branch's output
    sr.mean().backward()
    assert net.classifier.lastOut.weight.grad.abs().sum() > 0


def test_the_forward_chooses_soft_or_straight_through_gumbel_per_call():
    """A stage's hard_gumbel overrides the network's: one-hot weights (gradient to the drawn branch only) or the
    soft sample (every branch gets a gradient, the temperature shapes the mixture)."""
    net = make_net().train()
    net.hard_gumbel = True
    x = torch.rand(6, 3, 32, 32)
    for hard in (True, False):
        net.zero_grad()
        torch.manual_seed(3)
        sr, _, weights = net(x, routing='gumbel', tau=0.5, hard_gumbel=hard, return_weights=True)
        assert torch.equal(weights.max(1).values == 1, torch.ones(6, dtype=torch.bool)) == hard
        sr.mean().backward()
        reached = [any(p.grad is not None and p.grad.abs().sum() > 0 for p in b.parameters()) for b in net.branches]
        drawn = set(weights.argmax(1).tolist())
        assert reached == ([j in drawn for j in range(3)] if hard else [True] * 3)


def test_gumbel_soft_weights_sharpen_as_tau_falls():
    net = make_net()
    x = torch.rand(64, 3, 32, 32)
    torch.manual_seed(1)
    logits = net.classify(x).detach()

    def mean_max_weight(tau):
        torch.manual_seed(2)
        return torch.nn.functional.gumbel_softmax(logits, tau=tau).max(1).values.mean()

    assert mean_max_weight(0.1) > mean_max_weight(1.0) > mean_max_weight(10.0)


def test_routing_gradients_reach_classifier_in_soft_mode():
    net = make_net().train()
    sr, _ = net(torch.rand(4, 3, 32, 32), routing='soft')
    sr.mean().backward()
    assert net.classifier.lastOut.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in net.branches[0].parameters())


def test_labels_route_each_patch_to_its_branch_and_train_only_that_branch():
    net = make_net().train()
    x = patches(9)
    labels = torch.tensor([0, 2, 1, 0, 2, 2, 1, 0, 0])
    sr, probs = net(x, labels=labels)
    assert torch.equal(probs.argmax(1), labels)
    with torch.no_grad():
        expected = torch.cat([net.branches[int(k)](x[i:i + 1]) for i, k in enumerate(labels)])
    assert (sr.detach() - expected).abs().max() < 1e-5
    (sr[labels == 1]).mean().backward()  # loss on class-1 patches only
    grads = [sum(p.grad.abs().sum() for p in b.parameters() if p.grad is not None) for b in net.branches]
    assert grads[1] > 0 and grads[0] == 0 and grads[2] == 0
    assert net.classifier.lastOut.weight.grad is None


@pytest.mark.parametrize('frozen,trained', [('branches', 'classifier'), ('classifier', 'branches')])
def test_frozen_part_gets_no_gradient(frozen, trained):
    net = make_net().train()
    sr, probs = net(patches(4), routing='soft', frozen=frozen)
    (sr.mean() + probs[:, 0].mean()).backward()
    parts = {'classifier': net.classifier, 'branches': net.branches}
    assert all(p.grad is None for p in parts[frozen].parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in parts[trained].parameters())


def test_return_outputs_gives_every_branch_and_hard_selects_one():
    x = patches(12)
    net = brightness_router(make_net(), x)
    with torch.no_grad():
        sr, probs, outputs = net(x, routing='hard', return_outputs=True)
        grouped, _ = net(x, routing='hard')
    assert len(outputs) == 3 and all(o.shape == sr.shape for o in outputs)
    assert (sr - grouped).abs().max() < 1e-5
    for i, k in enumerate(probs.argmax(1).tolist()):
        assert torch.equal(sr[i], outputs[k][i])
