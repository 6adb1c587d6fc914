"""CDNSRNet routing: batched hard routing, soft/gumbel mixtures, patch-wise inference of images."""
import copy

import pytest
import torch
from basicsr.archs import build_network

from cdnsr_plugin.routing.inference import routed_super_resolve, super_resolve_patches
from cdnsr_plugin.routing.patches import PatchGrid, decompose


def make_net(scale=4, branches=None):
    torch.manual_seed(0)
    branches = branches or [{'type': 'FSRCNN', 'd': d, 'upscale': scale} for d in (16, 36, 56)]
    return build_network({'type': 'CDNSRNet', 'classifier': {'type': 'PatchClassifier', 'num_classes': len(branches)},
                          'branches': branches}).eval()


def brightness_router(net, x):
    """Set the classifier's weights so that it sends the brightest third of ``x`` to class 0, the
    darkest third to class 2 and the rest to class 1 (a deterministic stand-in for training)."""
    cls = net.classifier
    with torch.no_grad():
        for layer in cls.CondNet:
            if isinstance(layer, torch.nn.Conv2d):
                layer.weight.fill_(1.0 / layer.weight[0].numel())
                layer.bias.zero_()
        feature = cls.CondNet(x).mean(dim=(2, 3))[:, 0]  # every channel holds the same value
        lo, hi = torch.quantile(feature, 1 / 3), torch.quantile(feature, 2 / 3)
        cls.lastOut.weight.copy_(torch.tensor([[2.0], [1.0], [0.0]]).expand(3, cls.lastOut.in_features)
                                 / cls.lastOut.in_features)
        cls.lastOut.bias.copy_(torch.stack([-lo - hi, -lo, torch.zeros(())]))
    return net


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
    hooks = [b.register_forward_hook(lambda m, i, o, j=j: calls.append((j, i[0].shape[0])))
             for j, b in enumerate(net.branches)]
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


@pytest.fixture(scope='module')
def identical_branches(lr_image):
    """A container whose three branches are copies of one FSRCNN, and that FSRCNN."""
    net = make_net(branches=[{'type': 'FSRCNN', 'd': 36, 'upscale': 4}] * 3)
    brightness_router(net, decompose(lr_image)[0])
    for layer in net.branches[2].modules():  # weights in a range where seams are visible
        if isinstance(layer, torch.nn.ConvTranspose2d):
            torch.nn.init.normal_(layer.weight, 0, 0.05)
    for branch in net.branches[:2]:
        branch.load_state_dict(net.branches[2].state_dict())
    return net, copy.deepcopy(net.branches[2])


def test_identical_branches_equal_single_network_patchwise(identical_branches, lr_image):
    net, single = identical_branches
    with torch.no_grad():
        routed, labels, grid = routed_super_resolve(net, lr_image, max_batch=7)
        patchwise, _ = super_resolve_patches(lr_image, single, scale=4)
    assert routed.shape == (3, 90 * 4, 120 * 4)
    assert len(labels) == len(grid) and len(labels.unique()) >= 2
    assert (routed - patchwise).abs().max() < 1e-5


# FSRCNN's receptive radius in LR pixels: 2 (5x5 head) + 4 (four 3x3 maps) + 1 (9x9 stride-4 deconv).
SEAM_MARGIN = 7


def interior_mask(grid: PatchGrid, scale: int, margin: int) -> torch.Tensor:
    """HR pixels that every covering tile sees at least ``margin`` LR pixels away from its inner edges."""
    ok = torch.ones(grid.height, grid.width, dtype=torch.bool)
    cover = torch.zeros(grid.height, grid.width, dtype=torch.bool)
    for y in grid.ys:
        for x in grid.xs:
            inside = torch.zeros_like(ok)
            inside[y:y + grid.patch, x:x + grid.patch] = True
            safe = torch.zeros_like(ok)
            top = y if y == 0 else y + margin
            left = x if x == 0 else x + margin
            bottom = y + grid.patch if y + grid.patch >= grid.height else y + grid.patch - margin
            right = x + grid.patch if x + grid.patch >= grid.width else x + grid.patch - margin
            safe[top:bottom, left:right] = True
            ok &= ~inside | safe
            cover |= inside
    assert cover.all()
    return ok.repeat_interleave(scale, 0).repeat_interleave(scale, 1)


def test_patchwise_differs_from_full_image_only_near_seams(identical_branches, lr_image):
    """Measured bound (FSRCNN-36, random weights, 90x120 crop of a real photo, float32 on [0, 1]):
    farther than 7 LR pixels (28 HR pixels) from every inner tile edge, the merged patch-wise output
    equals the full-image output to 2.1e-7 (asserted < 1e-5); at 6 LR pixels it already differs by
    0.033, and inside the band by up to 0.21 (asserted < 0.5). Zero padding at tile edges is the cause;
    the band is the network's receptive radius, so it is arch-dependent."""
    _, single = identical_branches
    with torch.no_grad():
        patchwise, grid = super_resolve_patches(lr_image, single, scale=4)
        full = single(lr_image[None])[0]
    diff = (patchwise - full).abs().amax(0)
    far = interior_mask(grid, 4, SEAM_MARGIN)
    assert far.float().mean() > 0.4  # the bound is tested on a real share of the image
    assert diff[far].max() < 1e-5
    assert 1e-5 < diff[~far].max() < 0.5
    assert diff[~interior_mask(grid, 4, SEAM_MARGIN - 1)].max() > 1e-3  # and the margin is tight


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
