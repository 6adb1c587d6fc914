"""IterationBatchSampler: BasicSR's counted iterations per epoch, each batch sized by its iteration's stage."""
import pytest
import torch
from basicsr.data.data_sampler import EnlargedSampler

from cdnsr_plugin.models.stages import parse_stages
from cdnsr_plugin.utils.batches import IterationBatchSampler, iterations_per_epoch


class Items(torch.utils.data.Dataset):

    def __init__(self, size: int) -> None:
        self.size, self.opt = size, {'name': 'items', 'type': 'Items'}

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> int:
        return index


def batches(size: int, batch: int, replicas: int = 1, rank: int = 0, ratio: int = 1) -> IterationBatchSampler:
    sampler = EnlargedSampler(Items(size), replicas, rank, ratio)
    return IterationBatchSampler(sampler, batch, iterations_per_epoch(len(sampler), batch))


def epoch(sampler: IterationBatchSampler, number: int) -> list[list[int]]:
    sampler.sampler.set_epoch(number)  # as BasicSR's loop does before each epoch
    return list(sampler)


@pytest.mark.parametrize('size, batch, replicas, ratio', [(56, 9, 1, 1), (68, 8, 1, 1), (7, 16, 1, 1), (70, 8, 2, 3)])
def test_each_epoch_runs_the_iterations_basicsr_counts(size, batch, replicas, ratio):
    import math
    counted = math.ceil(size * ratio / (batch * replicas))  # basicsr.train.create_train_val_dataloader
    sampler = batches(size, batch, replicas, ratio=ratio)
    assert len(sampler) == counted
    for number in range(3):
        got = epoch(sampler, number)
        assert len(got) == counted and all(len(b) == batch for b in got)
        assert all(0 <= i < size for b in got for i in b)


def test_uniform_batches_that_divide_evenly_are_basicsrs_own():
    sampler = batches(64, 8)
    sampler.sampler.set_epoch(5)
    order = list(iter(sampler.sampler))
    assert epoch(sampler, 5) == [order[i:i + 8] for i in range(0, 64, 8)]


def test_an_epoch_covers_its_permutation_before_repeating_a_sample():
    sampler = batches(50, 8)  # 7 batches of 8 = 56 samples: the permutation of 50, then 6 of the next one
    flat = [i for b in epoch(sampler, 0) for i in b]
    assert sorted(flat[:50]) == list(range(50)) and len(flat) == 56


def test_batch_sizes_follow_the_stages_and_the_iteration_carries_over_epochs():
    sampler = batches(56, 9)  # 7 iterations per epoch
    sampler.set_stage_sizes([(1, None), (5, 12), (17, 5)])
    sizes = [len(b) for number in range(3) for b in epoch(sampler, number)]
    assert sizes == [9] * 4 + [12] * 12 + [5] * 5


def test_a_resumed_run_sizes_batches_from_the_iteration_it_resumed_at():
    """BasicSR restarts the saved epoch from its first batch with the saved iteration (12, in epoch 1)."""
    sampler = batches(56, 9)
    sampler.set_stage_sizes([(1, None), (5, 12), (17, 5)])
    sampler.resume(1, 12)
    list(sampler)  # BasicSR's prefetcher makes an iterator before the first epoch and drops it
    assert [len(b) for b in epoch(sampler, 1)] == [12] * 4 + [5] * 3  # iterations 13..19
    assert [len(b) for b in epoch(sampler, 2)] == [5] * 7  # 20..26


def test_ddp_ranks_draw_disjoint_samples_within_a_permutation():
    ranks = [batches(40, 5, replicas=2, rank=r) for r in range(2)]
    drawn = [[i for b in epoch(s, 3) for i in b] for s in ranks]
    assert len(drawn[0]) == len(drawn[1]) == 20 and not set(drawn[0]) & set(drawn[1])
    larger = [batches(40, 5, replicas=2, rank=r) for r in range(2)]
    for s in larger:
        s.set_stage_sizes([(1, 12)])  # 4 batches of 12 per rank: a second permutation, split the same way
    second = [[i for b in epoch(s, 3) for i in b][20:40] for s in larger]
    assert not set(second[0]) & set(second[1])


def test_the_model_finds_only_the_sampler_of_its_own_dataset():
    sampler = batches(20, 4)
    assert IterationBatchSampler.current({'name': 'items', 'type': 'Items'}) is sampler
    assert IterationBatchSampler.current({'name': 'other', 'type': 'Items'}) is None


def test_stage_batch_sizes_are_checked():
    train = {
        'total_iter': 2, 'stages': [{'name': 'pretrain', 'iters': 1, 'batch_size_per_gpu': 0, 'losses': {'l1': 1}},
                                    {'name': 'classifier', 'iters': 1, 'batch_size_per_gpu': 96, 'losses': {'l1': 1}}]
    }
    assert parse_stages(train, {'l1'})[1] == ['train.stages[0].batch_size_per_gpu must be a positive integer, got 0']
    train['stages'][0]['batch_size_per_gpu'] = 16
    stages, errors = parse_stages(train, {'l1'})
    assert not errors and [s.batch_size for s in stages] == [16, 96]
