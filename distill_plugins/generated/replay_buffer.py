"""Replay buffer of generated training examples (DistiLLM buffer.py; spec section 3).

A FIFO of capacity ``--replay-buffer-size`` (oldest generations fall out first), kept on the CPU,
sampled uniformly without replacement. Each worker keeps its own buffer of its own generations.

``state_dict`` packs the contents for a checkpoint as token tensors, not padded batches: each
``join_prompt_response`` example (source = [EOS] + x[:-1], target = pads over the prompt + x[P:])
is stored once as x' = source + target[-1:] (its L + 1 tokens), with its id and prompt length P;
``load_state_dict`` rebuilds source = x'[:-1], target = x'[1:] with the first P labels padded.
About (L + 1) * 4 bytes a sequence (2 with a vocabulary under 32k): 1000 x 512 tokens ~ 2 MB.
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

    # -- checkpoint state ---------------------------------------------------------------------------
    def state_dict(self, pad: int) -> dict:
        """The contents (oldest first) as one flat token tensor + per-sequence lengths, ids and prompt
        lengths, and the sampling generator's state. Plain tensors, ints and lists only, so that
        fairseq's ``weights_only`` checkpoint loading accepts them."""
        seqs = [torch.cat([ex["source"], ex["target"][-1:]]) for ex in self.items]
        flat = torch.cat(seqs) if seqs else torch.zeros(0, dtype=torch.long)
        small = flat.numel() == 0 or int(flat.max()) < 2 ** 15
        version, internal, gauss = self.rng.getstate()
        return {
            "tokens": flat.to(torch.int16 if small else torch.int32),
            "lengths": torch.tensor([len(s) for s in seqs], dtype=torch.long),
            "ids": torch.tensor([int(ex["id"]) for ex in self.items], dtype=torch.long),
            "prompt_lengths": torch.tensor([int(ex["prompt_length"]) for ex in self.items], dtype=torch.long),
            "pad": int(pad),
            "rng": [version, list(internal), gauss],
        }

    def load_state_dict(self, state: dict, restore_rng: bool = True):
        """Replace the contents by the saved ones (the newest ``capacity`` if the capacity shrank)."""
        pad = int(state["pad"])
        self.items.clear()
        flat = state["tokens"].long()
        for seq, i, n_prompt in zip(torch.split(flat, state["lengths"].tolist()), state["ids"].tolist(),
                                    state["prompt_lengths"].tolist()):
            target = seq[1:].clone()
            target[:n_prompt] = pad
            self.items.append({"id": i, "source": seq[:-1].clone(), "target": target, "prompt_length": n_prompt})
        if restore_rng and state.get("rng") is not None:
            version, internal, gauss = state["rng"]
            self.rng.setstate((version, tuple(internal), gauss))
