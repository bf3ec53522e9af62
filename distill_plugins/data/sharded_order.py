"""A seeded random order over a dataset, split over the data-parallel workers, drawn n at a time.

Epoch e is ``RandomState([seed, e, stream]).permutation(size)``; worker r of W takes every W-th
index from r (the whole permutation when there are fewer items than workers). When a worker's
share runs out the next epoch starts, so ``take(n)`` always returns n indices. Separate ``stream``
numbers give independent orders (MiniLLM's rollout prompts, the pre-training LM batches).
"""
from typing import List

import numpy as np
import torch
from fairseq.distributed import utils as distributed_utils


def _rank_and_world():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return (distributed_utils.get_data_parallel_rank(),
                max(distributed_utils.get_data_parallel_world_size(), 1))
    return 0, 1


class ShardedOrder:
    def __init__(self, size: int, seed: int, stream: int):
        self.size, self.seed, self.stream = int(size), int(seed), int(stream)
        self.order, self.pos, self.epoch = None, 0, 0

    def take(self, n: int) -> List[int]:
        """The next ``n`` indices of this worker's share."""
        out: List[int] = []
        while len(out) < n:
            if self.order is None or self.pos >= len(self.order):
                rank, world = _rank_and_world()
                perm = np.random.RandomState([self.seed, self.epoch, self.stream]).permutation(self.size)
                self.order = perm[rank::world] if len(perm) >= world else perm
                self.pos, self.epoch = 0, self.epoch + 1
            chunk = self.order[self.pos: self.pos + n - len(out)]
            out.extend(int(i) for i in chunk)
            self.pos += len(chunk)
        return out
