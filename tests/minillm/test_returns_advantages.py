"""MiniLLM rewards, length-normalised discounted returns and whitened advantages vs float64 loops."""
import math
import threading

import pytest
import torch

from distill_plugins import policy_gradient as pg

GAMMA = 0.95


def crafted():
    """Three rollouts of response lengths 5, 2 and 0 (all padding) in a [3, 6] grid; the first
    starts one position late (a longer prompt), rewards at padding are garbage that must be ignored."""
    rewards = torch.tensor([
        [9.0, 1.0, -2.0, 0.5, 3.0, -1.0],
        [0.25, -4.0, 7.0, 7.0, 7.0, 7.0],
        [5.0, 5.0, 5.0, 5.0, 5.0, 5.0],
    ], dtype=torch.float64)
    mask = torch.tensor([
        [0, 1, 1, 1, 1, 1],
        [1, 1, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0],
    ], dtype=torch.bool)
    return rewards * mask, mask


def reference_returns(rewards, mask, gamma):
    out = [[0.0] * rewards.size(1) for _ in range(rewards.size(0))]
    for b in range(rewards.size(0)):
        pos = [t for t in range(rewards.size(1)) if mask[b, t]]
        for t in pos:
            later = [u for u in pos if u >= t]
            total = sum(gamma ** (u - t) * float(rewards[b, u]) for u in later)
            out[b][t] = total / len(later)
    return torch.tensor(out, dtype=torch.float64)


def reference_whiten(x, mask):
    vals = [float(x[b, t]) for b in range(x.size(0)) for t in range(x.size(1)) if mask[b, t]]
    mean = sum(vals) / len(vals)
    var = sum((v - mean) ** 2 for v in vals) / len(vals)
    return torch.where(mask, (x - mean) / math.sqrt(var + 1e-8), torch.zeros_like(x))


def test_returns_discount_and_length_normalisation():
    rewards, mask = crafted()
    got = pg.length_normalized_returns(rewards, mask, GAMMA)
    ref = reference_returns(rewards, mask, GAMMA)
    assert torch.allclose(got, ref, rtol=0, atol=1e-12)
    # spot values by hand: last token is its own reward; the first of row 2 averages over 2 tokens
    assert got[0, 5] == pytest.approx(-1.0)
    assert got[1, 0] == pytest.approx((0.25 + GAMMA * -4.0) / 2)
    assert got[0, 1] == pytest.approx(sum(GAMMA ** k * r for k, r in enumerate([1.0, -2.0, 0.5, 3.0, -1.0])) / 5)
    assert got[2].abs().sum() == 0 and got[0, 0] == 0


def test_advantages_are_whitened_returns_over_response_tokens():
    rewards, mask = crafted()
    adv, returns = pg.advantages_and_returns(rewards, mask, GAMMA)
    ref = reference_whiten(reference_returns(rewards, mask, GAMMA), mask)
    assert torch.allclose(adv, ref, rtol=0, atol=1e-10)
    assert torch.allclose(returns, reference_returns(rewards, mask, GAMMA), atol=1e-12)
    vals = adv[mask]
    assert float(vals.mean()) == pytest.approx(0.0, abs=1e-12)
    assert float(vals.var(unbiased=False)) == pytest.approx(1.0, abs=1e-6)


def test_gamma_one_is_mean_of_remaining_rewards():
    rewards, mask = crafted()
    got = pg.length_normalized_returns(rewards, mask, 1.0)
    assert got[0, 3] == pytest.approx((0.5 + 3.0 - 1.0) / 3)


def test_rewards_scale_clip_and_mask():
    teacher = torch.tensor([[-1.0, -300.0, 0.0, -2.0]], dtype=torch.float64)
    student = torch.tensor([[-2.0, -1.0, -400.0, -7.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    r = pg.per_token_rewards(teacher, student, mask, reward_scaling=0.5, cliprange_reward=100.0)
    assert r.tolist() == [[2.0, -100.0, 100.0, 0.0]]  # (log p - log q) * 2, clipped to +-100, masked


def test_teacher_log_probs_from_mean_centred_logits():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 7, dtype=torch.float64) * 3 + 1e4  # a large common offset
    tokens = torch.randint(0, 7, (2, 3))
    got = pg.teacher_token_log_probs(logits, tokens)
    ref = torch.log_softmax(logits - 1e4, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(got, ref, atol=1e-9)
    bad = logits.clone()
    bad[0, 0, tokens[0, 0]] = -math.inf
    with pytest.raises(FloatingPointError):
        pg.teacher_token_log_probs(bad, tokens)
    mask = torch.ones_like(tokens, dtype=torch.bool)
    mask[0, 0] = False  # a masked position may be non-finite
    pg.teacher_token_log_probs(bad, tokens, mask)


class FakeProcessGroup:
    """All-reduce (sum) between threads standing in for data-parallel workers."""

    def __init__(self, world):
        self.world = world
        self.barrier = threading.Barrier(world)
        self.slots = [None] * world
        self.rank = threading.local()

    def all_reduce(self, tensor, op=None):
        self.slots[self.rank.value] = tensor.clone()
        self.barrier.wait()
        total = sum(self.slots)
        self.barrier.wait()
        tensor.copy_(total)


def test_whitening_uses_statistics_of_all_workers(monkeypatch):
    torch.manual_seed(1)
    x = torch.randn(4, 5, dtype=torch.float64)
    x[:2] += 3.0  # the two workers' halves have different means
    mask = torch.rand(4, 5) > 0.3
    group = FakeProcessGroup(2)
    monkeypatch.setattr(pg.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(pg.dist, "all_reduce", group.all_reduce)
    results = [None, None]

    def worker(rank):
        group.rank.value = rank
        part = slice(2 * rank, 2 * rank + 2)
        results[rank] = pg.whiten(x[part], mask[part])

    threads = [threading.Thread(target=worker, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    got = torch.cat(results)
    assert torch.allclose(got, reference_whiten(x, mask), atol=1e-10)
    # a single worker's own statistics would give something else
    assert not torch.allclose(reference_whiten(x[:2], mask[:2]), got[:2], atol=1e-3)
