"""The offline teacher cache (distill_plugins/teacher_cache.py) against float64 references: the stored
top-k rows, the rebuilt distribution, and every loss path (plain, chunked, fused, multi-teacher) on it."""
import math

import numpy as np
import pytest
import torch

from distill_plugins.chunked_divergences import (
    chunked_kd_loss, dense_rows, forward_kl_loss_and_grad, fused_kd_loss, plain_kd_loss, teacher_rows,
)
from distill_plugins.divergences import DIVERGENCES
from distill_plugins.teacher_cache import CachedLogits, batch_keys, example_key, top_k_rows


def random_logits(n, vocab, seed, with_inf=True):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, vocab, generator=g, dtype=torch.float64) * 3
    if with_inf:
        z[0, :3] = -math.inf  # a few impossible tokens
        z[1, 1:] = -math.inf  # a row with one possible token: fewer than k finite entries
    return z


def reference_rows(z, k):
    """float64: top-k ids / log-probs and log of the mean tail probability, by sorting."""
    logp = torch.log_softmax(z, -1)
    order = torch.argsort(logp, dim=-1, descending=True, stable=True)
    ids = order[:, :k]
    top = logp.gather(-1, ids)
    rest = logp.gather(-1, order[:, k:])
    tail = (torch.logsumexp(rest, -1) - math.log(z.size(1) - k) if k < z.size(1)
            else torch.full((z.size(0),), -math.inf, dtype=z.dtype))
    return ids, top, tail


def rebuilt_reference(z, k):
    ids, top, tail = reference_rows(z, k)
    out = tail[:, None].expand(-1, z.size(1)).clone()
    return out.scatter(-1, ids, top)


@pytest.mark.parametrize("k", [1, 5, 37])
def test_top_k_rows_match_float64(k):
    z = random_logits(9, 37, seed=k)
    ids, top, tail = top_k_rows(z.float(), k)
    r_ids, r_top, r_tail = reference_rows(z, k)
    finite = torch.isfinite(r_top)
    assert torch.equal(torch.isfinite(top), finite)
    torch.testing.assert_close(top.double()[finite], r_top[finite], rtol=1e-5, atol=1e-5)
    # the same probabilities (ties in -inf entries may order ids differently)
    torch.testing.assert_close(torch.log_softmax(z, -1).gather(-1, ids)[finite], r_top[finite], rtol=1e-5, atol=1e-5)
    assert torch.equal(torch.isfinite(tail), torch.isfinite(r_tail))
    ok = torch.isfinite(r_tail)
    torch.testing.assert_close(tail.double()[ok], r_tail[ok], rtol=1e-5, atol=1e-5)


def test_rebuilt_rows_keep_top_k_and_total_mass():
    z, k = random_logits(8, 50, seed=3), 6
    ids, top, tail = top_k_rows(z.float(), k)
    cached = CachedLogits(ids, top, tail, 50)
    rebuilt = cached.rows(0, 8).double()
    p_true, p_cached = torch.softmax(z, -1), torch.softmax(rebuilt, -1)
    torch.testing.assert_close(p_cached.sum(-1), torch.ones(8, dtype=torch.float64))
    torch.testing.assert_close(p_cached.gather(-1, ids), p_true.gather(-1, ids), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(rebuilt, rebuilt_reference(z, k).where(torch.isfinite(rebuilt), rebuilt),
                               rtol=1e-5, atol=1e-5)
    # chunks of rows are the same rows
    torch.testing.assert_close(torch.cat([cached.rows(0, 3), cached.rows(3, 8)]), cached.rows(0, 8))
    assert cached.size(0) == 8 and cached.size(1) == 50


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_full_vocabulary_cache_is_the_teacher(name, temperature):
    """k = V: every divergence on the rebuilt rows equals it on the teacher's logits (value and gradient)."""
    vocab = 23
    z = random_logits(7, vocab, seed=11)
    s = torch.randn(7, vocab, dtype=torch.float64, requires_grad=True)
    ids, top, tail = top_k_rows(z, vocab)  # float64 all along: the exact statement
    cached = CachedLogits(ids, top, tail, vocab).rows(0, 7)
    fn = DIVERGENCES[name]
    a = fn(s, z, temperature=temperature).sum()
    g_a, = torch.autograd.grad(a, s)
    b = fn(s, cached, temperature=temperature).sum()
    g_b, = torch.autograd.grad(b, s)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(g_a, g_b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_and_fused_on_cache_equal_plain(dtype):
    n, vocab, d, k = 13, 31, 8, 5
    z = random_logits(n, vocab, seed=5)
    cached = CachedLogits(*top_k_rows(z.float(), k), vocab)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, d, generator=g).to(dtype).requires_grad_()
    weight = torch.randn(vocab, d, generator=g).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (n,), generator=g)
    div = DIVERGENCES["forward_kl"]
    plain = plain_kd_loss((hidden @ weight.t()).float(), labels, dense_rows(cached), div, 0.4)
    g_plain = torch.autograd.grad(plain.loss, (hidden, weight))
    chunked = chunked_kd_loss(hidden @ weight.t(), labels, cached, div, 0.4, chunk_size=4)
    g_chunked = torch.autograd.grad(chunked.loss, (hidden, weight))
    fused = fused_kd_loss(hidden, weight, labels, cached, div, 0.4, chunk_size=4,
                          loss_and_grad=forward_kl_loss_and_grad)
    g_fused = torch.autograd.grad(fused.loss, (hidden, weight))
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    for other, grads in ((chunked, g_chunked), (fused, g_fused)):
        torch.testing.assert_close(other.loss.float(), plain.loss.float(), **tol)
        torch.testing.assert_close(other.kd, plain.kd, rtol=1e-5, atol=1e-5)
        for a, b in zip(grads, g_plain):
            torch.testing.assert_close(a.float(), b.float(), **tol)


def test_float64_reference_of_the_cached_forward_kl():
    """The KD term on a top-k cache is KL(p~ || q), p~ the rebuilt distribution (top-k kept, even tail)."""
    n, vocab, k = 6, 19, 4
    z = random_logits(n, vocab, seed=8, with_inf=False)
    s = torch.randn(n, vocab, dtype=torch.float64)
    cached = CachedLogits(*top_k_rows(z.float(), k), vocab)
    ours = DIVERGENCES["forward_kl"](s.float(), cached.rows(0, n)).double()
    p = torch.softmax(rebuilt_reference(z, k), -1)
    ref = (p * (torch.log(p) - torch.log_softmax(s, -1))).sum(-1)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    # and it is not the full teacher's KL unless k = V
    full = (torch.softmax(z, -1) * (torch.log_softmax(z, -1) - torch.log_softmax(s, -1))).sum(-1)
    assert (ours - full).abs().max() > 1e-3


def test_tail_none_is_top_k_renormalised():
    """--teacher-cache-tail none: the rebuilt rows are -inf outside the top-k, and forward KL is the
    KL of the teacher renormalised over its top-k (float64 reference)."""
    n, vocab, k = 5, 21, 6
    z = random_logits(n, vocab, seed=12, with_inf=False)
    s = torch.randn(n, vocab, dtype=torch.float64, requires_grad=True)
    ids, top, _tail = top_k_rows(z, k)
    rows = CachedLogits(ids, top, torch.full((n,), -math.inf, dtype=torch.float64), vocab).rows(0, n)
    ours = DIVERGENCES["forward_kl"](s, rows)
    g_ours, = torch.autograd.grad(ours.sum(), s)
    p = torch.softmax(z, -1).gather(-1, ids)
    p = p / p.sum(-1, keepdim=True)
    log_q = torch.log_softmax(s, -1)
    ref = (p * (p.log() - log_q.gather(-1, ids))).sum(-1)
    g_ref, = torch.autograd.grad(ref.sum(), s)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(g_ours, g_ref)


def test_multi_teacher_and_empty_batch():
    vocab = 17
    a = CachedLogits(*top_k_rows(random_logits(5, vocab, 1, with_inf=False).float(), 3), vocab)
    b = CachedLogits(*top_k_rows(random_logits(5, vocab, 2, with_inf=False).float(), 17), vocab)
    rows = teacher_rows([a, b], 1, 4)
    assert len(rows) == 2 and rows[0].shape == (3, vocab)
    empty = CachedLogits(torch.zeros(0, 3, dtype=torch.long), torch.zeros(0, 3), torch.zeros(0), vocab)
    s = torch.zeros(0, vocab, requires_grad=True)
    res = chunked_kd_loss(s, torch.zeros(0, dtype=torch.long), empty, DIVERGENCES["forward_kl"], 0.5, chunk_size=4)
    assert float(res.loss.detach()) == 0.0 and res.loss.requires_grad


def test_keys_ignore_padding_and_depend_on_labels():
    pad = 1
    src = torch.tensor([[2, 7, 8, 9, pad, pad], [2, 7, 8, 9, 5, 6]])
    mask = torch.tensor([[0, 0, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1]], dtype=torch.bool)
    keys = batch_keys(src, mask, pad)
    assert keys[0] == example_key(np.array([2, 7, 8, 9]), 2)
    assert keys[1] == example_key(np.array([2, 7, 8, 9, 5, 6]), 3)
    assert example_key(np.array([2, 7, 8, 9]), 2) != example_key(np.array([2, 7, 8, 9]), 3)


def test_cached_teacher_tail_none_is_minus_inf_outside_top_k():
    """--teacher-cache-tail none reaches the rebuilt rows: -inf outside the top k (even: all finite)"""
    from distill_plugins.teacher_cache import CachedTeacher, batch_keys, top_k_rows

    pad, vocab, k = 1, 10, 3
    src = torch.tensor([[2, 7, 8, 9]])
    mask = torch.tensor([[0, 0, 1, 1]], dtype=torch.bool)
    ids, logp, tail = top_k_rows(torch.randn(2, vocab, generator=torch.Generator().manual_seed(0)), k)
    t = object.__new__(CachedTeacher)
    t.keys = np.array(batch_keys(src, mask, pad), dtype=np.uint64)
    t.offsets = np.array([0, 2], dtype=np.int64)
    t.ids, t.logp, t.tail = ids.numpy().astype(np.uint16), logp.numpy(), tail.numpy()
    t.vocab, t.k, t.pad, t.path = vocab, k, pad, "cache"
    t.tail_mass = "even"
    even = t.cached_logits({"src_tokens": src}, mask).materialize()
    assert torch.isfinite(even).all()
    t.tail_mass = "none"
    none = t.cached_logits({"src_tokens": src}, mask).materialize()
    assert int(torch.isinf(none).sum()) == 2 * (vocab - k)
    torch.testing.assert_close(none.gather(-1, ids), logp)
