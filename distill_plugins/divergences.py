"""Token-level divergences between a teacher and a student distribution: pure functions.

Every function takes ``student_logits`` and ``teacher_logits`` of the same shape ``[..., V]`` (any
float dtype) and returns the per-position divergence ``[...]`` in float32 (float64 if an input is
float64). Probabilities are always formed in at least float32 (never in the input's bf16/fp16; a
float64 input, e.g. for gradcheck, stays float64), and mixtures are formed in probability space,
then logged, with no epsilon (as DistiLLM's; DSKD's JS adds 1e-9 inside its logs, a difference
below float32's resolution of most terms; spec section 1 and 7.3).

Conventions (``../shared/specs/methods.md``):

* p = softmax(teacher / T), q = softmax(student / T); ``temperature`` T divides both, without the
  Hinton T^2 factor (DSKD's convention; T = 1 reproduces DistiLLM/MiniLLM).
* ``forward_kl`` is the true KL(p || q) = sum p (log p - log q). DistiLLM and MiniLLM log the soft
  cross-entropy -sum p log q instead, which is KL + H(p): same gradient, different value.
* Non-finite logits: a vocabulary entry whose logit is +-inf in either model contributes nothing to
  the sum over the vocabulary (the references' ``masked_fill(isinf(s) | isinf(t), 0)``). A ``+inf``
  logit is treated like ``-inf`` inside the softmax, so it can never turn a row into NaN; the
  references produce NaN there. An infinite logit gets zero gradient; a finite logit at a masked
  entry (its partner is infinite) still gets the gradient of its own softmax normalisation.

Registry: ``DIVERGENCES`` maps the names used by criterions and options to these functions.
"""
from typing import Callable, Dict, NamedTuple

import torch
from torch import Tensor

__all__ = [
    "forward_kl",
    "reverse_kl",
    "skew_kl",
    "skew_reverse_kl",
    "js_divergence",
    "total_variation",
    "adaptive_kl",
    "universal_logit_distance",
    "DIVERGENCES",
    "get_divergence",
]


class _Dists(NamedTuple):
    q: Tensor  # student probabilities (0 at masked entries' -inf, else the softmax)
    p: Tensor  # teacher probabilities
    log_q: Tensor  # student log-probabilities, 0 at masked entries
    log_p: Tensor  # teacher log-probabilities, 0 at masked entries
    masked: Tensor  # bool, True where either logit is +-inf


def _distributions(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> _Dists:
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ in shape"
        )
    dtype = torch.promote_types(torch.promote_types(student_logits.dtype, teacher_logits.dtype), torch.float32)
    s = student_logits.to(dtype)
    t = teacher_logits.to(dtype)
    if temperature != 1.0:
        s = s / temperature
        t = t / temperature
    s_inf, t_inf = torch.isinf(s), torch.isinf(t)
    masked = s_inf | t_inf
    if s_inf.any():
        s = s.masked_fill(s == float("inf"), float("-inf"))
    if t_inf.any():
        t = t.masked_fill(t == float("inf"), float("-inf"))
    log_q = torch.log_softmax(s, dim=-1)
    log_p = torch.log_softmax(t, dim=-1)
    # Each model's probability is 0 at its own infinite logits (already so, except in a row with no
    # finite logit, whose softmax is NaN: such a row then contributes 0, spec 7.4). Zero the log
    # terms where either is masked: every product below then vanishes there, forward and backward
    # (no 0 * inf = NaN in either direction).
    q, p = log_q.exp().masked_fill(s_inf, 0.0), log_p.exp().masked_fill(t_inf, 0.0)
    return _Dists(q, p, log_q.masked_fill(masked, 0.0), log_p.masked_fill(masked, 0.0), masked)


def _safe_log(x: Tensor, masked: Tensor) -> Tensor:
    """log(x), 0 at masked entries. Clamping at the smallest normal float only changes entries
    whose probabilities underflowed to 0 in both models, where log(0) would give 0 * inf = NaN."""
    return torch.log(x.masked_fill(masked, 1.0).clamp_min(torch.finfo(x.dtype).tiny))


def forward_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """KL(p || q) = sum_v p (log p - log q). Hinton et al. 2015; spec 1a/1c."""
    d = _distributions(student_logits, teacher_logits, temperature)
    return (d.p * (d.log_p - d.log_q)).sum(-1)


def reverse_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """KL(q || p) = sum_v q (log q - log p). MiniLLM (Gu et al. 2024); spec 1a."""
    d = _distributions(student_logits, teacher_logits, temperature)
    return (d.q * (d.log_q - d.log_p)).sum(-1)


def skew_kl(
    student_logits: Tensor, teacher_logits: Tensor, alpha: float = 0.1, temperature: float = 1.0
) -> Tensor:
    """Skew KL: KL(p || a p + (1 - a) q). DistiLLM (Ko et al. 2024), a = 0.1; a = 0 is forward KL."""
    d = _distributions(student_logits, teacher_logits, temperature)
    log_m = _safe_log(alpha * d.p + (1.0 - alpha) * d.q, d.masked)
    return (d.p * (d.log_p - log_m)).sum(-1)


def skew_reverse_kl(
    student_logits: Tensor, teacher_logits: Tensor, alpha: float = 0.1, temperature: float = 1.0
) -> Tensor:
    """Skew reverse KL: KL(q || (1 - a) p + a q). DistiLLM, a = 0.1; a = 0 is reverse KL."""
    d = _distributions(student_logits, teacher_logits, temperature)
    log_m = _safe_log((1.0 - alpha) * d.p + alpha * d.q, d.masked)
    return (d.q * (d.log_q - log_m)).sum(-1)


def js_divergence(
    student_logits: Tensor, teacher_logits: Tensor, beta: float = 0.5, temperature: float = 1.0
) -> Tensor:
    """Generalized JSD: b KL(q || m) + (1 - b) KL(p || m), m = (1 - b) p + b q.

    GKD (Agarwal et al. 2024) as DistiLLM writes it (its GKD baseline uses b = 0.9); b = 0.5 is the
    classic Jensen-Shannon divergence (DSKD's ``js``), bounded by log 2. b = 0 and b = 1 give 0.
    """
    d = _distributions(student_logits, teacher_logits, temperature)
    log_m = _safe_log((1.0 - beta) * d.p + beta * d.q, d.masked)
    kl_q = (d.q * (d.log_q - log_m)).sum(-1)
    kl_p = (d.p * (d.log_p - log_m)).sum(-1)
    return beta * kl_q + (1.0 - beta) * kl_p


def total_variation(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0
) -> Tensor:
    """Total variation distance 1/2 sum_v |p - q|, in [0, 1]. DistiLLM ``tv_distance``."""
    d = _distributions(student_logits, teacher_logits, temperature)
    return 0.5 * (d.p - d.q).abs().masked_fill(d.masked, 0.0).sum(-1)


def adaptive_kl(
    student_logits: Tensor, teacher_logits: Tensor, alpha: float = 0.5, temperature: float = 1.0
) -> Tensor:
    """Adaptive KL (Wu et al. 2024, "Rethinking KL divergence in KD for LLMs"), DSKD's form.

    Sort the teacher's probabilities ascending; the tail is the entries whose cumulative teacher
    mass is <= alpha, the head the rest. With gaps g = sum |p - q| over head and tail (no gradient),
    AKL = g_head / (g_head + g_tail) * FKL + g_tail / (g_head + g_tail) * RKL.
    Where p == q exactly both gaps are 0; the reference then divides 0 by 0 (NaN), we return 0.
    """
    d = _distributions(student_logits, teacher_logits, temperature)
    fkl = (d.p * (d.log_p - d.log_q)).sum(-1)
    rkl = (d.q * (d.log_q - d.log_p)).sum(-1)
    with torch.no_grad():
        sorted_p, order = d.p.sort(dim=-1)
        gap = (sorted_p - d.q.gather(-1, order)).abs().masked_fill(d.masked.gather(-1, order), 0.0)
        tail = sorted_p.cumsum(-1) <= alpha
        g_tail = gap.masked_fill(~tail, 0.0).sum(-1)
        g_head = gap.sum(-1) - g_tail
        total = (g_head + g_tail).clamp_min(torch.finfo(torch.float32).tiny)
    return g_head / total * fkl + g_tail / total * rkl


def universal_logit_distance(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0
) -> Tensor:
    """ULD (Boizard et al. 2024, "Towards cross-tokenizer distillation"), DSKD's form: sum_k |q_(k) - p_(k)|,
    the L1 distance between the student's and the teacher's probabilities each sorted in descending
    order, the smaller vocabulary padded with zeros. The two vocabularies may differ in size
    (``[..., Vs]`` and ``[..., Vt]``); no 1/2 factor. An infinite logit has probability 0 (sorted last).
    DSKD passes its KD temperature but never applies it; T = 1 reproduces it."""
    if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ in their positions"
        )
    dtype = torch.promote_types(torch.promote_types(student_logits.dtype, teacher_logits.dtype), torch.float32)
    probs = []
    for logits in (student_logits, teacher_logits):
        x = logits.to(dtype)
        if temperature != 1.0:
            x = x / temperature
        x = x.masked_fill(x == float("inf"), float("-inf"))
        probs.append(torch.softmax(x, dim=-1).sort(dim=-1, descending=True).values)
    q, p = probs
    width = max(q.size(-1), p.size(-1))
    q = torch.nn.functional.pad(q, (0, width - q.size(-1)))
    p = torch.nn.functional.pad(p, (0, width - p.size(-1)))
    return (q - p).abs().sum(-1)


DIVERGENCES: Dict[str, Callable[..., Tensor]] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "skew_kl": skew_kl,
    "skew_reverse_kl": skew_reverse_kl,
    "js": js_divergence,
    "tvd": total_variation,
    "adaptive_kl": adaptive_kl,
}


def get_divergence(name: str) -> Callable[..., Tensor]:
    try:
        return DIVERGENCES[name]
    except KeyError:
        raise ValueError(
            f"unknown divergence {name!r}; choose one of {', '.join(sorted(DIVERGENCES))}"
        ) from None
