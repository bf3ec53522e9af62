"""Entropic optimal transport between the positions of two tokenizations, for multi-cost OT KD
(MC-KD / MCW-KD; spec section 6). Pure functions on padded batches [B, M, N] with masks.

* ``sinkhorn_plan``: the transport plan P with uniform marginals 1/M (rows) and 1/N (columns) of
  the valid positions, for the Gibbs kernel K = exp(-alpha * C) (the reference's ETP convention:
  alpha = 1 / epsilon, default 0.1), computed in the log domain so that any alpha and cost scale is
  safe. Padding rows and columns get no mass.
* ``transport_cost``: sum(P * C) per sequence with P held fixed: its gradient in C is P, the
  envelope gradient of the entropic OT value (what POT's ``sinkhorn2`` returns), so no gradient
  runs back through the iterations.
* pairwise costs between rows of x [B, M, d] and y [B, N, d]: ``euclidean_cost``, ``kl_cost`` (from
  log-probabilities: KL(x_i || y_j) = sum p_i (log p_i - log q_j), one batched matmul, no [M, N, d]
  tensor), ``cosine_cost``, and ``absolute_cost`` of scalars.
* ``window_means``: the mean of each position's +-w neighbours within its sequence's valid positions.
* ``simplex_weights``: MCW-KD's cost-weight QP, min_a c.a + sigma |a - 1/n|^2 s.t. sum a = 1,
  a >= floor, solved exactly (a Euclidean projection onto the shifted simplex) instead of by cvxpy.
"""
import torch
from torch import Tensor


def pair_mask(rows: Tensor, cols: Tensor) -> Tensor:
    """[B, M, N]: True where both the row position (``rows`` [B, M]) and the column one are valid."""
    return rows.unsqueeze(2) & cols.unsqueeze(1)


def sinkhorn_plan(cost: Tensor, rows: Tensor, cols: Tensor, alpha: float = 0.1, max_iter: int = 100,
                  tol: float = 1e-9) -> Tensor:
    """Entropic OT plan [B, M, N] (float32 or the cost's wider dtype) between the valid rows and
    columns of ``cost``; a sequence without valid rows or columns gets an all-zero plan."""
    cost = cost.detach()
    dtype = torch.float64 if cost.dtype == torch.float64 else torch.float32
    valid = pair_mask(rows, cols)
    log_k = (-alpha * cost.to(dtype)).masked_fill(~valid, float("-inf"))
    n_rows = rows.sum(1, keepdim=True).to(dtype)
    n_cols = cols.sum(1, keepdim=True).to(dtype)
    log_a = torch.where(rows, -n_rows.clamp_min(1).log(), float("-inf"))  # [B, M]
    log_b = torch.where(cols, -n_cols.clamp_min(1).log(), float("-inf"))  # [B, N]
    f = torch.zeros_like(log_a)
    g = torch.zeros_like(log_b)
    for it in range(max_iter):
        f = torch.where(rows, log_a - torch.logsumexp(log_k + g.unsqueeze(1), dim=2), float("-inf"))
        g = torch.where(cols, log_b - torch.logsumexp(log_k + f.unsqueeze(2), dim=1), float("-inf"))
        if tol > 0 and (it % 10 == 9 or it == max_iter - 1):
            # columns are exact after the g step; stop once the rows are too
            row_mass = torch.logsumexp(log_k + g.unsqueeze(1), dim=2) + f
            err = (row_mass.exp() - log_a.exp()).masked_fill(~rows, 0).abs().sum(1).max()
            if float(err) < tol:
                break
    plan = (f.unsqueeze(2) + log_k + g.unsqueeze(1)).exp()
    return plan.masked_fill(~valid, 0.0).nan_to_num(0.0)


def transport_cost(cost: Tensor, rows: Tensor, cols: Tensor, **sinkhorn) -> Tensor:
    """[B]: sum over i, j of P_ij C_ij with P = ``sinkhorn_plan`` (held fixed)."""
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
    y = 1.0 / n - c / (2.0 * sigma) - floor
    u, _ = torch.sort(y, descending=True)
    css = u.cumsum(0) - mass
    k = torch.arange(1, n + 1, dtype=c.dtype)
    rho = int((u - css / k > 0).nonzero().max()) + 1
    theta = css[rho - 1] / rho
    return ((y - theta).clamp_min(0) + floor).to(costs.dtype)
