"""A seeded random order over a dataset, split over the data-parallel workers, drawn n at a time.

Epoch e is ``RandomState([seed, e, stream]).permutation(size)``; worker r of W takes every W-th
index from r (the whole permutation when there are fewer items than workers). When a worker's
share runs out the next epoch starts, so ``take(n)`` always returns n indices. Separate ``stream``
numbers give independent orders (MiniLLM's rollout prompts, the pre-training LM batches).

``state_dict`` (epoch, position, number of workers) goes into the checkpoint; ``load_state_dict``
rebuilds this worker's share of that epoch and continues at the same position, so a resumed run
draws what an uninterrupted one would. With another number of workers the shares differ: it
continues at the same fraction of the epoch.
"""
from typing import List

import numpy as np
import torch
from fairseq.distributed import utils as distributed_utils


def rank_and_world():
    """(data-parallel rank, number of workers); (0, 1) outside torch.distributed."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return (distributed_utils.get_data_parallel_rank(),
                max(distributed_utils.get_data_parallel_world_size(), 1))
    return 0, 1


class ShardedOrder:
    def __init__(self, size: int, seed: int, stream: int):
        self.size, self.seed, self.stream = int(size), int(seed), int(stream)
        self.order, self.pos, self.epoch = None, 0, 0

    def _share(self, epoch: int):
        rank, world = rank_and_world()
        perm = np.random.RandomState([self.seed, epoch, self.stream]).permutation(self.size)
        return perm[rank::world] if len(perm) >= world else perm

    def take(self, n: int) -> List[int]:
        """The next ``n`` indices of this worker's share."""
        out: List[int] = []
        while len(out) < n:
            if self.order is None or self.pos >= len(self.order):
                self.order = self._share(self.epoch)
                self.pos, self.epoch = 0, self.epoch + 1
            chunk = self.order[self.pos: self.pos + n - len(out)]
            out.extend(int(i) for i in chunk)
            self.pos += len(chunk)
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "world": rank_and_world()[1]}

    def load_state_dict(self, state: dict):
        self.epoch, self.order, self.pos = int(state["epoch"]), None, 0
        if self.epoch > 0:  # inside epoch - 1's share
            self.order = self._share(self.epoch - 1)
            saved_world, world = int(state.get("world", 1)), rank_and_world()[1]
            self.pos = min(int(state["pos"]) * saved_world // world, len(self.order))
