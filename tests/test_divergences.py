"""distill_plugins.divergences against an independent float64 reference, plus gradients and properties.

The reference below is written from the formulas in the module docstring (and spec section 1), not
from the module: plain Python floats, one row and one vocabulary entry at a time, each model's
softmax normalised over its own finite logits, and only entries finite in *both* models summed.
"""
import math
import random

import pytest
import torch

from distill_plugins import divergences as D

# --------------------------------------------------------------------------------------------
# float64 reference, one row at a time
# --------------------------------------------------------------------------------------------


def ref_softmax(row, temperature):
    """Probabilities and log-probabilities of one row over its finite entries (an infinite logit,
    + or -, gets probability 0), and which entries are finite."""
    x = [v / temperature for v in row]
    finite = [math.isfinite(v) for v in x]
    top = max(v for v, f in zip(x, finite) if f)
    log_z = top + math.log(sum(math.exp(v - top) for v, f in zip(x, finite) if f))
    logp = [v - log_z if f else -math.inf for v, f in zip(x, finite)]
    return [math.exp(lv) for lv in logp], logp, finite


def log_mix(w, log_a, log_b):
    """log(w a + (1 - w) b) from log a and log b, per entry (no underflow for tiny a, b)."""
    out = []
    for la, lb in zip(log_a, log_b):
        terms = [math.log(w) + la] if w > 0 else []
        terms += [math.log(1 - w) + lb] if w < 1 else []
        top = max(terms)
        out.append(top if top == -math.inf else top + math.log(sum(math.exp(t - top) for t in terms)))
    return out


def kl_terms(a, log_a, log_b, valid):
    """sum over valid v of a_v (log a_v - log b_v)."""
    return sum(a[v] * (log_a[v] - log_b[v]) for v in valid if a[v] > 0)


def ref_row(name, s_row, t_row, temperature, **kw):
    q, log_q, s_fin = ref_softmax(s_row, temperature)
    p, log_p, t_fin = ref_softmax(t_row, temperature)
    valid = [v for v in range(len(p)) if s_fin[v] and t_fin[v]]
    if name == "forward_kl":
        return kl_terms(p, log_p, log_q, valid)
    if name == "reverse_kl":
        return kl_terms(q, log_q, log_p, valid)
    if name == "skew_kl":  # KL(p || a p + (1 - a) q)
        return kl_terms(p, log_p, log_mix(kw["alpha"], log_p, log_q), valid)
    if name == "skew_reverse_kl":  # KL(q || (1 - a) p + a q)
        return kl_terms(q, log_q, log_mix(kw["alpha"], log_q, log_p), valid)
    if name == "js":  # b KL(q || m) + (1 - b) KL(p || m), m = (1 - b) p + b q
        b = kw["beta"]
        log_m = log_mix(b, log_q, log_p)
        return b * kl_terms(q, log_q, log_m, valid) + (1 - b) * kl_terms(p, log_p, log_m, valid)
    if name == "tvd":
        return 0.5 * sum(abs(p[v] - q[v]) for v in valid)
    if name == "adaptive_kl":
        w_head, w_tail = ref_akl_weights(p, q, valid, kw["alpha"])
        return w_head * kl_terms(p, log_p, log_q, valid) + w_tail * kl_terms(q, log_q, log_p, valid)
    raise KeyError(name)


def ref_akl_weights(p, q, valid, alpha):
    """Head/tail weights of adaptive KL: walk the teacher's probabilities in ascending order; an entry
    is in the tail while the running teacher mass is <= alpha. Gaps |p - q| only over valid entries."""
    valid = set(valid)
    g_head = g_tail = cum = 0.0
    for v in sorted(range(len(p)), key=lambda i: p[i]):
        cum += p[v]
        gap = abs(p[v] - q[v]) if v in valid else 0.0
        if cum <= alpha:
            g_tail += gap
        else:
            g_head += gap
    total = g_head + g_tail
    if total == 0.0:
        return 0.0, 0.0
    return g_head / total, g_tail / total


def reference(name, student, teacher, temperature=1.0, **kw):
    s = student.detach().double().reshape(-1, student.size(-1)).tolist()
    t = teacher.detach().double().reshape(-1, teacher.size(-1)).tolist()
    out = [ref_row(name, sr, tr, temperature, **kw) for sr, tr in zip(s, t)]
    return torch.tensor(out, dtype=torch.float64).reshape(student.shape[:-1])


# name -> (module function, extra kwargs); every registered divergence, with non-default extras
CASES = {
    "forward_kl": (D.forward_kl, {}),
    "reverse_kl": (D.reverse_kl, {}),
    "skew_kl": (D.skew_kl, {"alpha": 0.1}),
    "skew_reverse_kl": (D.skew_reverse_kl, {"alpha": 0.3}),
    "js": (D.js_divergence, {"beta": 0.9}),
    "tvd": (D.total_variation, {}),
    "adaptive_kl": (D.adaptive_kl, {"alpha": 0.5}),
}
NAMES = list(CASES)


def call(name, student, teacher, temperature=1.0, **override):
    fn, kw = CASES[name]
    return fn(student, teacher, temperature=temperature, **{**kw, **override})


def ref(name, student, teacher, temperature=1.0, **override):
    return reference(name, student, teacher, temperature, **{**CASES[name][1], **override})


# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------
N, V = 12, 37


def logits(seed, n=N, v=V, scale=3.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(n, v, generator=g, dtype=torch.float64)).to(dtype)


def with_infs(student, teacher, case, seed=0):
    """Put infinite logits into copies of the inputs. Every row keeps entries finite in both."""
    s, t = student.clone(), teacher.clone()
    rng = random.Random(seed)
    v = s.size(-1)
    for i in range(s.size(0)):
        cols = rng.sample(range(v), max(v // 4, 5))
        half = len(cols) // 2
        if case == "teacher_neg_inf":
            t[i, cols] = float("-inf")
        elif case == "student_neg_inf":
            s[i, cols] = float("-inf")
        elif case == "both_neg_inf":  # some entries in both, some in one model only
            s[i, cols[:half]] = float("-inf")
            t[i, cols[:half]] = float("-inf")
            s[i, cols[half:]] = float("-inf")
            t[i, cols[half + 1 :]] = float("-inf")
        elif case == "pos_inf":  # +inf in either model, mixed with -inf
            t[i, cols[0]] = float("inf")
            s[i, cols[1]] = float("inf")
            s[i, cols[2]] = float("-inf")
            t[i, cols[3]] = float("-inf")
            if i % 2:
                s[i, cols[4]] = t[i, cols[4]] = float("inf")
        elif case != "finite":
            raise KeyError(case)
    return s, t


INF_CASES = ["finite", "teacher_neg_inf", "student_neg_inf", "both_neg_inf", "pos_inf"]


# --------------------------------------------------------------------------------------------
# values against the reference
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("case", INF_CASES)
@pytest.mark.parametrize("name", NAMES)
def test_matches_float64_reference_fp32(name, case, temperature):
    s, t = with_infs(logits(1), logits(2), case, seed=3)
    out = call(name, s, t, temperature)
    assert out.shape == (N,) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref(name, s, t, temperature), rtol=1e-4, atol=2e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", ["finite", "both_neg_inf", "pos_inf"])
@pytest.mark.parametrize("name", NAMES)
def test_low_precision_inputs_are_computed_in_float32(name, case, dtype):
    """bf16/fp16 logits: the result is float32 and matches the float64 reference on the *rounded*
    inputs to float32 accuracy (a bf16 softmax would be off by ~1e-2); against the unrounded fp32
    inputs it is close only to bf16 accuracy."""
    s32, t32 = with_infs(logits(4), logits(5), case, seed=6)
    s, t = s32.to(dtype), t32.to(dtype)
    out = call(name, s, t, 2.0)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref(name, s, t, 2.0), rtol=1e-4, atol=2e-6)
    torch.testing.assert_close(out.double(), ref(name, s32, t32, 2.0), rtol=0.1, atol=0.05)


@pytest.mark.parametrize("name", NAMES)
def test_batched_shape_and_float64_inputs(name):
    """[B, T, V] gives [B, T]; float64 inputs are computed (and returned) in float64."""
    s, t = with_infs(logits(7, n=6), logits(8, n=6), "both_neg_inf", seed=9)
    s3, t3 = s.reshape(2, 3, V), t.reshape(2, 3, V)
    out = call(name, s3, t3)
    assert out.shape == (2, 3)
    torch.testing.assert_close(out.reshape(-1), call(name, s, t))
    out64 = call(name, s3.double(), t3.double(), 2.0)
    assert out64.dtype == torch.float64
    torch.testing.assert_close(out64, ref(name, s3, t3, 2.0), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_extreme_logits_stay_finite(name):
    """Logits of magnitude ~1e4: most probabilities underflow to 0 in float32, nothing becomes NaN,
    and the values still match the float64 reference."""
    s, t = with_infs(logits(10, scale=3e3), logits(11, scale=3e3), "both_neg_inf", seed=12)
    out = call(name, s, t)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref(name, s, t), rtol=1e-4, atol=1e-3)


def test_inf_entries_contribute_nothing():
    """The documented +-inf semantics in one hand-checked row: the +inf teacher entry and the -inf
    student entry drop out of the sum, and +inf is not a point mass in the softmax."""
    s = torch.tensor([[0.0, 1.0, float("-inf"), 2.0]])
    t = torch.tensor([[float("inf"), 1.0, 0.5, 2.0]])
    q = torch.softmax(torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64), 0)  # student over 0, 1, 3
    p = torch.softmax(torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64), 0)  # teacher over 1, 2, 3
    q1, q3, p1, p3 = q[1], q[2], p[0], p[2]
    fkl = p1 * (p1 / q1).log() + p3 * (p3 / q3).log()
    tvd = 0.5 * ((p1 - q1).abs() + (p3 - q3).abs())
    torch.testing.assert_close(D.forward_kl(s, t).double(), fkl.reshape(1), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(D.total_variation(s, t).double(), tvd.reshape(1), rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------------------------
# gradients
# --------------------------------------------------------------------------------------------
DIFFERENTIABLE = [n for n in NAMES if n != "adaptive_kl"]  # AKL's weights carry no gradient


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("case", ["finite", "both_neg_inf", "pos_inf"])
@pytest.mark.parametrize("name", DIFFERENTIABLE)
def test_gradcheck_float64(name, case, temperature):
    """Analytic vs finite-difference gradients w.r.t. both models' logits. With infinite entries the
    finite-difference derivative at an infinite logit is 0, so this also checks that they get none."""
    s, t = with_infs(logits(13, n=3, v=12, scale=1.5), logits(14, n=3, v=12, scale=1.5), case, seed=15)
    s, t = s.double().requires_grad_(), t.double().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: call(name, a, b, temperature), (s, t))


@pytest.mark.parametrize("case", ["finite", "both_neg_inf", "pos_inf"])
def test_adaptive_kl_gradient_is_the_weighted_fkl_rkl_gradient(case):
    """AKL's gradient is that of w_head FKL + w_tail RKL with the weights held constant."""
    s, t = with_infs(logits(16, n=5, v=11), logits(17, n=5, v=11), case, seed=18)
    s, t = s.double().requires_grad_(), t.double().requires_grad_()
    D.adaptive_kl(s, t, alpha=0.5, temperature=2.0).sum().backward()
    weights = []
    for sr, tr in zip(s.detach().tolist(), t.detach().tolist()):
        q, _, s_fin = ref_softmax(sr, 2.0)
        p, _, t_fin = ref_softmax(tr, 2.0)
        weights.append(ref_akl_weights(p, q, [v for v in range(len(p)) if s_fin[v] and t_fin[v]], 0.5))
    w = torch.tensor(weights, dtype=torch.float64)
    s2, t2 = s.detach().clone().requires_grad_(), t.detach().clone().requires_grad_()
    combo = w[:, 0] * D.forward_kl(s2, t2, temperature=2.0) + w[:, 1] * D.reverse_kl(s2, t2, temperature=2.0)
    combo.sum().backward()
    torch.testing.assert_close(s.grad, s2.grad)
    torch.testing.assert_close(t.grad, t2.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["teacher_neg_inf", "student_neg_inf", "both_neg_inf", "pos_inf"])
@pytest.mark.parametrize("name", NAMES)
def test_gradients_finite_and_zero_at_infinite_logits(name, case, dtype):
    """Training precision: gradients are finite everywhere and exactly 0 at every infinite logit.
    (A *finite* logit whose partner is infinite still gets the softmax-normalisation gradient.)"""
    s, t = with_infs(logits(19), logits(20), case, seed=21)
    s, t = s.to(dtype).requires_grad_(), t.to(dtype).requires_grad_()
    call(name, s, t, 2.0).sum().backward()
    for x in (s, t):
        assert torch.isfinite(x.grad).all()
        assert (x.grad[torch.isinf(x.detach())] == 0).all()


# --------------------------------------------------------------------------------------------
# properties
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("name", NAMES)
def test_nonnegative_on_finite_logits(name, temperature):
    out = call(name, logits(22), logits(23), temperature)
    assert (out >= -1e-6).all()
    assert (out > 1e-4).all()  # and not trivially zero on different distributions


@pytest.mark.parametrize("case", ["finite", "both_neg_inf", "pos_inf"])
@pytest.mark.parametrize("name", NAMES)
def test_zero_when_student_equals_teacher(name, case):
    x, _ = with_infs(logits(24), logits(25), case, seed=26)  # the student's infinities in both
    out = call(name, x, x.clone(), 2.0)
    torch.testing.assert_close(out, torch.zeros_like(out), rtol=0, atol=1e-6)


@pytest.mark.parametrize("case", ["finite", "both_neg_inf"])
def test_skew_alpha_zero_is_plain_kl_and_one_is_zero(case):
    s, t = with_infs(logits(26), logits(27), case, seed=28)
    torch.testing.assert_close(D.skew_kl(s, t, alpha=0.0, temperature=2.0), D.forward_kl(s, t, temperature=2.0))
    torch.testing.assert_close(
        D.skew_reverse_kl(s, t, alpha=0.0, temperature=2.0), D.reverse_kl(s, t, temperature=2.0)
    )
    for fn in (D.skew_kl, D.skew_reverse_kl):
        out = fn(s, t, alpha=1.0)
        torch.testing.assert_close(out, torch.zeros_like(out), rtol=0, atol=1e-6)


def test_adaptive_kl_alpha_zero_is_forward_kl():
    """No teacher mass is <= 0, so the tail is empty and AKL = FKL."""
    s, t = logits(29), logits(30)
    torch.testing.assert_close(D.adaptive_kl(s, t, alpha=0.0), D.forward_kl(s, t))


def test_js_limits_symmetry_and_bound():
    s, t = logits(31, scale=6.0), logits(32, scale=6.0)
    for beta in (0.0, 1.0):
        out = D.js_divergence(s, t, beta=beta)
        torch.testing.assert_close(out, torch.zeros_like(out), rtol=0, atol=1e-6)
    js = D.js_divergence(s, t, beta=0.5)
    torch.testing.assert_close(js, D.js_divergence(t, s, beta=0.5))
    assert (js <= math.log(2) + 1e-6).all() and (js > 0).all()
    # near-disjoint distributions approach the bound
    a = torch.full((1, 4), -30.0)
    b = a.clone()
    a[0, 0] = b[0, 1] = 30.0
    torch.testing.assert_close(D.js_divergence(a, b, beta=0.5), torch.tensor([math.log(2)]), rtol=0, atol=1e-5)


def test_tvd_in_unit_interval():
    s, t = with_infs(logits(33, scale=8.0), logits(34, scale=8.0), "both_neg_inf", seed=35)
    out = D.total_variation(s, t)
    assert ((out >= 0) & (out <= 1)).all()
    a = torch.tensor([[40.0, -40.0]])
    torch.testing.assert_close(D.total_variation(a, -a), torch.tensor([1.0]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_temperature_divides_both_models(name):
    s, t = logits(36), logits(37)
    torch.testing.assert_close(call(name, s, t, 2.0), call(name, s / 2, t / 2, 1.0))


def test_registry_and_shape_errors():
    assert set(D.DIVERGENCES) == {"forward_kl", "reverse_kl", "skew_kl", "skew_reverse_kl", "js", "tvd", "adaptive_kl"}
    assert D.get_divergence("js") is D.js_divergence
    with pytest.raises(ValueError, match="unknown divergence"):
        D.get_divergence("kl2")
    with pytest.raises(ValueError, match="differ in shape"):
        D.forward_kl(torch.zeros(2, 5), torch.zeros(2, 6))


# --------------------------------------------------------------------------------------------
# ULD: vocabularies of different sizes (cross-tokenizer KD)
# --------------------------------------------------------------------------------------------


def ref_uld_row(s_row, t_row, temperature):
    """sum_k |q_(k) - p_(k)| with both probability lists sorted descending, the shorter padded with 0."""
    q = sorted(ref_softmax(s_row, temperature)[0], reverse=True)
    p = sorted(ref_softmax(t_row, temperature)[0], reverse=True)
    width = max(len(q), len(p))
    q, p = q + [0.0] * (width - len(q)), p + [0.0] * (width - len(p))
    return sum(abs(a - b) for a, b in zip(q, p))


def uld_inputs(vs, vt, seed, infs=False, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(N, vs, generator=g, dtype=torch.float64) * 3
    t = torch.randn(N, vt, generator=g, dtype=torch.float64) * 3
    if infs:
        s[0, 1], t[1, 2], s[2, 0], t[2, 3] = -math.inf, -math.inf, math.inf, math.inf
        t[3, : vt - 1] = -math.inf  # a certain teacher
    return s.to(dtype), t.to(dtype)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("infs", [False, True])
@pytest.mark.parametrize("vs,vt", [(V, V), (V, V + 7), (V + 5, V - 3)])
def test_uld_matches_float64_reference(vs, vt, infs, temperature):
    s, t = uld_inputs(vs, vt, seed=vs + vt, infs=infs)
    want = torch.tensor([ref_uld_row(a.tolist(), b.tolist(), temperature) for a, b in zip(s, t)], dtype=torch.float64)
    got = D.universal_logit_distance(s, t, temperature=temperature)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    got32 = D.universal_logit_distance(s.float(), t.float(), temperature=temperature)
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), want, rtol=1e-5, atol=1e-6)


def test_uld_bf16_inputs_are_computed_in_float32():
    s, t = uld_inputs(V, V + 4, seed=3, infs=True)
    s16, t16 = s.bfloat16(), t.bfloat16()
    got = D.universal_logit_distance(s16, t16)
    assert got.dtype == torch.float32
    want = D.universal_logit_distance(s16.double(), t16.double())  # the same rounded inputs in float64
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("infs", [False, True])
def test_uld_gradcheck_float64(infs):
    s, t = uld_inputs(V - 4, V + 3, seed=11, infs=infs)
    s = s.masked_fill(torch.isinf(s), -math.inf).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: D.universal_logit_distance(x, t), (s,))
    s.grad = None
    D.universal_logit_distance(s, t).sum().backward()
    assert torch.isfinite(s.grad).all() and (s.grad[torch.isinf(s)] == 0).all()


def test_uld_properties():
    s, t = uld_inputs(V, V + 9, seed=5)
    d = D.universal_logit_distance(s, t)
    assert (d >= 0).all() and (d <= 2 + 1e-12).all()
    # invariant to permuting either vocabulary, zero for the same distribution, zero-padded entries count
    perm_s, perm_t = torch.randperm(V), torch.randperm(V + 9)
    torch.testing.assert_close(D.universal_logit_distance(s[:, perm_s], t[:, perm_t]), d)
    assert D.universal_logit_distance(s, s[:, torch.randperm(V)]).abs().max() < 1e-12
    padded = torch.cat([s, torch.full((N, 3), -math.inf, dtype=s.dtype)], dim=1)
    assert D.universal_logit_distance(s, padded).abs().max() < 1e-12
    with pytest.raises(ValueError, match="positions"):
        D.universal_logit_distance(s[:2], t)


@pytest.mark.parametrize("name", NAMES)
def test_row_without_finite_teacher_logit_contributes_nothing(name):
    """A row whose teacher logits are all -inf (or whose student logits are) has no entry finite in
    both models: it contributes 0 (spec 7.4), with a zero gradient for the teacher's case, not NaN;
    the other rows are unchanged."""
    s, t = logits(40), logits(41)
    t[1] = float("-inf")
    s[2] = float("-inf")
    s_in = s.clone().requires_grad_(True)
    out = call(name, s_in, t)
    assert out[1].item() == 0.0 and out[2].item() == 0.0
    keep = [0] + list(range(3, s.size(0)))
    torch.testing.assert_close(out[keep].double(), ref(name, s[keep], t[keep]), rtol=1e-5, atol=1e-6)
    out.sum().backward()
    # (a student row of all -inf has no gradient to speak of; its cross-entropy is inf anyway)
    assert torch.isfinite(s_in.grad[keep + [1]]).all() and s_in.grad[1].abs().max().item() == 0.0


def test_adaptive_kl_tail_includes_mass_exactly_alpha():
    """Spec 1c: the tail holds the entries whose cumulative (ascending) teacher mass is <= alpha; here
    p = [1/8, 3/8, 1/2] exactly, so at alpha 0.5 the tail is the first two entries (a strict < would
    leave it the first alone)."""
    t = torch.log(torch.tensor([[1.0, 3.0, 4.0]]))
    s = torch.tensor([[0.3, -0.2, 0.1]])
    p = torch.tensor([1.0, 3.0, 4.0], dtype=torch.float64) / 8
    q = torch.softmax(s[0].double(), -1)
    tail = torch.tensor([True, True, False])
    g_head, g_tail = (p - q).abs()[~tail].sum(), (p - q).abs()[tail].sum()
    fkl, rkl = (p * (p / q).log()).sum(), (q * (q / p).log()).sum()
    expected = (g_head * fkl + g_tail * rkl) / (g_head + g_tail)
    torch.testing.assert_close(D.adaptive_kl(s, t, alpha=0.5)[0].double(), expected, rtol=1e-6, atol=1e-7)
