"""Which data a step trains on, and DistiLLM's adaptive threshold tau (spec section 3).

Per step (update ``step`` of ``total``) draw r ~ U(0, 1) and, for ``adaptive``:

    s = tau * (1 - step / total)      (--replay-ratio decreasing, DistiLLM's default)
        tau * 0.5                     (constant)
        tau * step / total            (increasing)
    if r < s or (r < tau and the buffer is not full): generate, push to the buffer, train on them
    elif r < tau:                                     train on a batch sampled from the buffer
    else:                                             train on the ground-truth batch

``mixed`` (lambda; GKD 0.5) and ``always`` (ImitKD, lambda = 1): if r < lambda generate, push, and
train on a random buffer batch, else ground truth. After each validation, tau rises by 0.1 (capped
at 1) when the dev loss grew by at least ``eps`` over the last loss that raised it (the loss of the
initial model at first): ``if loss >= prev + eps: tau = min(tau + 0.1, 1); prev = loss``.

r comes from a generator seeded by (seed, update, micro-batch), so every data-parallel worker draws
the same r without communicating.
"""
from typing import Optional

import numpy as np

GENERATE = "gen"  # generate for the current prompts, push, train on the fresh generations
GENERATE_REPLAY = "gen_replay"  # generate, push, train on a random buffer batch (ImitKD/GKD)
REPLAY = "buffer"  # train on a random buffer batch
GROUND_TRUTH = "gt"

TAU_STEP = 0.1


def decision_random(seed: int, update: int, micro: int) -> float:
    """r ~ U(0, 1), the same on every worker for the same (seed, update, micro-batch)."""
    return float(np.random.default_rng([int(seed) & 0xFFFFFFFF, int(update), int(micro), 0x5D15]).random())


def replay_share(tau: float, step: int, total: int, kind: str) -> float:
    """s, the probability of fresh generation once the buffer is full."""
    if kind == "constant":
        return 0.5 * tau
    frac = min(max(step / total, 0.0), 1.0) if total > 0 else 0.0
    if kind == "increasing":
        return tau * frac
    if kind == "decreasing":
        return tau * (1.0 - frac)
    raise ValueError(f"unknown replay ratio {kind!r}")


def choose_source(mode: str, r: float, *, lam: float = 0.5, tau: float = 0.0, s: float = 0.0,
                  buffer_full: Optional[bool] = None) -> str:
    """The data source of one step. ``buffer_full`` is only consulted when it decides."""
    if mode == "always":
        return GENERATE_REPLAY
    if mode == "mixed":
        return GENERATE_REPLAY if r < lam else GROUND_TRUTH
    if mode == "adaptive":
        if r < s:
            return GENERATE
        if r < tau:
            return REPLAY if buffer_full else GENERATE
        return GROUND_TRUTH
    if mode == "off":
        return GROUND_TRUTH
    raise ValueError(f"unknown student data mode {mode!r}")


class AdaptiveThreshold:
    """tau and the reference dev loss of DistiLLM (finetune.py:411-417)."""

    def __init__(self, tau: float = 0.0, eps: float = 0.1, prev_loss: Optional[float] = None):
        self.tau, self.eps, self.prev_loss = float(tau), float(eps), prev_loss

    def observe(self, dev_loss: float) -> bool:
        """Feed one validation loss; returns True when tau was raised."""
        dev_loss = float(dev_loss)
        if self.prev_loss is None:  # no loss of the initial model: this one is the reference
            self.prev_loss = dev_loss
            return False
        if dev_loss >= self.prev_loss + self.eps:
            self.tau = min(round(self.tau + TAU_STEP, 10), 1.0)
            self.prev_loss = dev_loss
            return True
        return False

    def state_dict(self) -> dict:
        return {"tau": self.tau, "prev_loss": self.prev_loss}

    def load_state_dict(self, state: dict):
        self.tau, self.prev_loss = float(state["tau"]), state["prev_loss"]
