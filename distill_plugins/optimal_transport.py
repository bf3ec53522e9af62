"""Entropic optimal transport between the positions of two tokenizations, for multi-cost OT KD
(MC-KD / MCW-KD; spec section 6). Pure functions on padded batches [B, M, N] with masks.

* ``sinkhorn_plan``: the transport plan P with uniform marginals 1/M (rows) and 1/N (columns) of
  the valid positions, for the Gibbs kernel K = exp(-alpha * C) (the reference's ETP convention:
  alpha = 1 / epsilon, default 0.1), in the plain domain where the kernel cannot underflow and in
  the log domain elsewhere, so any alpha and cost scale is safe. Padding rows and columns get no mass.
* ``transport_cost``: sum(P * C) per sequence, differentiated through the Sinkhorn iterations as
  the reference's ETP is (autograd; POT's default ``grad="autodiff"``). Before session 19 the plan
  was held fixed, so the gradient in C was P: the envelope gradient of the entropic value
  <P, C> - eps H(P), not of the <P, C> returned (4 % apart on small random costs; gradcheck failed).
* ``top_logits``: each position's k largest logits, sorted (vocabulary-agnostic).
* pairwise costs between rows of x [B, M, d] and y [B, N, d]: ``euclidean_cost``, ``kl_cost`` (from
  log-probabilities: KL(x_i || y_j) = sum p_i (log p_i - log q_j), one batched matmul, no [M, N, d]
  tensor), ``cosine_cost``, and ``absolute_cost`` of scalars.
* ``window_means``: the mean of each position's +-w neighbours within its sequence's valid positions.
* ``logit_transport`` and ``hidden_transport``: MC-KD's two OT terms from padded inputs
  (``criterions/multi_cost_ot.py`` says what they compute).
* ``simplex_weights``: MCW-KD's cost-weight QP, min_a c.a + sigma |a - 1/n|^2 s.t. sum a = 1,
  a >= floor, solved exactly (a Euclidean projection onto the shifted simplex) instead of by cvxpy.
"""
import torch
import torch.nn.functional as F
from torch import Tensor


def top_logits(logits: Tensor, k: int) -> Tensor:
    """Each row's ``k`` largest logits, sorted, in float32; +inf counts as -inf (probability 0)."""
    logits = logits.float()
    return logits.masked_fill(logits == float("inf"), float("-inf")).topk(k, dim=-1).values


def pair_mask(rows: Tensor, cols: Tensor) -> Tensor:
    """[B, M, N]: True where both the row position (``rows`` [B, M]) and the column one are valid."""
    return rows.unsqueeze(2) & cols.unsqueeze(1)


PLAIN_DOMAIN_RANGE = 50.0  # alpha * (cost range) up to which exp(-alpha C) is safe in float32 (exp(-50) ~ 2e-22)


def sinkhorn_plan(cost: Tensor, rows: Tensor, cols: Tensor, alpha: float = 0.1, max_iter: int = 100,
                  tol: float = 1e-6) -> Tensor:
    """Entropic OT plan [B, M, N] (float32, or float64 for a float64 cost) between the valid rows and
    columns of ``cost``; a sequence without valid rows or columns gets an all-zero plan. Stops once
    every sequence's marginals are within ``tol`` (L1; checked every 10 iterations) or after
    ``max_iter`` iterations. The kernel's plain-domain iterations (two batched mat-vecs each) run
    when alpha * (cost range) <= 50, else the log-domain ones (two logsumexps each): the same plan.
    Differentiable in ``cost`` through the iterations (autograd)."""
    dtype = torch.float64 if cost.dtype == torch.float64 else torch.float32
    valid = pair_mask(rows, cols)
    cost = cost.to(dtype).masked_fill(~valid, 0.0)
    a = rows.to(dtype) / rows.sum(1, keepdim=True).clamp_min(1).to(dtype)  # [B, M], 0 at padding
    b = cols.to(dtype) / cols.sum(1, keepdim=True).clamp_min(1).to(dtype)  # [B, N]
    low = cost.detach().masked_fill(~valid, float("inf")).amin((1, 2), keepdim=True)  # a shift: the plan is
    high = cost.detach().masked_fill(~valid, float("-inf")).amax((1, 2), keepdim=True)  # invariant to it
    spread = (high - low).masked_fill(~valid.any(2).any(1).view(-1, 1, 1), 0.0)
    if float(alpha * spread.max()) <= PLAIN_DOMAIN_RANGE:
        # padded entries are set to 0 after the exp (their exp(alpha * low) may overflow; inf * 0 is NaN)
        kernel = torch.exp(-alpha * (cost - low.nan_to_num(0.0, 0.0, 0.0))).masked_fill(~valid, 0.0)
        plan = _sinkhorn_plain(kernel, a, b, max_iter, tol)
    else:
        plan = _sinkhorn_log((-alpha * cost).masked_fill(~valid, float("-inf")), a, b, rows, cols, max_iter, tol)
    return plan.masked_fill(~valid, 0.0).nan_to_num(0.0)


def _sinkhorn_plain(kernel: Tensor, a: Tensor, b: Tensor, max_iter: int, tol: float) -> Tensor:
    tiny = torch.finfo(kernel.dtype).tiny
    u = a.clone()
    for it in range(max_iter):
        v = b / (kernel.transpose(1, 2) @ u.unsqueeze(-1)).squeeze(-1).clamp_min(tiny)
        kv = (kernel @ v.unsqueeze(-1)).squeeze(-1)
        u = a / kv.clamp_min(tiny)
        if tol > 0 and (it % 10 == 9 or it == max_iter - 1):  # rows are exact now; the columns?
            col_mass = v * (kernel.transpose(1, 2) @ u.unsqueeze(-1)).squeeze(-1)
            if float((col_mass - b).abs().sum(1).max()) < tol:
                break
    return u.unsqueeze(2) * kernel * v.unsqueeze(1)


def _sinkhorn_log(log_k: Tensor, a: Tensor, b: Tensor, rows: Tensor, cols: Tensor, max_iter: int, tol: float) -> Tensor:
    live = (rows.any(1) & cols.any(1)).unsqueeze(1)  # a sequence without rows or columns moves nothing
    rows, cols = rows & live, cols & live
    log_a = torch.where(rows, a.log(), float("-inf"))
    log_b = torch.where(cols, b.log(), float("-inf"))
    f, g = torch.zeros_like(log_a), torch.zeros_like(log_b)
    # padded rows (columns) are filled with 0 inside the logsumexp: an all -inf row gives a NaN gradient
    # (0 * NaN through torch.where) although its value is discarded
    pad_rows, pad_cols = ~rows.unsqueeze(2), ~cols.unsqueeze(1)
    for it in range(max_iter):
        f = torch.where(rows, log_a - torch.logsumexp((log_k + g.unsqueeze(1)).masked_fill(pad_rows, 0.0), dim=2),
                        float("-inf"))
        g = torch.where(cols, log_b - torch.logsumexp((log_k + f.unsqueeze(2)).masked_fill(pad_cols, 0.0), dim=1),
                        float("-inf"))
        if tol > 0 and (it % 10 == 9 or it == max_iter - 1):
            row_mass = (torch.logsumexp(log_k + g.unsqueeze(1), dim=2) + f).exp()
            if float((row_mass - a).masked_fill(~rows, 0).abs().sum(1).max()) < tol:
                break
    return (f.unsqueeze(2) + log_k + g.unsqueeze(1)).exp()


def transport_cost(cost: Tensor, rows: Tensor, cols: Tensor, **sinkhorn) -> Tensor:
    """[B]: sum over i, j of P_ij C_ij with P = ``sinkhorn_plan`` (differentiated through)."""
    plan = sinkhorn_plan(cost, rows, cols, **sinkhorn)
    return (plan.to(cost.dtype) * cost.masked_fill(~pair_mask(rows, cols), 0.0)).sum((1, 2))


def euclidean_cost(x: Tensor, y: Tensor) -> Tensor:
    """[B, M, N] Euclidean distances |x_i - y_j| through |x|^2 + |y|^2 - 2 x.y (no [M, N, d]
    tensor); clamped at 1e-12 before the square root, so its gradient is finite (0) at 0."""
    sq = x.pow(2).sum(-1).unsqueeze(2) + y.pow(2).sum(-1).unsqueeze(1) - 2 * x @ y.transpose(1, 2)
    return sq.clamp_min(1e-12).sqrt()


def kl_cost(log_p: Tensor, log_q: Tensor) -> Tensor:
    """[B, M, N] KL(p_i || q_j) = sum_v p_i(v) (log p_i(v) - log q_j(v)) from log-probabilities
    [B, M, V] and [B, N, V]. A -inf log-probability contributes nothing to the products it is in
    (the divergences' convention, spec 7.4), so no 0 * inf = NaN in either direction."""
    p = log_p.exp()
    lp = log_p.masked_fill(torch.isinf(log_p), 0.0)
    lq = log_q.masked_fill(torch.isinf(log_q), 0.0)
    return (p * lp).sum(-1).unsqueeze(2) - p @ lq.transpose(1, 2)


def cosine_cost(x: Tensor, y: Tensor, eps: float = 1e-7) -> Tensor:
    """[B, M, N] 1 - cos(x_i, y_j)."""
    xn = x / (x.norm(dim=-1, keepdim=True) + eps)
    yn = y / (y.norm(dim=-1, keepdim=True) + eps)
    return 1.0 - xn @ yn.transpose(1, 2)


def absolute_cost(x: Tensor, y: Tensor) -> Tensor:
    """[B, M, N] |x_i - y_j| of scalars x [B, M] and y [B, N]."""
    return (x.unsqueeze(2) - y.unsqueeze(1)).abs()


def window_means(x: Tensor, valid: Tensor, window: int) -> Tensor:
    """[B, T, d]: for each valid position t, the mean of x over the valid positions t' with
    |rank(t') - rank(t)| <= ``window``, where rank counts valid positions (valid positions are taken
    in order, so padding between them does not shorten a window). Invalid positions give 0."""
    rank = valid.long().cumsum(1) - 1  # [B, T]
    near = (rank.unsqueeze(2) - rank.unsqueeze(1)).abs().le(window) & pair_mask(valid, valid)  # [B, T, T]
    weights = near.to(x.dtype)
    return (weights @ x) / weights.sum(-1, keepdim=True).clamp_min(1)


def simplex_weights(costs: Tensor, sigma: float, floor: float = 0.01) -> Tensor:
    """argmin_a c.a + sigma |a - 1/n|^2 s.t. sum(a) = 1, a >= floor (MCW-KD's cost-weight update).

    The objective is sigma |a - y|^2 + const with y = 1/n - c / (2 sigma): the Euclidean projection of
    y onto {a >= floor, sum a = 1}, i.e. floor + the projection of y - floor onto the simplex of mass
    1 - n * floor (sort-based, exact)."""
    c = costs.detach().double().flatten()
    n = c.numel()
    if n * floor > 1:
        raise ValueError(f"floor {floor} leaves no weights for {n} costs")
    mass = 1.0 - n * floor
    if mass <= 1e-12:  # the floor takes all the mass
        return torch.full_like(c, floor).to(costs.dtype)
    y = 1.0 / n - c / (2.0 * sigma) - floor
    u, _ = torch.sort(y, descending=True)
    css = u.cumsum(0) - mass
    k = torch.arange(1, n + 1, dtype=c.dtype, device=c.device)
    rho = int((u - css / k > 0).nonzero().max()) + 1
    theta = css[rho - 1] / rho
    return ((y - theta).clamp_min(0) + floor).to(costs.dtype)


def logit_transport(s_top: Tensor, t_top: Tensor, s_valid: Tensor, t_valid: Tensor, partner: Tensor, sal_s: Tensor,
                    sal_t: Tensor, weights: Tensor, t: float, temperature: float, **sinkhorn):
    """MC-KD's OT_logit per example [B] and its cost matrices [B, M, N] (Euclidean, KL, salience).

    ``s_top`` [B, N, k] / ``t_top`` [B, M, k]: each label position's sorted top-k logits (valid where
    ``s_valid`` / ``t_valid``); ``partner`` [B, M]: the student position each teacher position is
    interpolated with, (1 - t) sg(s) + t t (-1: none, the teacher's own); ``sal_*``: salience [B, *]."""
    if t < 1.0:
        k = s_top.size(-1)
        partner_top = s_top.detach().gather(1, partner.clamp_min(0).unsqueeze(-1).expand(-1, -1, k))
        t_top = torch.where(partner.ge(0).unsqueeze(-1), (1.0 - t) * partner_top + t * t_top, t_top)
    logp_s = F.log_softmax(s_top / temperature, dim=-1).masked_fill(~s_valid.unsqueeze(-1), 0.0)
    logp_t = F.log_softmax(t_top / temperature, dim=-1).masked_fill(~t_valid.unsqueeze(-1), 0.0)
    costs = [euclidean_cost(logp_t.exp(), logp_s.exp()), kl_cost(logp_t, logp_s), absolute_cost(sal_t, sal_s)]
    total = sum(w * c for w, c in zip(weights, costs))
    return transport_cost(total, t_valid, s_valid, **sinkhorn), costs


def hidden_transport(h_s: Tensor, h_t: Tensor, s_valid: Tensor, t_valid: Tensor, edit: Tensor, weights: Tensor,
                     window: int, **sinkhorn):
    """MC-KD's OT_hidden per example [B] and its cost matrices [B, M, N] (edit, context distance /
    its per-example max (held fixed), context cosine), from hidden states ``h_s`` [B, N, d] and
    ``h_t`` [B, M, d] (the teacher's projected) and the edit costs ``edit`` [B, M, N]."""
    ctx_s, ctx_t = window_means(h_s, s_valid, window), window_means(h_t, t_valid, window)
    valid = pair_mask(t_valid, s_valid)
    distance = euclidean_cost(ctx_t, ctx_s)
    scale = distance.detach().masked_fill(~valid, 0).amax((1, 2), keepdim=True).clamp_min(1e-7)
    costs = [edit, distance / scale, cosine_cost(ctx_t, ctx_s)]
    total = sum(w * c for w, c in zip(weights, costs))
    return transport_cost(total, t_valid, s_valid, **sinkhorn), costs
