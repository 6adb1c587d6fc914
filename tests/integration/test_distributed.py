"""Losses under a real 2-process gloo process group."""
from pathlib import Path

import pytest
import torch

from cdnsr_plugin.losses import AverageLoss

from helpers import rand

pytestmark = pytest.mark.slow


def _average_loss_rank(rank: int, world: int, init_file: str, x: torch.Tensor, weight: torch.Tensor,
                       out_dir: str) -> None:
    import torch.distributed as dist
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world)
    try:
        weight = weight.clone().requires_grad_()
        logits = x.chunk(world)[rank] @ weight
        logits.retain_grad()
        value = AverageLoss()(torch.softmax(logits, dim=1))
        value.backward()
        grad = weight.grad.clone()
        dist.all_reduce(grad)  # what DDP does to a shared parameter's gradient: the mean over ranks
        result = {'value': value.detach(), 'logit_grad': logits.grad, 'weight_grad': grad / world}
        torch.save(result, Path(out_dir) / f'{rank}.pt')
    finally:
        dist.destroy_process_group()


def test_average_loss_distributed_matches_global_batch(tmp_path):
    import torch.multiprocessing as mp
    x, weight = rand(8, 4, seed=3) * 2 - 1, rand(4, 3, seed=4) * 4 - 2  # 8 patches, M = 3, 4 per rank
    mp.spawn(_average_loss_rank, args=(2, str(tmp_path / 'init'), x, weight, str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f'{rank}.pt') for rank in range(2)]

    weight = weight.clone().requires_grad_()
    logits = x @ weight
    logits.retain_grad()
    single = AverageLoss()(torch.softmax(logits, dim=1))
    single.backward()
    assert single.item() > 0.1  # a non-trivial imbalance
    for rank, result in enumerate(ranks):
        assert result['value'].item() == pytest.approx(single.item(), rel=1e-6)  # the global-batch loss
        # each rank's own gradient is world x that of the global loss (the world*local share) ...
        torch.testing.assert_close(result['logit_grad'], 2 * logits.grad[4 * rank:4 * rank + 4])
        # ... so DDP's mean over ranks gives the shared parameter exactly the single-process gradient
        torch.testing.assert_close(result['weight_grad'], weight.grad)
