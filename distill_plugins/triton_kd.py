"""One-kernel KD loss on GPU (Triton): loss and gradient in two or three passes over each vocabulary row.

    loss = (1 - r) * sum_i CE(s_i, y_i) + r * sum_i D(p_i || q_i)

with the same conventions as ``divergences.py`` (p = softmax(t / T), q = softmax(s / T), entries
+-inf in either model excluded from the sum, ``+inf`` treated as ``-inf`` in the softmax, the CE
term at temperature 1). Per row, pass 1 computes both log-normalizers online, pass 2 the
divergence and H = sum_v h_v, pass 3 writes the gradient w.r.t. the student logits:

    dD/ds_j = (1 / T) (h_j - q_j H),   h_v = q_v dD/dq_v  (0 at excluded entries)

Forward and reverse KL need no pass 2: their divergence and H follow from sums accumulated online in
pass 1 beside the normalizer of p (forward) or q (reverse), rescaled with it (``_weighted``).
Pass 1 keeps a running maximum per lane (the default: timed on an H100) or, with ``tile_max``, one
per row, the block's maximum taken first (``_running_max``: one exponential per entry instead of
two; benchmarks/triton_sass.py counts 67 instead of 144 in the forward-KL kernel).
So the logits are read two or three times in their own dtype and the gradient written once; every
intermediate stays in registers in float32 (no [N, V] float32 tensor exists). The gradient is
produced in the forward pass and scaled by the incoming gradient in backward (Liger-Kernel's
design, Hsu et al. 2024). Supported: forward_kl, reverse_kl, skew_kl, skew_reverse_kl, js, tvd;
adaptive_kl needs a sort and uses the chunked path.
"""
from typing import Tuple

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the chunked path is used instead
    triton = None

DIVERGENCE_IDS = {"forward_kl": 0, "reverse_kl": 1, "skew_kl": 2, "skew_reverse_kl": 3, "js": 4, "tvd": 5}


def available(device: torch.device, divergence: str) -> bool:
    return triton is not None and device.type == "cuda" and divergence in DIVERGENCE_IDS


if triton is not None:

    @triton.jit
    def _running_max(m, x, TILE: tl.constexpr):
        """The running maximum after the block ``x``: one per lane, or with TILE one per row (a
        scalar, the block's maximum taken first: one exponential per entry instead of two, and no
        per-lane maxima held in registers)."""
        if TILE:
            return tl.maximum(m, tl.max(x, axis=0))
        else:
            return tl.maximum(m, x)

    @triton.jit
    def _update(m, l_vec, x, TILE: tl.constexpr):
        """Online log-sum-exp: running maximum m and sums l_vec of e^(x - m), rescaled as m grows."""
        m_new = _running_max(m, x, TILE)
        live = m_new != float("-inf")
        l_vec = tl.where(live, l_vec * tl.exp(m - m_new) + tl.exp(x - m_new), 0.0)
        return m_new, l_vec

    @triton.jit
    def _weighted(m, l_vec, u_vec, a_vec, x, y, masked, TILE: tl.constexpr):
        """``_update`` of x's normalizer, plus over kept entries U = sum e^(x - m) and
        A = sum e^(x - m) (x - y), rescaled with it: afterwards sum_kept softmax(x) = U e^(m - lse_x) and
        sum_kept softmax(x) (log softmax(x) - log softmax(y)) = A e^(m - lse_x) - U e^(m - lse_x) (lse_x - lse_y)."""
        m_new = _running_max(m, x, TILE)
        live = m_new != float("-inf")
        scale = tl.where(live, tl.exp(m - m_new), 0.0)
        w = tl.where(live, tl.exp(x - m_new), 0.0)
        l_vec = l_vec * scale + w
        w = tl.where(masked, 0.0, w)
        u_vec = u_vec * scale + w
        a_vec = a_vec * scale + w * tl.where(masked, 0.0, x - y)
        return m_new, l_vec, u_vec, a_vec

    @triton.jit
    def _normalizer(m, l_vec, TILE: tl.constexpr):
        """log sum_v e^(x_v) from the running maxima (per lane, or one per row with TILE) and sums."""
        if TILE:
            return m + tl.log(tl.sum(l_vec, axis=0))
        else:
            return _finish(m, l_vec)

    @triton.jit
    def _finish(m_vec, l_vec):
        m = tl.max(m_vec, axis=0)
        total = tl.sum(tl.where(m_vec != float("-inf"), l_vec * tl.exp(m_vec - m), 0.0), axis=0)
        return m + tl.log(total)

    @triton.jit
    def _terms(q, p, log_q, log_p, coef, DIV: tl.constexpr):
        """(f_v, h_v = q_v df_v/dq_v) of one divergence, elementwise."""
        tiny = 1.1754943508222875e-38
        if DIV == 0:  # forward KL
            f = p * (log_p - log_q)
            h = -p
        elif DIV == 1:  # reverse KL
            f = q * (log_q - log_p)
            h = q * (log_q - log_p + 1.0)
        elif DIV == 2:  # skew KL, m = a p + (1 - a) q
            m = coef * p + (1.0 - coef) * q
            log_m = tl.log(tl.maximum(m, tiny))
            f = p * (log_p - log_m)
            h = tl.where(m > tiny, -(1.0 - coef) * p * q / m, 0.0)
        elif DIV == 3:  # skew reverse KL, m = (1 - a) p + a q
            m = (1.0 - coef) * p + coef * q
            log_m = tl.log(tl.maximum(m, tiny))
            f = q * (log_q - log_m)
            h = q * (log_q - log_m + 1.0) - tl.where(m > tiny, coef * q * q / m, 0.0)
        elif DIV == 4:  # generalized JSD, m = (1 - b) p + b q
            m = (1.0 - coef) * p + coef * q
            log_m = tl.log(tl.maximum(m, tiny))
            f = coef * q * (log_q - log_m) + (1.0 - coef) * p * (log_p - log_m)
            h = coef * q * (log_q - log_m)
        else:  # total variation
            d = q - p
            f = 0.5 * tl.abs(d)
            h = 0.5 * q * tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))
        return f, h

    @triton.jit
    def _kd_kernel(S, T, Y, G, KD, CE, stride_s, stride_t, stride_g, V, inv_temp, kd_ratio, coef,
                   DIV: tl.constexpr, SAME_T: tl.constexpr, BLOCK: tl.constexpr, TILE: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        s_row, t_row, g_row = S + row * stride_s, T + row * stride_t, G + row * stride_g
        ninf = float("-inf")
        if TILE:  # one running maximum per row, else one per lane (_running_max)
            ms = tl.max(tl.full([BLOCK], ninf, tl.float32), axis=0)
            mt = tl.max(tl.full([BLOCK], ninf, tl.float32), axis=0)
            mr = tl.max(tl.full([BLOCK], ninf, tl.float32), axis=0)
        else:
            ms = tl.full([BLOCK], ninf, tl.float32)
            mt = tl.full([BLOCK], ninf, tl.float32)
            mr = tl.full([BLOCK], ninf, tl.float32)
        ls = tl.zeros([BLOCK], tl.float32)
        lt = tl.zeros([BLOCK], tl.float32)
        lr = tl.zeros([BLOCK], tl.float32)
        # forward KL: U, A of the teacher's softmax (p); reverse KL: of the student's (q); see _weighted
        ua = tl.zeros([BLOCK], tl.float32)
        aa = tl.zeros([BLOCK], tl.float32)
        for start in range(0, V, BLOCK):  # pass 1: log-normalizers (and forward/reverse KL's sums)
            offs = start + tl.arange(0, BLOCK)
            inb = offs < V
            s = tl.load(s_row + offs, mask=inb, other=ninf).to(tl.float32)
            t = tl.load(t_row + offs, mask=inb, other=ninf).to(tl.float32)
            masked = (tl.abs(s) == float("inf")) | (tl.abs(t) == float("inf"))
            s = tl.where(s == float("inf"), ninf, s)
            t = tl.where(t == float("inf"), ninf, t)
            sk = s * inv_temp
            tk = t * inv_temp
            if DIV == 0:
                ms, ls = _update(ms, ls, sk, TILE)
                mt, lt, ua, aa = _weighted(mt, lt, ua, aa, tk, sk, masked, TILE)
            elif DIV == 1:
                ms, ls, ua, aa = _weighted(ms, ls, ua, aa, sk, tk, masked, TILE)
                mt, lt = _update(mt, lt, tk, TILE)
            else:
                ms, ls = _update(ms, ls, sk, TILE)
                mt, lt = _update(mt, lt, tk, TILE)
            if not SAME_T:
                mr, lr = _update(mr, lr, s, TILE)
        lse_s = _normalizer(ms, ls, TILE)
        lse_t = _normalizer(mt, lt, TILE)
        if SAME_T:
            lse_r = lse_s
        else:
            lse_r = _normalizer(mr, lr, TILE)

        if DIV == 0:  # sum_kept p = U, KL(p || q) = A - U (lse_t - lse_s); h = -p, so H = -U
            lane = tl.where(mt != ninf, tl.exp(mt - lse_t), 0.0)
            big_u = tl.sum(ua * lane, axis=0)
            kd = tl.sum(aa * lane, axis=0) - tl.where(big_u != 0.0, big_u * (lse_t - lse_s), 0.0)  # no finite p: 0
            big_h = -big_u
        elif DIV == 1:  # sum_kept q = U, KL(q || p) = A - U (lse_s - lse_t); h = q (log q - log p + 1): H = KL + U
            lane = tl.where(ms != ninf, tl.exp(ms - lse_s), 0.0)
            big_u = tl.sum(ua * lane, axis=0)
            kd = tl.sum(aa * lane, axis=0) - tl.where(big_u != 0.0, big_u * (lse_s - lse_t), 0.0)  # no finite p: 0
            big_h = kd + big_u
        else:
            f_acc = tl.zeros([BLOCK], tl.float32)
            h_acc = tl.zeros([BLOCK], tl.float32)
            for start in range(0, V, BLOCK):  # pass 2: divergence and H = sum h
                offs = start + tl.arange(0, BLOCK)
                inb = offs < V
                s = tl.load(s_row + offs, mask=inb, other=ninf).to(tl.float32)
                t = tl.load(t_row + offs, mask=inb, other=ninf).to(tl.float32)
                masked = (tl.abs(s) == float("inf")) | (tl.abs(t) == float("inf"))
                log_q = tl.where(s == float("inf"), ninf, s) * inv_temp - lse_s
                log_p = tl.where(t == float("inf"), ninf, t) * inv_temp - lse_t
                q = tl.exp(log_q)
                p = tl.exp(log_p)
                f, h = _terms(q, p, tl.where(masked, 0.0, log_q), tl.where(masked, 0.0, log_p), coef, DIV)
                f_acc += tl.where(masked, 0.0, f)
                h_acc += tl.where(masked, 0.0, h)
            kd = tl.sum(f_acc, axis=0)
            big_h = tl.sum(h_acc, axis=0)
        y = tl.load(Y + row)
        s_y = tl.load(s_row + y).to(tl.float32)
        tl.store(KD + row, kd)
        tl.store(CE + row, lse_r - s_y)

        for start in range(0, V, BLOCK):  # last pass: gradient w.r.t. the student logits
            offs = start + tl.arange(0, BLOCK)
            inb = offs < V
            s = tl.load(s_row + offs, mask=inb, other=ninf).to(tl.float32)
            t = tl.load(t_row + offs, mask=inb, other=ninf).to(tl.float32)
            masked = (tl.abs(s) == float("inf")) | (tl.abs(t) == float("inf"))
            s_c = tl.where(s == float("inf"), ninf, s)
            log_q = s_c * inv_temp - lse_s
            log_p = tl.where(t == float("inf"), ninf, t) * inv_temp - lse_t
            q = tl.exp(log_q)
            p = tl.exp(log_p)
            _f, h = _terms(q, p, tl.where(masked, 0.0, log_q), tl.where(masked, 0.0, log_p), coef, DIV)
            h = tl.where(masked, 0.0, h)
            g_kd = inv_temp * (h - q * big_h)
            if SAME_T:
                q_r = q
            else:
                q_r = tl.exp(s_c - lse_r)
            g_ce = q_r - tl.where(offs == y, 1.0, 0.0)
            g = kd_ratio * g_kd + (1.0 - kd_ratio) * g_ce
            tl.store(g_row + offs, g.to(G.dtype.element_ty), mask=inb)


def launch_settings(divergence: str) -> Tuple[int, int]:
    """(BLOCK, num_warps) of the kernel: tuned on an H100 at 16384 x 50257 bf16 for forward KL and the
    3-pass divergences; reverse KL (2 passes since session 4) takes forward KL's, not yet timed."""
    return (2048, 4) if divergence in ("forward_kl", "reverse_kl") else (8192, 16)


def kd_rows_and_grad(student: Tensor, teacher: Tensor, labels: Tensor, divergence: str, kd_ratio: float,
                     temperature: float = 1.0, coef: float = 0.0, grad_dtype=None, block: int = None,
                     num_warps: int = None, tile_max: bool = False) -> Tuple[Tensor, Tensor, Tensor]:
    """Per-row KD and CE values [N] (float32) and the gradient of
    (1 - r) sum CE + r sum D w.r.t. ``student`` [N, V] (in ``grad_dtype``, default the logits').

    ``tile_max``: pass 1 keeps one running maximum per row instead of one per lane (half the
    exponentials there); not the default until it is timed on a GPU (benchmarks/kd_loss.py, impl
    ``triton_tile``)."""
    assert triton is not None, "triton is not installed"
    if block is None:
        block, num_warps = launch_settings(divergence)
    assert student.shape == teacher.shape and student.dim() == 2
    student = student if student.stride(-1) == 1 else student.contiguous()
    teacher = teacher if teacher.stride(-1) == 1 else teacher.contiguous()
    n, v = student.shape
    grad = torch.empty((n, v), dtype=grad_dtype or student.dtype, device=student.device)
    kd = torch.empty(n, dtype=torch.float32, device=student.device)
    ce = torch.empty(n, dtype=torch.float32, device=student.device)
    if n == 0:
        return kd, ce, grad
    _kd_kernel[(n,)](
        student, teacher, labels.contiguous(), grad, kd, ce, student.stride(0), teacher.stride(0), grad.stride(0),
        v, 1.0 / temperature, kd_ratio, coef,
        DIV=DIVERGENCE_IDS[divergence], SAME_T=(temperature == 1.0), BLOCK=block, TILE=tile_max,
        num_warps=num_warps,
    )
    return kd, ce, grad


class TritonKDLoss(torch.autograd.Function):
    """(loss, ce_sum, kd_sum) with the gradient precomputed in forward."""

    @staticmethod
    def forward(ctx, student, teacher, labels, divergence, kd_ratio, temperature, coef):
        grad_dtype = torch.float32 if student.dtype == torch.float16 else student.dtype
        kd, ce, grad = kd_rows_and_grad(student, teacher, labels, divergence, kd_ratio, temperature, coef, grad_dtype)
        ctx.save_for_backward(grad)
        ce_sum, kd_sum = ce.sum(), kd.sum()
        ctx.mark_non_differentiable(ce_sum, kd_sum)
        return (1.0 - kd_ratio) * ce_sum + kd_ratio * kd_sum, ce_sum, kd_sum

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_kd):
        (grad,) = ctx.saved_tensors
        return grad.mul_(grad_loss.to(grad.dtype)), None, None, None, None, None, None


def triton_kd_loss(student, teacher, labels, divergence, kd_ratio, temperature=1.0, coef=0.0):
    return TritonKDLoss.apply(student, teacher, labels, divergence, kd_ratio, temperature, coef)
