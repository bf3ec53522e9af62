"""Replay buffer of generated training examples (DistiLLM buffer.py; spec section 3).

A FIFO of capacity ``--replay-buffer-size`` (oldest generations fall out first), kept on the CPU,
sampled uniformly without replacement. Each worker keeps its own buffer of its own generations.

``state_dict`` packs the contents for a checkpoint as token tensors, not padded batches
(``data/example_packing.py``): 1000 x 512 tokens ~ 2 MB.
"""
import random
from collections import deque
from typing import Dict, List

import torch

from ..data.example_packing import pack_examples, unpack_examples


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

    # -- checkpoint state ---------------------------------------------------------------------------
    def state_dict(self, pad: int) -> dict:
        """The contents (oldest first, ``pack_examples``) and the sampling generator's state."""
        version, internal, gauss = self.rng.getstate()
        return {**pack_examples(self.items, pad), "rng": [version, list(internal), gauss]}

    def load_state_dict(self, state: dict, restore_rng: bool = True):
        """Replace the contents by the saved ones (the newest ``capacity`` if the capacity shrank)."""
        self.items.clear()
        self.items.extend(unpack_examples(state))
        if restore_rng and state.get("rng") is not None:
            version, internal, gauss = state["rng"]
            self.rng.setstate((version, tuple(internal), gauss))
