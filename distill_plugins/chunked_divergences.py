"""Memory-efficient token-level KD losses: the criterion's loss computed a chunk of tokens at a time.

    loss = (1 - r) * sum_i CE(s_i, y_i) + r * sum_i D(p_i || q_i)        (r = kd_ratio)

is the same sum as ``TokenLevelKDCriterion``'s plain path, but the [N, V] float32 tensors that the
plain form holds for both models at once (softmaxes, logs, products and their gradients) exist here
for ``chunk_size`` rows only. Each chunk is upcast to float32 first (never a softmax of bf16
logits: rounding logits to bf16 before the softmax loses up to 23% of the gradient), its loss and
its gradient w.r.t. the student logits are computed at once (by autograd through the pure
functions of ``divergences.py``, or analytically for forward KL), and the gradient is kept; the
backward pass only scales it by the incoming gradient (Liger-Kernel's chunked-loss design, Hsu et
al. 2024). Peak extra memory: about ``chunk_size x V x 4 B`` times a few temporaries.

Two forms:

* ``chunked_kd_loss(student_logits [N, V], ...)``: the student's logits exist; their gradient
  [N, V] is the only full-size tensor (in their dtype; float32 for fp16 logits, whose unscaled
  gradient would underflow).
* ``fused_kd_loss(hidden [N, d], weight [V, d], ...)``: the output projection is fused in, so the
  student's logits never exist beyond one chunk; gradients for ``hidden`` and ``weight`` are
  accumulated in float32 (``weight`` is the tied embedding table of our GPT-2 family).

Columns of the vocabulary whose logit is a constant whatever the hidden state (``FixedColumns``:
rows no token maps to, after a Hugging Face vocabulary import) are set after the projection on
either side, and get no gradient, exactly as the models' own output layers do.

The teacher side is either its logits [N, V] or a lazy source whose rows are produced per chunk
(``ProjectedLogits(hidden, weight)`` in the teacher's dtype, or ``teacher_cache.CachedLogits``); a list of either gives the divergence one teacher-logit
chunk per teacher (multi-teacher losses); with ``part_weights`` (w_1..w_K) the divergence returns
[n, K] columns D_k, the KD term is sum_k w_k D_k and ``KDLoss.parts`` holds the K sums of D_k.
Divergences are row-wise, so every chunk size gives the same result as the plain form; +-inf
logits keep the plain form's semantics (``divergences.py``). With no teacher (None), kd_ratio 0 and
``cross_entropy_loss_and_grad`` both forms give the CE term alone.
The gradient is computed during the forward pass: call ``backward`` at most once on the result.
"""
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "FixedColumns",
    "ProjectedLogits",
    "KDLoss",
    "plain_kd_loss",
    "chunked_kd_loss",
    "fused_kd_loss",
    "forward_kl_loss_and_grad",
    "DEFAULT_CHUNK_SIZE",
]

DEFAULT_CHUNK_SIZE = 1024

Divergence = Callable[..., Tensor]  # (student [n, V], teacher [n, V] or list of them) -> [n]
LossAndGrad = Callable[..., Tuple[Tensor, Tensor, Optional[Tensor]]]  # see forward_kl_loss_and_grad


class FixedColumns(NamedTuple):
    """Vocabulary columns ``index`` whose logit is ``value`` whatever the hidden state."""

    index: Tensor
    value: float

    def apply_(self, logits: Tensor) -> Tensor:
        return logits.index_fill_(-1, self.index.to(logits.device), self.value)


class ProjectedLogits(NamedTuple):
    """Logits ``hidden @ weight.T`` ([N, d] x [V, d]) made chunk by chunk, without gradient
    (then ``fixed`` columns set)."""

    hidden: Tensor
    weight: Tensor
    fixed: Optional[FixedColumns] = None

    def rows(self, start: int, end: int) -> Tensor:
        logits = self.hidden[start:end] @ self.weight.t()
        return self.fixed.apply_(logits) if self.fixed is not None else logits

    def size(self, dim: int) -> int:
        return self.hidden.size(0) if dim == 0 else self.weight.size(0)


TeacherSource = Union[Tensor, ProjectedLogits]
Teachers = Union[TeacherSource, Sequence[TeacherSource]]


class KDLoss(NamedTuple):
    loss: Tensor  # (1 - r) ce + r kd, differentiable
    ce: Tensor  # sum of the cross-entropies, no gradient
    kd: Tensor  # sum of the divergences, no gradient
    parts: Optional[Tensor] = None  # [K] unweighted sums of the K parts (``part_weights``), no gradient


def _is_lazy(source) -> bool:
    """Rows made on demand (``ProjectedLogits``, ``teacher_cache.CachedLogits``): ``rows(start, end)``."""
    return not torch.is_tensor(source) and callable(getattr(source, "rows", None))


def teacher_rows(teachers: Teachers, start: int, end: int):
    if _is_lazy(teachers):
        with torch.no_grad():
            return teachers.rows(start, end)
    if isinstance(teachers, (list, tuple)):
        return [teacher_rows(t, start, end) for t in teachers]
    return teachers[start:end].detach()


def dense_rows(source) -> Tensor:
    """All rows of one teacher source as a tensor [N, V] (for the plain form)."""
    return teacher_rows(source, 0, source.size(0)) if _is_lazy(source) else source


def _count_rows(teachers: Teachers) -> int:
    if not _is_lazy(teachers) and isinstance(teachers, (list, tuple)):
        return _count_rows(teachers[0])
    return teachers.size(0)


def plain_kd_loss(
    student_logits: Tensor, labels: Tensor, teacher_logits, divergence: Divergence, kd_ratio: float,
    part_weights: Optional[Sequence[float]] = None,
) -> KDLoss:
    """The criterion's plain form, on materialised logits (reference for tests and benchmarks)."""
    ce = F.cross_entropy(student_logits.float(), labels, reduction="sum")
    rows = divergence(student_logits, teacher_logits)
    parts = None
    if part_weights is not None:
        parts = rows.detach().sum(0)
        rows = rows * rows.new_tensor(part_weights)
    kd = rows.sum()
    return KDLoss((1.0 - kd_ratio) * ce + kd_ratio * kd, ce.detach(), kd.detach(), parts)


def _row_dot(a: Tensor, b: Tensor) -> Tensor:
    """sum_v a[i, v] b[i, v] per row, without an [n, V] product tensor."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def _ce_rows_and_grad(log_q: Tensor, labels: Tensor, need_grad: bool):
    """CE per row from log_softmax(s), and its gradient softmax(s) - onehot (made in place of log_q)."""
    ce_rows = -log_q.gather(1, labels.unsqueeze(1)).squeeze(1)
    if not need_grad:
        return ce_rows, None
    grad = log_q.exp_()
    grad[torch.arange(labels.numel(), device=grad.device), labels] -= 1.0
    return ce_rows, grad


def _forward_kl_masked(s: Tensor, t: Tensor, temperature: float):
    """Forward KL per row and its gradient w.r.t. s, with +-inf entries masked (slow path).

    With U the entries finite in both models and P_U = sum_U p:
    d/ds_j sum_U p (log p - log q) = (q_j P_U - p_j [j in U]) / T."""
    s, t = s / temperature, t.float() / temperature
    masked = torch.isinf(s) | torch.isinf(t)
    s = s.masked_fill(s == float("inf"), float("-inf"))
    t = t.masked_fill(t == float("inf"), float("-inf"))
    log_q = torch.log_softmax(s, dim=-1)
    log_p = torch.log_softmax(t, dim=-1)
    p_u = log_p.exp().masked_fill_(masked, 0.0)
    value = _row_dot(p_u, log_p.masked_fill_(masked, 0.0).sub_(log_q.masked_fill(masked, 0.0)))
    grad = log_q.exp_().mul_(p_u.sum(-1, keepdim=True)).sub_(p_u).div_(temperature)
    return value, grad


def _forward_kl_unmasked(s: Tensor, t: Tensor, labels: Tensor, r: float, inv_temp: float):
    """(CE rows, KL rows, gradient) without masking, written for ``torch.compile`` (no branches on
    data, no in-place ops): inductor fuses it into a few passes over the chunk."""
    log_q = torch.log_softmax(s * inv_temp, dim=-1)
    log_p = torch.log_softmax(t.float() * inv_temp, dim=-1)
    p = log_p.exp()
    kd_rows = (p * (log_p - log_q)).sum(-1)
    log_q1 = torch.log_softmax(s, dim=-1)
    ce_rows = -log_q1.gather(1, labels.unsqueeze(1)).squeeze(1)
    onehot = torch.zeros_like(s).scatter_(1, labels.unsqueeze(1), 1.0)
    grad = (r * inv_temp) * (log_q.exp() - p) + (1.0 - r) * (log_q1.exp() - onehot)
    return ce_rows, kd_rows, grad


_COMPILED = {}


def _compiled_unmasked():
    if "fn" not in _COMPILED:
        _COMPILED["fn"] = torch.compile(_forward_kl_unmasked, dynamic=True)
    return _COMPILED["fn"]


def _forward_kl_masked_loss(s: Tensor, teacher: Tensor, labels: Tensor, r: float, temperature: float,
                            need_grad: bool):
    kd_rows, g_kd = _forward_kl_masked(s, teacher, temperature)
    ce = F.cross_entropy(s, labels, reduction="sum")
    grad = None
    if need_grad:
        g_ce = torch.softmax(s, dim=-1)
        g_ce[torch.arange(labels.numel(), device=s.device), labels] -= 1.0
        grad = g_kd.mul_(r).add_(g_ce, alpha=1.0 - r)
    return ce, kd_rows.sum(), grad


def forward_kl_loss_and_grad(
    student: Tensor, teacher: Tensor, labels: Tensor, kd_ratio: float, need_grad: bool = True,
    temperature: float = 1.0, compiled: bool = False,
):
    """(sum CE, sum KL(p || q), d[(1 - r) CE + r KL] / d student or None) of a chunk, analytically.

    q = softmax(s / T), p = softmax(t / T); d KL / ds = (q - p) / T and d CE / ds = softmax(s) - onehot
    (at T = 1 one softmax serves both). Equals ``plain_kd_loss`` with ``divergences.forward_kl`` and
    its autograd gradient, +-inf semantics included: a chunk with a non-finite row is redone by a
    masked path (and CE by ``F.cross_entropy``, which gives inf/NaN there exactly as the plain form).
    ``compiled``: the unmasked case runs as one ``torch.compile``d function (compiled on first use).
    """
    s = student.float()
    r = kd_ratio
    if compiled:
        ce_rows, kd_rows, grad = _compiled_unmasked()(s, teacher, labels, r, 1.0 / temperature)
        if bool(torch.isfinite(kd_rows).all()):
            return ce_rows.sum(), kd_rows.sum(), grad if need_grad else None
        return _forward_kl_masked_loss(s, teacher, labels, r, temperature, need_grad)
    log_q = torch.log_softmax(s / temperature if temperature != 1.0 else s, dim=-1)
    log_p = torch.log_softmax(teacher.float() / temperature if temperature != 1.0 else teacher, dim=-1,
                          dtype=torch.float32)
    p = log_p.exp()
    kd_rows = _row_dot(p, log_p.sub_(log_q))
    del log_p
    if not bool(torch.isfinite(kd_rows).all()):
        return _forward_kl_masked_loss(s, teacher, labels, r, temperature, need_grad)
    if temperature == 1.0:  # one softmax for both terms: r (q - p) + (1 - r) (q - onehot)
        ce_rows, grad = _ce_rows_and_grad(log_q, labels, need_grad)
        if need_grad:
            grad[torch.arange(labels.numel(), device=grad.device), labels] += r  # onehot weight 1 - r
            grad.sub_(p, alpha=r)
        return ce_rows.sum(), kd_rows.sum(), grad
    grad = None
    if need_grad:
        grad = log_q.exp_().sub_(p).mul_(r / temperature)
    del log_q, p
    ce_rows, g_ce = _ce_rows_and_grad(torch.log_softmax(s, dim=-1), labels, need_grad)
    if need_grad:
        grad.add_(g_ce, alpha=1.0 - r)
    return ce_rows.sum(), kd_rows.sum(), grad


def reverse_kl_loss_and_grad(
    student: Tensor, teacher: Tensor, labels: Tensor, kd_ratio: float, need_grad: bool = True,
    temperature: float = 1.0,
):
    """(sum CE, sum KL(q || p), d[(1 - r) CE + r KL] / d student or None) of a chunk, analytically.

    With K the entries finite in both models, d_v = log q_v - log p_v and h_v = q_v (d_v + 1) on K
    (0 elsewhere): KL = sum_K q d and dKL/ds_j = (h_j - q_j sum_K h) / T, the Triton kernel's formula.
    Equals ``plain_kd_loss`` with ``divergences.reverse_kl`` and its autograd gradient, +-inf
    semantics included (CE on the raw logits, as ``F.cross_entropy``)."""
    s = student.float()
    inv_temp = 1.0 / temperature
    sk = s * inv_temp if temperature != 1.0 else s
    tk = teacher.float() * inv_temp if temperature != 1.0 else teacher.float()
    masked = torch.isinf(sk) | torch.isinf(tk)
    any_masked = bool(masked.any())
    if any_masked:
        sk = sk.masked_fill(sk == float("inf"), float("-inf"))
        tk = tk.masked_fill(tk == float("inf"), float("-inf"))
    log_q = torch.log_softmax(sk, dim=-1)
    d = log_q - torch.log_softmax(tk, dim=-1)
    q = log_q.exp()
    q_kept = q.masked_fill(masked, 0.0) if any_masked else q
    if any_masked:
        d.masked_fill_(masked, 0.0)
    kd_rows = _row_dot(q_kept, d)
    same = temperature == 1.0 and not bool((s == float("inf")).any())  # log_q is then log_softmax(s)
    ce_rows, g_ce = _ce_rows_and_grad(log_q if same else torch.log_softmax(s, dim=-1), labels, need_grad)  # log_q: done with it
    if not need_grad:
        return ce_rows.sum(), kd_rows.sum(), None
    h = d.add_(1.0).mul_(q_kept)  # h_v, in place of d
    grad = h.sub_(q * h.sum(-1, keepdim=True)).mul_(kd_ratio * inv_temp)
    return ce_rows.sum(), kd_rows.sum(), grad.add_(g_ce, alpha=1.0 - kd_ratio)


@dataclass
class _Spec:
    labels: Tensor
    teachers: Teachers
    divergence: Divergence
    kd_ratio: float
    chunk_size: int
    need_grad: bool
    loss_and_grad: Optional[LossAndGrad]
    part_weights: Optional[Sequence[float]] = None
    fixed_columns: Optional[FixedColumns] = None  # of the student's fused projection


def _chunk_loss(s: Tensor, spec: _Spec, start: int, end: int):
    """CE sum, KD sum and (if needed) d[(1 - r) CE + r KD] / ds, float32, for rows [start, end)."""
    labels = spec.labels[start:end]
    teacher = teacher_rows(spec.teachers, start, end) if spec.teachers is not None else None
    r = spec.kd_ratio
    if spec.loss_and_grad is not None:
        ce, kd, grad = spec.loss_and_grad(s, teacher, labels, r, spec.need_grad)
        return ce.detach(), kd.detach(), grad, None
    parts = None
    with torch.enable_grad():
        s = s.detach().requires_grad_(spec.need_grad)
        ce = F.cross_entropy(s, labels, reduction="sum")
        rows = spec.divergence(s, teacher)
        if spec.part_weights is not None:  # [n, K] parts, weighted into the KD term
            parts = rows.detach().sum(0)
            kd = (rows * rows.new_tensor(spec.part_weights)).sum()
        else:
            kd = rows.sum()
        grad = None
        if spec.need_grad:
            (grad,) = torch.autograd.grad((1.0 - r) * ce + r * kd, s)
    return ce.detach(), kd.detach(), grad, parts


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield start, min(start + size, n)


class _ChunkedKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student: Tensor, spec: _Spec):
        ctx.student_dtype = student.dtype
        n = student.size(0)
        ce = student.new_zeros((), dtype=torch.float32)
        kd = student.new_zeros((), dtype=torch.float32)
        parts = student.new_zeros(len(spec.part_weights or ()), dtype=torch.float32)
        grad = None
        if spec.need_grad:  # fp16 gradients are kept in fp32: unscaled, small ones would underflow
            grad_dtype = torch.float32 if student.dtype == torch.float16 else student.dtype
            grad = torch.empty(student.shape, dtype=grad_dtype, device=student.device)
        for start, end in _chunks(n, spec.chunk_size):
            c, k, g, p = _chunk_loss(student[start:end].float(), spec, start, end)
            ce += c
            kd += k
            if p is not None:
                parts += p
            if g is not None:
                grad[start:end] = g
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(ce, kd, parts)
        return (1.0 - spec.kd_ratio) * ce + spec.kd_ratio * kd, ce, kd, parts

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_kd, _grad_parts):
        (grad,) = ctx.saved_tensors
        grad = grad.mul_(grad_loss.to(grad.dtype))  # in place: no second [N, V] tensor
        return grad if grad.dtype == ctx.student_dtype else grad.to(ctx.student_dtype), None


class _FusedKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, spec: _Spec):
        ctx.hidden_dtype, ctx.weight_dtype = hidden.dtype, weight.dtype
        n = hidden.size(0)
        ce = hidden.new_zeros((), dtype=torch.float32)
        kd = hidden.new_zeros((), dtype=torch.float32)
        parts = hidden.new_zeros(len(spec.part_weights or ()), dtype=torch.float32)
        grad_hidden = grad_weight = None
        # fp16: the chunk's gradient is multiplied in fp32, unscaled it would underflow in fp16.
        mm_dtype = torch.float32 if hidden.dtype == torch.float16 else hidden.dtype
        w_mm = weight if weight.dtype == mm_dtype else weight.to(mm_dtype)
        if spec.need_grad:
            grad_hidden = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device)
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for start, end in _chunks(n, spec.chunk_size):
            h = hidden[start:end]
            logits = h @ weight.t()  # in the compute dtype, as the model's output layer would
            if spec.fixed_columns is not None:
                spec.fixed_columns.apply_(logits)
            c, k, g, p = _chunk_loss(logits.float(), spec, start, end)
            del logits
            ce += c
            kd += k
            if p is not None:
                parts += p
            if g is not None:
                g = g.to(mm_dtype)
                if spec.fixed_columns is not None:  # constant logits: no gradient
                    g.index_fill_(1, spec.fixed_columns.index.to(g.device), 0.0)
                grad_hidden[start:end] = g @ w_mm
                grad_weight += g.t() @ h.to(mm_dtype)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.mark_non_differentiable(ce, kd, parts)
        return (1.0 - spec.kd_ratio) * ce + spec.kd_ratio * kd, ce, kd, parts

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_kd, _grad_parts):
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = grad_loss.float()
        return (grad_hidden.mul_(scale).to(ctx.hidden_dtype),
                grad_weight.mul_(scale).to(ctx.weight_dtype), None)


def _check(chunk_size: int, n: int, labels: Tensor, teachers: Teachers):
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    n_teacher = n if teachers is None else _count_rows(teachers)  # None: the CE term alone
    if labels.numel() != n or n_teacher != n:
        raise ValueError(f"{n} student rows, {labels.numel()} labels and {n_teacher} teacher rows differ")


def chunked_kd_loss(
    student_logits: Tensor,
    labels: Tensor,
    teacher: Teachers,
    divergence: Divergence,
    kd_ratio: float,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    loss_and_grad: Optional[LossAndGrad] = None,
    part_weights: Optional[Sequence[float]] = None,
) -> KDLoss:
    """``plain_kd_loss`` on student logits [N, V], computed ``chunk_size`` rows at a time."""
    _check(chunk_size, student_logits.size(0), labels, teacher)
    need_grad = torch.is_grad_enabled() and student_logits.requires_grad
    spec = _Spec(labels, teacher, divergence, kd_ratio, chunk_size, need_grad, loss_and_grad, part_weights)
    if not need_grad:
        return _result(_ChunkedKD.forward(_Ctx(), student_logits, spec), spec)
    return _result(_ChunkedKD.apply(student_logits, spec), spec)


def fused_kd_loss(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    teacher: Teachers,
    divergence: Divergence,
    kd_ratio: float,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    loss_and_grad: Optional[LossAndGrad] = None,
    part_weights: Optional[Sequence[float]] = None,
    fixed_columns: Optional[FixedColumns] = None,
) -> KDLoss:
    """``plain_kd_loss`` on student logits ``hidden @ weight.T`` (then ``fixed_columns`` set) that
    never exist beyond a chunk.

    Under autocast the projection runs in the autocast dtype (as the model's output layer would);
    the gradients flow back through that cast to ``hidden`` and ``weight``.
    """
    _check(chunk_size, hidden.size(0), labels, teacher)
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    elif weight.dtype != hidden.dtype:
        weight = weight.to(hidden.dtype)
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    spec = _Spec(labels, teacher, divergence, kd_ratio, chunk_size, need_grad, loss_and_grad, part_weights,
                 fixed_columns)
    with torch.autocast(device_type, enabled=False):
        if not need_grad:
            return _result(_FusedKD.forward(_Ctx(), hidden, weight, spec), spec)
        return _result(_FusedKD.apply(hidden, weight, spec), spec)


def cross_entropy_loss_and_grad(s: Tensor, _teacher, labels: Tensor, r: float, need_grad: bool):
    """The CE term alone as a ``LossAndGrad``: with teacher None and kd_ratio 0, ``chunked_kd_loss`` and
    ``fused_kd_loss`` give sum_i CE(s_i, y_i) (the language-modelling batches of ``--lm-data``)."""
    ce_rows, grad = _ce_rows_and_grad(torch.log_softmax(s, -1), labels, need_grad)
    return ce_rows.sum(), ce_rows.new_zeros(()), grad


def _result(outputs, spec: _Spec) -> KDLoss:
    loss, ce, kd, parts = outputs
    return KDLoss(loss, ce, kd, parts if spec.part_weights is not None else None)


class _Ctx:
    """Stand-in for autograd's ctx when no gradient is needed (validation, no_grad)."""

    def save_for_backward(self, *tensors):
        pass

    def mark_non_differentiable(self, *tensors):
        pass
