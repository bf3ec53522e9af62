"""Replay buffer of generated training examples (DistiLLM buffer.py; spec section 3).

A FIFO of capacity ``--replay-buffer-size`` (oldest generations fall out first), kept on the CPU,
sampled uniformly without replacement. Each worker keeps its own buffer of its own generations.
"""
import random
from collections import deque
from typing import Dict, List

import torch


class ReplayBuffer:
    def __init__(self, capacity: int, seed: int = 0):
        if capacity < 1:
            raise ValueError(f"replay buffer capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.items: deque = deque(maxlen=capacity)
        self.rng = random.Random(seed)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def full(self) -> bool:
        return len(self.items) >= self.capacity

    def push(self, examples: List[Dict]):
        """Store examples (``join_prompt_response`` dicts); their tensors are moved to the CPU."""
        for ex in examples:
            self.items.append({k: v.cpu() if torch.is_tensor(v) else v for k, v in ex.items()})

    def sample(self, k: int) -> List[Dict]:
        """``min(k, len)`` distinct examples drawn uniformly."""
        if not self.items:
            raise RuntimeError("sampling from an empty replay buffer")
        return self.rng.sample(list(self.items), min(k, len(self.items)))
