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

The teacher side is either its logits [N, V] or ``ProjectedLogits(hidden, weight)``, whose rows are
produced per chunk in the teacher's dtype; a list of either gives the divergence one teacher-logit
chunk per teacher (multi-teacher losses). Divergences are row-wise, so every chunk size gives the
same result as the plain form; +-inf logits keep the plain form's semantics (``divergences.py``).
The gradient is computed during the forward pass: call ``backward`` at most once on the result.
"""
from dataclasses import dataclass
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ProjectedLogits",
    "KDLoss",
    "plain_kd_loss",
    "chunked_kd_loss",
    "fused_kd_loss",
    "forward_kl_value_and_grad",
    "DEFAULT_CHUNK_SIZE",
]

DEFAULT_CHUNK_SIZE = 1024

Divergence = Callable[..., Tensor]  # (student [n, V], teacher [n, V] or list of them) -> [n]
ValueAndGrad = Callable[..., Tuple[Tensor, Tensor]]  # same inputs -> ([n], d sum / d student [n, V])


class ProjectedLogits(NamedTuple):
    """Logits ``hidden @ weight.T`` ([N, d] x [V, d]) made chunk by chunk, without gradient."""

    hidden: Tensor
    weight: Tensor

    def rows(self, start: int, end: int) -> Tensor:
        return self.hidden[start:end] @ self.weight.t()

    def size(self, dim: int) -> int:
        return self.hidden.size(0) if dim == 0 else self.weight.size(0)


TeacherSource = Union[Tensor, ProjectedLogits]
Teachers = Union[TeacherSource, Sequence[TeacherSource]]


class KDLoss(NamedTuple):
    loss: Tensor  # (1 - r) ce + r kd, differentiable
    ce: Tensor  # sum of the cross-entropies, no gradient
    kd: Tensor  # sum of the divergences, no gradient


def _teacher_rows(teachers: Teachers, start: int, end: int):
    if isinstance(teachers, (list, tuple)) and not isinstance(teachers, ProjectedLogits):
        return [_teacher_rows(t, start, end) for t in teachers]
    if isinstance(teachers, ProjectedLogits):
        with torch.no_grad():
            return teachers.rows(start, end)
    return teachers[start:end].detach()


def _count_rows(teachers: Teachers) -> int:
    if isinstance(teachers, (list, tuple)) and not isinstance(teachers, ProjectedLogits):
        return _count_rows(teachers[0])
    return teachers.size(0)


def plain_kd_loss(
    student_logits: Tensor, labels: Tensor, teacher_logits, divergence: Divergence, kd_ratio: float
) -> KDLoss:
    """The criterion's plain form, on materialised logits (reference for tests and benchmarks)."""
    ce = F.cross_entropy(student_logits.float(), labels, reduction="sum")
    kd = divergence(student_logits, teacher_logits).sum()
    return KDLoss((1.0 - kd_ratio) * ce + kd_ratio * kd, ce.detach(), kd.detach())


def forward_kl_value_and_grad(student: Tensor, teacher: Tensor, temperature: float = 1.0):
    """Forward KL(p || q) per row and its gradient w.r.t. the float32 student logits, analytically.

    With U the entries that are finite in both models and P_U = sum_U p:
    d/ds_j sum_U p (log p - log q) = (q_j P_U - p_j [j in U]) / T. Equals ``divergences.forward_kl``
    and its autograd gradient (+-inf entries contribute and receive nothing).
    """
    s = student.float()
    t = teacher.float()
    if temperature != 1.0:
        s, t = s / temperature, t / temperature
    s_inf, t_inf = torch.isinf(s), torch.isinf(t)
    masked = s_inf | t_inf
    any_masked = bool(masked.any())
    if any_masked:
        s = s.masked_fill(s == float("inf"), float("-inf"))
        t = t.masked_fill(t == float("inf"), float("-inf"))
    log_q = torch.log_softmax(s, dim=-1)
    log_p = torch.log_softmax(t, dim=-1)
    p = log_p.exp()
    if any_masked:
        p_u = p.masked_fill(masked, 0.0)
        value = (p_u * (log_p.masked_fill(masked, 0.0) - log_q.masked_fill(masked, 0.0))).sum(-1)
        mass = p_u.sum(-1, keepdim=True)
        grad = log_q.exp_().mul_(mass).sub_(p_u)
    else:
        value = (p * (log_p - log_q)).sum(-1)
        grad = log_q.exp_().sub_(p)  # P_U = 1
    if temperature != 1.0:
        grad.div_(temperature)
    return value, grad


@dataclass
class _Spec:
    labels: Tensor
    teachers: Teachers
    divergence: Divergence
    kd_ratio: float
    chunk_size: int
    need_grad: bool
    value_and_grad: Optional[ValueAndGrad]


def _chunk_loss(s: Tensor, spec: _Spec, start: int, end: int):
    """CE sum, KD sum and (if needed) d[(1 - r) CE + r KD] / ds, float32, for rows [start, end)."""
    labels = spec.labels[start:end]
    teacher = _teacher_rows(spec.teachers, start, end)
    r = spec.kd_ratio
    if spec.value_and_grad is not None:
        kd_rows, g_kd = spec.value_and_grad(s, teacher)
        ce = F.cross_entropy(s, labels, reduction="sum")
        grad = None
        if spec.need_grad:
            grad = g_kd.mul_(r) if r != 1.0 else g_kd
            if r != 1.0:
                g_ce = torch.softmax(s, dim=-1)
                g_ce[torch.arange(labels.numel(), device=s.device), labels] -= 1.0
                grad.add_(g_ce, alpha=1.0 - r)
        return ce.detach(), kd_rows.sum().detach(), grad
    with torch.enable_grad():
        s = s.detach().requires_grad_(spec.need_grad)
        ce = F.cross_entropy(s, labels, reduction="sum")
        kd = spec.divergence(s, teacher).sum()
        grad = None
        if spec.need_grad:
            (grad,) = torch.autograd.grad((1.0 - r) * ce + r * kd, s)
    return ce.detach(), kd.detach(), grad


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
        grad = None
        if spec.need_grad:  # fp16 gradients are kept in fp32: unscaled, small ones would underflow
            grad_dtype = torch.float32 if student.dtype == torch.float16 else student.dtype
            grad = torch.empty(student.shape, dtype=grad_dtype, device=student.device)
        for start, end in _chunks(n, spec.chunk_size):
            c, k, g = _chunk_loss(student[start:end].float(), spec, start, end)
            ce += c
            kd += k
            if g is not None:
                grad[start:end] = g
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(ce, kd)
        return (1.0 - spec.kd_ratio) * ce + spec.kd_ratio * kd, ce, kd

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_kd):
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
            c, k, g = _chunk_loss(logits.float(), spec, start, end)
            del logits
            ce += c
            kd += k
            if g is not None:
                g = g.to(mm_dtype)
                grad_hidden[start:end] = g @ w_mm
                grad_weight += g.t() @ h.to(mm_dtype)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.mark_non_differentiable(ce, kd)
        return (1.0 - spec.kd_ratio) * ce + spec.kd_ratio * kd, ce, kd

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_kd):
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = grad_loss.float()
        return (grad_hidden.mul_(scale).to(ctx.hidden_dtype),
                grad_weight.mul_(scale).to(ctx.weight_dtype), None)


def _check(chunk_size: int, n: int, labels: Tensor, teachers: Teachers):
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if labels.numel() != n or _count_rows(teachers) != n:
        raise ValueError(f"{n} student rows, {labels.numel()} labels and {_count_rows(teachers)} teacher rows differ")


def chunked_kd_loss(
    student_logits: Tensor,
    labels: Tensor,
    teacher: Teachers,
    divergence: Divergence,
    kd_ratio: float,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    value_and_grad: Optional[ValueAndGrad] = None,
) -> KDLoss:
    """``plain_kd_loss`` on student logits [N, V], computed ``chunk_size`` rows at a time."""
    _check(chunk_size, student_logits.size(0), labels, teacher)
    need_grad = torch.is_grad_enabled() and student_logits.requires_grad
    spec = _Spec(labels, teacher, divergence, kd_ratio, chunk_size, need_grad, value_and_grad)
    if not need_grad:
        return KDLoss(*_ChunkedKD.forward(_Ctx(), student_logits, spec))
    return KDLoss(*_ChunkedKD.apply(student_logits, spec))


def fused_kd_loss(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    teacher: Teachers,
    divergence: Divergence,
    kd_ratio: float,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    value_and_grad: Optional[ValueAndGrad] = None,
) -> KDLoss:
    """``plain_kd_loss`` on student logits ``hidden @ weight.T`` that never exist beyond a chunk.

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
    spec = _Spec(labels, teacher, divergence, kd_ratio, chunk_size, need_grad, value_and_grad)
    with torch.autocast(device_type, enabled=False):
        if not need_grad:
            return KDLoss(*_FusedKD.forward(_Ctx(), hidden, weight, spec))
        return KDLoss(*_FusedKD.apply(hidden, weight, spec))


class _Ctx:
    """Stand-in for autograd's ctx when no gradient is needed (validation, no_grad)."""

    def save_for_backward(self, *tensors):
        pass

    def mark_non_differentiable(self, *tensors):
        pass
