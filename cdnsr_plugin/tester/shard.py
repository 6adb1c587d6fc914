"""Inference over more than one process, launched by PyTorch's own ``torchrun``.

    torchrun --nproc_per_node 2 tools/test_patches.py --input LR/ --out sr/ ...
    torchrun --nproc_per_node 2 -m cdnsr_plugin.run photos/ --out sr/

``torchrun`` starts the processes and sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; ``Shard.from_env`` joins them in
one process group. Its backend is gloo on every device: the processes exchange only small Python objects (the
images' FLOPs during a set-budget solve, the records at the end of each set), which gloo carries on the CPU
whatever device the networks run on; on CUDA each process runs on its own GPU (``cuda:<LOCAL_RANK>``). A plain
run (no ``torchrun``) is a shard of one and never touches ``torch.distributed``.

What each rank does (``tester.run.Runner``):

* rank 0 alone locks ``--out``, checks it is empty (or removes the earlier run's outputs with ``--overwrite``) and
  lists every output of the run in its progress file before any image runs; the other ranks wait for it, and a
  set-up error on any rank stops every rank with exit 2 (``agree``);
* each set's images are split by position (``take``: image ``i`` goes to rank ``i mod N``), each rank writes its
  own SR images and class maps;
* ``--set-budget``: one ``eta`` for the whole set. Every evaluation of the solver gathers each image's FLOPs
  from all ranks and sums them in the images' order, so every rank follows the same bisection and the eta is the
  one a single process finds (the same floating-point sum);
* at the end of each set rank 0 gathers the records, failures and notes and orders them as a single process
  would; it alone writes report.json/csv and shows progress.

A failed image is a record in the merged report like any other. Ctrl-C, or a rank that dies, ends the run
without a report (``torchrun`` stops the other ranks; rank 0 never reaches its report), so no report claims a
complete run; the progress file lists the outputs for ``--overwrite``.
"""
from __future__ import annotations

import datetime
import os
from typing import Any, Optional, Sequence, TypeVar

T = TypeVar('T')


class Shard:
    """This process's place among ``world`` processes (``rank`` 0 .. world-1)."""

    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0) -> None:
        self.rank, self.world, self.local_rank = rank, world, local_rank

    @classmethod
    def from_env(cls) -> 'Shard':
        """The shard ``torchrun`` started this process as (its environment), or a shard of one."""
        world = int(os.environ.get('WORLD_SIZE', '1') or 1)
        if world <= 1:
            return cls()
        import torch.distributed as dist
        if not dist.is_initialized():
            dist.init_process_group('gloo', timeout=datetime.timedelta(minutes=60))
        return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get('LOCAL_RANK', '0') or 0))

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.world > 1

    def device(self, name: str) -> str:
        """A CUDA device name for this process: ``cuda`` (or ``auto`` with CUDA) becomes ``cuda:<LOCAL_RANK>``."""
        if not self.sharded:
            return name
        import torch
        if name == 'cuda' or (name == 'auto' and torch.cuda.is_available()):
            return f'cuda:{self.local_rank}'
        return name

    def take(self, items: Sequence[T]) -> list[T]:
        """This rank's items: every ``world``-th, from position ``rank``."""
        return list(items[self.rank::self.world])

    def gather(self, value: Any) -> list[Any]:
        """``value`` of every rank, in rank order, on every rank."""
        if not self.sharded:
            return [value]
        import torch.distributed as dist
        values: list[Any] = [None] * self.world
        dist.all_gather_object(values, value)
        return values

    def agree(self, error: Optional[str]) -> Optional[str]:
        """Every rank's set-up outcome: the first error (naming its rank when sharded), or ``None``."""
        for rank, message in enumerate(self.gather(error)):
            if message is not None:
                return message if not self.sharded or rank == self.rank else f'(rank {rank}) {message}'
        return None

    def barrier(self) -> None:
        if self.sharded:
            import torch.distributed as dist
            dist.barrier()

    def close(self) -> None:
        if self.sharded:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()
