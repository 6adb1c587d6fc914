"""BranchOutputCache: a sub-image's frozen branch outputs computed once, reused through the flip/rotation that
relates two views of it; and CDNSRModel's classifier stage with and without it."""
import pytest
import torch
from basicsr.models import build_model
from test_cdnsr_model import batch, model_opt, stages_of

from cdnsr_plugin.models.branch_cache import TRANSFORMS, BranchOutputCache, dihedral

from helpers import make_net, rand


def counting(net):
    calls = []

    def branches(x):
        calls.append(x.shape[0])
        return net.branch_outputs(x)

    return branches, calls


def test_every_view_of_a_patch_gets_the_transformed_outputs_of_the_first_view():
    net = make_net()
    first = rand(1, 3, 32, 32, seed=1)
    cache = BranchOutputCache(2**30)
    branches, calls = counting(net)
    kept = cache.outputs(['k'], first, branches)
    views = torch.cat([dihedral(first, *t) for t in TRANSFORMS])
    got = cache.outputs(['k'] * len(TRANSFORMS), views, branches)
    assert calls == [1]  # computed once, for the first view
    for j, outputs in enumerate(got):
        expected = torch.cat([dihedral(kept[j], *t) for t in TRANSFORMS])
        assert torch.allclose(outputs, expected, atol=1e-3, rtol=0)  # float16 storage
        assert not torch.allclose(outputs[1:], outputs[:1].expand_as(outputs[1:]), atol=1e-2)  # really transformed


def test_a_miss_is_the_network_itself_and_a_changed_patch_under_the_same_key_is_recomputed():
    net = make_net()
    x = rand(3, 3, 32, 32, seed=2)
    cache = BranchOutputCache(2**30)
    branches, calls = counting(net)
    with torch.no_grad():
        direct = net.branch_outputs(x)
    assert all(torch.equal(a, b) for a, b in zip(cache.outputs(['a', 'b', 'c'], x, branches), direct))
    other = rand(1, 3, 32, 32, seed=3)
    again = cache.outputs(['a'], other, branches)
    with torch.no_grad():
        assert torch.equal(again[2], net.branches[2](other))
    assert calls == [3, 1] and cache.hit_rate() == 0


def test_entries_stop_at_the_memory_limit_and_results_stay_right():
    net = make_net()
    x = rand(4, 3, 32, 32, seed=4)
    one_entry = 3 * 32 * 32 * 4 + 3 * 3 * 128 * 128 * 2
    cache = BranchOutputCache(2 * one_entry)
    branches, calls = counting(net)
    cache.outputs(list('abcd'), x, branches)
    assert len(cache.entries) == 2 and cache.bytes == 2 * one_entry
    out = cache.outputs(list('abcd'), x, branches)
    with torch.no_grad():
        assert torch.allclose(out[1], net.branches[1](x), atol=1e-3)
    assert calls == [4, 2] and cache.hit_rate() == pytest.approx(2 / 8)


def classifier_stage(tmp_path, training_data, cache_gb: float):
    train = stages_of({'name': 'classifier', 'iters': 4, 'routing': 'soft', 'losses': {'pixel': 1}})
    train['branch_cache_gb'] = cache_gb
    return build_model(model_opt(tmp_path, training_data[0], train))


def test_the_classifier_stage_learns_the_same_with_the_cache(tmp_path, training_data):
    """Unaugmented batches: the first sight is computed (identical), the repeat comes from float16 memory."""
    models = [classifier_stage(tmp_path / str(gb), training_data, gb) for gb in (0, 1)]
    models[1].bare_net.load_state_dict(models[0].bare_net.state_dict())
    data = batch(training_data[0], [0, 1, 2, 2])
    data['key'] = ['s0', 's1', 's2', 's3']
    losses = []
    for model in models:
        for current_iter in (1, 2):
            model.feed_data(data)
            model.optimize_parameters(current_iter)
            losses.append(model.get_current_log()['l_pixel'])
    assert losses[0] == losses[2] and losses[1] == pytest.approx(losses[3], rel=1e-4)
    assert models[1].get_current_log()['cache_hits'] == 1.0 and 'cache_hits' not in models[0].get_current_log()
    for a, b in zip(models[0].bare_net.classifier.parameters(), models[1].bare_net.classifier.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_a_negative_cache_size_is_refused(tmp_path, training_data):
    with pytest.raises(ValueError, match='train.branch_cache_gb must be a number of GB >= 0'):
        classifier_stage(tmp_path, training_data, -1)
