"""The memory-efficient KD losses equal the plain form: values and gradients, every divergence."""
import functools
import os
import sys

import pytest
import torch

from distill_plugins.chunked_divergences import (
    FixedColumns, ProjectedLogits, chunked_kd_loss, cross_entropy_loss_and_grad, forward_kl_loss_and_grad,
    fused_kd_loss, plain_kd_loss, reverse_kl_loss_and_grad,
)
from distill_plugins.divergences import DIVERGENCES

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

N, V, D = 23, 40, 12  # chunk sizes below do not divide N
# every divergence with non-default options, so that options reach the chunks
DIVS = {
    "forward_kl": functools.partial(DIVERGENCES["forward_kl"], temperature=2.0),
    "reverse_kl": functools.partial(DIVERGENCES["reverse_kl"], temperature=0.5),
    "skew_kl": functools.partial(DIVERGENCES["skew_kl"], alpha=0.3),
    "skew_reverse_kl": functools.partial(DIVERGENCES["skew_reverse_kl"], alpha=0.2, temperature=2.0),
    "js": functools.partial(DIVERGENCES["js"], beta=0.9),
    "tvd": DIVERGENCES["tvd"],
    "adaptive_kl": functools.partial(DIVERGENCES["adaptive_kl"], alpha=0.3),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def inputs(dtype, seed=0, n=N, v=V):
    """Student/teacher logits with +-inf teacher entries and -inf student entries (never at a label)."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, v, generator=g) * 3
    t = torch.randn(n, v, generator=g) * 3
    labels = torch.randint(0, v, (n,), generator=g)
    t[0, 1], t[3, 2], t[3, 5] = float("inf"), float("-inf"), float("-inf")
    t[5, :] = float("-inf")
    t[5, 7] = 0.0  # a one-hot teacher row
    s[2, 4], s[3, 5], s[6, 0] = float("-inf"), float("-inf"), float("-inf")
    labels[[2, 3, 6]] = torch.tensor([1, 1, 1])
    return s.to(dtype).requires_grad_(), t.to(dtype), labels


def close(a, b, dtype, scale=None):
    a, b = a.detach().float(), b.detach().float()
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    scale = b.abs().max().item() if scale is None else scale
    torch.testing.assert_close(a, b, rtol=tol, atol=tol * max(scale, 1e-6), equal_nan=True)


def plain_with_grad(s, labels, t, div, r):
    ref = plain_kd_loss(s, labels, t, div, r)
    (g,) = torch.autograd.grad(ref.loss, s)
    return ref, g


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("name", sorted(DIVS))
def test_chunked_equals_plain(name, dtype):
    dt = DTYPES[dtype]
    s, t, labels = inputs(dt)
    ref, g_ref = plain_with_grad(s, labels, t, DIVS[name], 0.3)
    assert torch.isfinite(ref.loss)
    for chunk in (1, 5, 100):
        out = chunked_kd_loss(s, labels, t, DIVS[name], 0.3, chunk_size=chunk)
        (g,) = torch.autograd.grad(out.loss * 4.0, s)  # the incoming gradient scales the kept one
        assert g.dtype == s.dtype
        for a, b in ((out.loss, ref.loss), (out.ce, ref.ce), (out.kd, ref.kd)):
            close(a, b, torch.float32)
        close(g / 4.0, g_ref, dt)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("kd_ratio", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("with_inf", [False, True])
@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl"])
def test_analytic_kl_equals_autograd(name, dtype, temperature, kd_ratio, with_inf):
    dt = DTYPES[dtype]
    s, t, labels = inputs(dt, seed=1)
    if not with_inf:
        s, t = torch.randn_like(s, dtype=torch.float32).to(dt).requires_grad_(), torch.randn_like(t, dtype=torch.float32).to(dt)
    div = functools.partial(DIVERGENCES[name], temperature=temperature)
    ref, g_ref = plain_with_grad(s, labels, t, div, kd_ratio)
    analytic = forward_kl_loss_and_grad if name == "forward_kl" else reverse_kl_loss_and_grad
    fast = functools.partial(analytic, temperature=temperature)
    out = chunked_kd_loss(s, labels, t, div, kd_ratio, chunk_size=7, loss_and_grad=fast)
    (g,) = torch.autograd.grad(out.loss, s)
    for a, b in ((out.loss, ref.loss), (out.ce, ref.ce), (out.kd, ref.kd)):
        close(a, b, torch.float32)
    close(g, g_ref, dt)


@pytest.mark.parametrize("teacher_dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("temperature", [3.0, 1.7])
@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl"])
def test_analytic_kl_divides_a_half_precision_teacher_in_float32(name, teacher_dtype, temperature):
    """A bf16/fp16 teacher at a temperature that is no power of 2: t / T is taken in float32, as the
    plain form does (dividing in the teacher's dtype first rounds it: 0.04 logit error at T = 3)."""
    g = torch.Generator().manual_seed(5)
    s = torch.randn(64, 50, generator=g).requires_grad_()
    t = (20 + 10 * torch.randn(64, 50, generator=g)).to(DTYPES[teacher_dtype])
    labels = torch.randint(0, 50, (64,), generator=g)
    div = functools.partial(DIVERGENCES[name], temperature=temperature)
    ref, g_ref = plain_with_grad(s, labels, t, div, 1.0)
    analytic = forward_kl_loss_and_grad if name == "forward_kl" else reverse_kl_loss_and_grad
    out = chunked_kd_loss(s, labels, t, div, 1.0, chunk_size=16,
                          loss_and_grad=functools.partial(analytic, temperature=temperature))
    (grad,) = torch.autograd.grad(out.loss, s)
    close(out.kd, ref.kd, torch.float32)
    close(grad, g_ref, torch.float32)


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl"])
def test_analytic_kl_against_float64(name):
    g = torch.Generator().manual_seed(3)
    s64, t64 = torch.randn(9, 30, generator=g, dtype=torch.float64) * 4, torch.randn(9, 30, generator=g, dtype=torch.float64) * 4
    labels = torch.randint(0, 30, (9,), generator=g)
    s64.requires_grad_()
    log_q, log_p = torch.log_softmax(s64 / 2, -1), torch.log_softmax(t64 / 2, -1)
    kl = (log_p.exp() * (log_p - log_q)).sum() if name == "forward_kl" else (log_q.exp() * (log_q - log_p)).sum()
    ce = torch.nn.functional.cross_entropy(s64, labels, reduction="sum")
    (g64,) = torch.autograd.grad(0.4 * ce + 0.6 * kl, s64)
    analytic = forward_kl_loss_and_grad if name == "forward_kl" else reverse_kl_loss_and_grad
    c, k, grad = analytic(s64.detach().float(), t64.float(), labels, 0.6, temperature=2.0)
    torch.testing.assert_close(c.double(), ce.detach(), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(k.double(), kl.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), g64, rtol=1e-5, atol=1e-6)


def test_student_plus_inf_keeps_plain_semantics():
    """+inf in the student: the divergence masks it (finite kd); CE is inf/NaN there, as in plain."""
    s, t, labels = inputs(torch.float32, seed=2)
    with torch.no_grad():
        s[4, 3] = float("inf")
    for name, div in DIVS.items():
        ref, g_ref = plain_with_grad(s, labels, t, div, 1.0)
        out = chunked_kd_loss(s, labels, t, div, 1.0, chunk_size=4)
        (g,) = torch.autograd.grad(out.loss, s)
        assert torch.isfinite(ref.kd) and not torch.isfinite(ref.ce), name
        close(out.kd, ref.kd, torch.float32)
        close(g, g_ref, torch.float32, scale=1.0)  # NaN exactly where plain has NaN


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("name", sorted(DIVS) + ["forward_kl_analytic"])
def test_fused_equals_plain(name, dtype):
    dt = DTYPES[dtype]
    g = torch.Generator().manual_seed(4)
    hidden = (torch.randn(N, D, generator=g)).to(dt).requires_grad_()
    weight = (torch.randn(V, D, generator=g)).to(dt).requires_grad_()
    t_hidden, t_weight = torch.randn(N, 2 * D, generator=g).to(dt), torch.randn(V, 2 * D, generator=g).to(dt)
    labels = torch.randint(0, V, (N,), generator=g)
    analytic = name.endswith("_analytic")
    div = DIVS[name.replace("_analytic", "")]
    fast = functools.partial(forward_kl_loss_and_grad, temperature=2.0) if analytic else None
    teacher_logits = t_hidden @ t_weight.t()
    teacher_logits[1, 3] = float("-inf")  # masks reach the chunks of materialised teachers
    ref = plain_kd_loss(hidden @ weight.t(), labels, teacher_logits, div, 0.4)
    refs = torch.autograd.grad(ref.loss, (hidden, weight))
    for teacher in (teacher_logits, ProjectedLogits(t_hidden, t_weight)):
        if isinstance(teacher, ProjectedLogits):  # no -inf there: compare with its own plain form
            ref = plain_kd_loss(hidden @ weight.t(), labels, teacher.hidden @ teacher.weight.t(), div, 0.4)
            refs = torch.autograd.grad(ref.loss, (hidden, weight))
        out = fused_kd_loss(hidden, weight, labels, teacher, div, 0.4, chunk_size=6, loss_and_grad=fast)
        grads = torch.autograd.grad(out.loss, (hidden, weight))
        close(out.loss, ref.loss, torch.float32 if dt == torch.float32 else torch.bfloat16)
        close(out.kd, ref.kd, torch.float32 if dt == torch.float32 else torch.bfloat16)
        for a, b in zip(grads, refs):
            assert a.dtype == dt
            close(a, b, torch.float32 if dt == torch.float32 else torch.bfloat16)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_ce_alone_chunked_and_fused_against_float64(dtype):
    """The --lm-data term: CE without a teacher, on logits with -inf entries and on a fused
    projection with fixed columns; values and gradients against float64 autograd."""
    dt = DTYPES[dtype]
    tol = torch.float32 if dt == torch.float32 else torch.bfloat16
    s, _, labels = inputs(dt)
    ref = torch.nn.functional.cross_entropy(s.double(), labels, reduction="sum")
    (ref_grad,) = torch.autograd.grad(ref, s)
    ce_only = dict(loss_and_grad=cross_entropy_loss_and_grad)
    out = chunked_kd_loss(s, labels, None, None, 0.0, chunk_size=5, **ce_only).loss
    (grad,) = torch.autograd.grad(out, s)
    close(out, ref, tol)
    close(grad, ref_grad, tol)

    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(N, D, generator=g).to(dt).requires_grad_()
    weight = torch.randn(V, D, generator=g).to(dt).requires_grad_()
    fixed = FixedColumns(torch.tensor([3, 9]), -1e4)  # vocabulary rows no token maps to
    logits = (hidden.double() @ weight.double().t()).index_fill(1, fixed.index, fixed.value)
    safe = labels.masked_fill(labels.eq(3) | labels.eq(9), 0)
    ref = torch.nn.functional.cross_entropy(logits, safe, reduction="sum")
    refs = torch.autograd.grad(ref, (hidden, weight))
    out = fused_kd_loss(hidden, weight, safe, None, None, 0.0, chunk_size=6, fixed_columns=fixed, **ce_only).loss
    grads = torch.autograd.grad(out, (hidden, weight))
    close(out, ref, tol)
    for a, b in zip(grads, refs):
        close(a, b, tol)
    empty = chunked_kd_loss(s[:0], labels[:0], None, None, 0.0, chunk_size=5, **ce_only)  # no labels
    assert float(empty.loss.detach()) == 0.0


def test_fused_under_autocast_matches_plain_under_autocast():
    """Under autocast the projection runs in bf16 as the model's output layer would; fp32 params."""
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(N, D, generator=g, requires_grad=True)
    weight = torch.randn(V, D, generator=g, requires_grad=True)
    t = torch.randn(N, V, generator=g)
    labels = torch.randint(0, V, (N,), generator=g)
    div = DIVS["forward_kl"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = hidden @ weight.t()
        assert logits.dtype == torch.bfloat16
        ref = plain_kd_loss(logits, labels, t, div, 0.5)
        out = fused_kd_loss(hidden, weight, labels, t, div, 0.5, chunk_size=4)
    refs = torch.autograd.grad(ref.loss, (hidden, weight))
    grads = torch.autograd.grad(out.loss, (hidden, weight))
    close(out.loss, ref.loss, torch.float32)
    for a, b in zip(grads, refs):
        assert a.dtype == torch.float32
        close(a, b, torch.bfloat16)


def test_no_grad_gives_values_only():
    s, t, labels = inputs(torch.float32)
    ref = plain_kd_loss(s, labels, t, DIVS["js"], 0.5)
    with torch.no_grad():
        out = chunked_kd_loss(s, labels, t, DIVS["js"], 0.5, chunk_size=5)
        fused = fused_kd_loss(torch.randn(N, D), torch.randn(V, D), labels, t, DIVS["js"], 0.5, chunk_size=5)
    assert not out.loss.requires_grad and not fused.loss.requires_grad
    close(out.loss, ref.loss, torch.float32)


def test_several_teachers_reach_the_divergence_as_a_list():
    s, t1, labels = inputs(torch.float32)
    g = torch.Generator().manual_seed(6)
    t2 = ProjectedLogits(torch.randn(N, D, generator=g), torch.randn(V, D, generator=g))

    def two_teachers(student, teachers):
        return 0.7 * DIVS["forward_kl"](student, teachers[0]) + 0.3 * DIVS["skew_kl"](student, teachers[1])

    ref, g_ref = plain_with_grad(s, labels, [t1, t2.hidden @ t2.weight.t()], two_teachers, 0.5)
    out = chunked_kd_loss(s, labels, [t1, t2], two_teachers, 0.5, chunk_size=4)
    (grad,) = torch.autograd.grad(out.loss, s)
    close(out.loss, ref.loss, torch.float32)
    close(grad, g_ref, torch.float32)


def test_bad_shapes_and_chunk_size_are_refused():
    s, t, labels = inputs(torch.float32)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_kd_loss(s, labels, t, DIVS["tvd"], 0.5, chunk_size=0)
    with pytest.raises(ValueError, match="rows"):
        chunked_kd_loss(s, labels[:-1], t, DIVS["tvd"], 0.5)


def test_fused_extra_memory_does_not_grow_with_tokens_times_vocab():
    import measure

    v, d, chunk = 4096, 16, 64
    fast = forward_kl_loss_and_grad

    def peak(n, fused):
        g = torch.Generator().manual_seed(7)
        h = torch.randn(n, d, generator=g, requires_grad=True)
        w = torch.randn(v, d, generator=g, requires_grad=True)
        t = ProjectedLogits(torch.randn(n, d, generator=g), torch.randn(v, d, generator=g))
        labels = torch.randint(0, v, (n,), generator=g)
        if fused:
            run = lambda: fused_kd_loss(h, w, labels, t, DIVS["forward_kl"], 0.5, chunk, fast).loss.backward()  # noqa: E731
        else:
            logits = (h @ w.t()).detach().requires_grad_()
            t_logits = t.hidden @ t.weight.t()
            run = lambda: plain_kd_loss(logits, labels, t_logits, DIVS["forward_kl"], 0.5).loss.backward()  # noqa: E731
        return measure.peak_extra_bytes(run, torch.device("cpu"))

    grown = 1536 * v * 4  # fp32 bytes of the extra tokens' rows of one [N, V] tensor
    fused_growth = peak(2048, True) - peak(512, True)
    plain_growth = peak(2048, False) - peak(512, False)
    assert plain_growth > 2 * grown  # the measurement sees [N, V] tensors
    assert fused_growth < 0.05 * grown  # only [N, d] tensors grow


def test_compiled_forward_kl_kernel_equals_eager():
    """--kd-compile: the torch.compile'd kernel (dynamic chunk sizes) and its masked fallback."""
    s, t, labels = inputs(torch.float32, seed=8)
    div = functools.partial(DIVERGENCES["forward_kl"], temperature=2.0)
    compiled = functools.partial(forward_kl_loss_and_grad, temperature=2.0, compiled=True)
    for with_inf in (False, True):
        if not with_inf:
            s, t = torch.randn(N, V).requires_grad_(), torch.randn(N, V)
        ref, g_ref = plain_with_grad(s, labels, t, div, 0.3)
        out = chunked_kd_loss(s, labels, t, div, 0.3, chunk_size=10, loss_and_grad=compiled)  # 10, 10, 3 rows
        (g,) = torch.autograd.grad(out.loss, s)
        close(out.loss, ref.loss, torch.float32)
        close(g, g_ref, torch.float32)
