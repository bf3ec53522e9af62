"""``optimal_transport`` against independent float64 references: the Sinkhorn plan (plain-domain
iterations; the exact assignment as alpha grows), padding and empty sequences, the envelope gradient,
the pairwise costs with -inf log-probabilities, context windows and MCW-KD's weight QP (a grid search)."""
import itertools

import numpy as np
import pytest
import torch

from distill_plugins import optimal_transport as OT


def reference_plan(cost: np.ndarray, alpha: float, iters: int = 5000) -> np.ndarray:
    """Sinkhorn as the reference's ETP writes it: K = exp(-alpha C), v = b / K^T u, u = a / K v."""
    m, n = cost.shape
    a, b = np.full(m, 1 / m), np.full(n, 1 / n)
    k = np.exp(-alpha * cost)
    u = np.full(m, 1 / m)
    for _ in range(iters):
        v = b / (k.T @ u)
        u = a / (k @ v)
    return u[:, None] * k * v[None, :]


def batch(costs, m_max, n_max):
    """Pad per-example cost matrices into [B, M, N] with their masks (padding filled with 1e3)."""
    out = torch.full((len(costs), m_max, n_max), 1e3, dtype=torch.float64)
    rows = torch.zeros(len(costs), m_max, dtype=torch.bool)
    cols = torch.zeros(len(costs), n_max, dtype=torch.bool)
    for i, c in enumerate(costs):
        out[i, : c.shape[0], : c.shape[1]] = torch.as_tensor(c)
        rows[i, : c.shape[0]] = True
        cols[i, : c.shape[1]] = True
    return out, rows, cols


@pytest.fixture(params=["plain", "log"])
def domain(request, monkeypatch):
    """Both iterations: the plain-domain kernel (where it cannot underflow) and the log domain."""
    if request.param == "log":
        monkeypatch.setattr(OT, "PLAIN_DOMAIN_RANGE", -1.0)
    return request.param


@pytest.mark.parametrize("alpha", [0.1, 1.0, 5.0])
def test_sinkhorn_plan_matches_the_plain_iterations_with_padding(alpha, domain):
    g = np.random.default_rng(0)
    shapes = [(3, 5), (6, 2), (1, 1), (6, 5)]
    costs = [g.uniform(0, 2, s) for s in shapes]
    cost, rows, cols = batch(costs, 6, 5)
    plan = OT.sinkhorn_plan(cost, rows, cols, alpha=alpha, max_iter=2000, tol=1e-12)
    for i, c in enumerate(costs):
        m, n = c.shape
        np.testing.assert_allclose(plan[i, :m, :n].numpy(), reference_plan(c, alpha), rtol=1e-6, atol=1e-10)
        assert plan[i, m:].abs().sum() == 0 and plan[i, :, n:].abs().sum() == 0  # padding: no mass
        np.testing.assert_allclose(plan[i].sum(1)[:m].numpy(), 1 / m, rtol=1e-6)
        np.testing.assert_allclose(plan[i].sum(0)[:n].numpy(), 1 / n, rtol=1e-6)


def test_sinkhorn_plan_tends_to_the_optimal_assignment_and_stays_finite():
    """Square and uniform: the OT plan is a permutation / n (brute force); at alpha 200 and costs up
    to 10 the plain kernel exp(-2000) underflows to 0, the log-domain plan does not."""
    g = np.random.default_rng(1)
    c = g.uniform(0, 10, (5, 5))
    c[range(5), [2, 0, 4, 1, 3]] = g.uniform(0, 1, 5)  # a clear optimum (the brute force finds it)
    best = min(itertools.permutations(range(5)), key=lambda p: sum(c[i, p[i]] for i in range(5)))
    want = np.zeros((5, 5))
    want[range(5), best] = 1 / 5
    assert np.exp(-200 * c).min() == 0.0
    cost, rows, cols = batch([c], 5, 5)
    plan = OT.sinkhorn_plan(cost, rows, cols, alpha=200.0, max_iter=3000)
    assert torch.isfinite(plan).all()
    np.testing.assert_allclose(plan[0].numpy(), want, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_padding_stays_empty_when_the_shifted_kernel_would_overflow_there(dtype):
    """Costs in [9, 12] at alpha 10: the plain domain applies (spread 3 * 10 <= 50), and a padded
    entry's exp(-alpha (0 - low)) = exp(90) overflows float32; the plan must still be that of the
    costs minus 9 (a shift leaves the OT plan unchanged), with no NaN turning an example's plan to 0."""
    g = torch.Generator().manual_seed(0)
    cost = (9 + 3 * torch.rand(2, 4, 5, generator=g)).to(dtype)
    rows = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    cols = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    plan = OT.sinkhorn_plan(cost, rows, cols, alpha=10.0, max_iter=500)
    shifted = OT.sinkhorn_plan(cost - 9, rows, cols, alpha=10.0, max_iter=500)
    assert torch.isfinite(plan).all()
    torch.testing.assert_close(plan.sum((1, 2)), torch.ones(2, dtype=plan.dtype))
    torch.testing.assert_close(plan, shifted, rtol=1e-5, atol=1e-7)


def test_empty_sequences_transport_nothing(domain):
    cost = torch.rand(3, 4, 5)
    rows = torch.tensor([[True, True, False, False], [False] * 4, [True] * 4])
    cols = torch.tensor([[False] * 5, [True] * 5, [True] * 5])
    plan = OT.sinkhorn_plan(cost, rows, cols)
    assert torch.isfinite(plan).all() and plan[0].sum() == 0 and plan[1].sum() == 0
    assert plan[2].sum().item() == pytest.approx(1.0, rel=1e-5)
    total = OT.transport_cost(cost.requires_grad_(), rows, cols)
    total.sum().backward()
    assert total[0] == 0 and total[1] == 0 and torch.isfinite(cost.grad).all()


def reference_transport(cost: torch.Tensor, alpha: float, iters: int) -> torch.Tensor:
    """sum(P * C) of one unpadded cost matrix, P by the reference's ETP iterations in torch, so that
    autograd runs through them as it does in the reference."""
    m, n = cost.shape
    k = torch.exp(-alpha * cost)
    u = torch.full((m,), 1 / m, dtype=cost.dtype)
    for _ in range(iters):
        v = (1 / n) / (k.T @ u)
        u = (1 / m) / (k @ v)
    return (u[:, None] * k * v[None, :] * cost).sum()


def test_transport_cost_gradient_runs_through_the_iterations(domain):
    """The gradient of the returned sum(P * C), P depending on C (not P alone: that is the gradient of
    the entropic value, 4 % off here), against the unrolled reference and finite differences."""
    g = torch.Generator().manual_seed(0)
    costs = [3 * torch.rand(3, 4, generator=g, dtype=torch.float64), 3 * torch.rand(3, 2, generator=g, dtype=torch.float64)]
    cost, rows, cols = batch(costs, 3, 4)
    cost.requires_grad_()
    value = OT.transport_cost(cost, rows, cols, alpha=0.5, max_iter=300, tol=0)
    value.sum().backward()
    for i, c in enumerate(costs):
        c = c.clone().requires_grad_()
        want = reference_transport(c, 0.5, 300)
        want.backward()
        m, n = c.shape
        torch.testing.assert_close(value[i], want.detach())
        torch.testing.assert_close(cost.grad[i, :m, :n], c.grad)
        assert cost.grad[i, m:].abs().sum() == 0 and cost.grad[i, :, n:].abs().sum() == 0
    plan = OT.sinkhorn_plan(cost.detach(), rows, cols, alpha=0.5, max_iter=300, tol=0)
    assert (cost.grad - plan).abs().max() > 1e-3  # not the envelope gradient
    small = costs[0].clone().requires_grad_()
    m1 = torch.ones(1, 3, dtype=torch.bool), torch.ones(1, 4, dtype=torch.bool)
    assert torch.autograd.gradcheck(lambda c: OT.transport_cost(c.unsqueeze(0), *m1, alpha=0.5, max_iter=300, tol=0),
                                    (small,))


def test_pairwise_costs_match_loops_with_infinite_log_probabilities():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 3, 6, generator=g, dtype=torch.float64), torch.randn(2, 4, 6, generator=g, dtype=torch.float64)
    logits_p, logits_q = x.clone(), y.clone()
    logits_p[0, 1, 2] = float("-inf")  # p(v) = 0
    logits_q[1, 0, 4] = float("-inf")  # q(v) = 0 where p(v) > 0: the product is dropped
    log_p, log_q = logits_p.log_softmax(-1), logits_q.log_softmax(-1)
    kl, euc, cos = OT.kl_cost(log_p, log_q), OT.euclidean_cost(x, y), OT.cosine_cost(x, y)
    for b, i, j in itertools.product(range(2), range(3), range(4)):
        p, lp, lq = log_p[b, i].exp(), log_p[b, i], log_q[b, j]
        terms = [p[v] * (lp[v] - lq[v]) if torch.isfinite(lp[v]) and torch.isfinite(lq[v])
                 else (p[v] * lp[v] if torch.isfinite(lp[v]) else 0.0) for v in range(6)]
        assert kl[b, i, j].item() == pytest.approx(float(sum(terms)), abs=1e-12)
        assert euc[b, i, j].item() == pytest.approx(float((x[b, i] - y[b, j]).norm()), rel=1e-9)
        cosine = float(x[b, i] @ y[b, j] / (x[b, i].norm() * y[b, j].norm()))
        assert cos[b, i, j].item() == pytest.approx(1 - cosine, abs=1e-6)
    log_p.requires_grad_()
    OT.kl_cost(log_p, log_q).sum().backward()
    assert torch.isfinite(log_p.grad).all()
    assert torch.allclose(OT.absolute_cost(torch.tensor([[1.0, 3.0]]), torch.tensor([[2.0]])),
                          torch.tensor([[[1.0], [1.0]]]))


def test_euclidean_cost_gradient_is_finite_at_zero_distance():
    x = torch.randn(1, 3, 4, dtype=torch.float64, requires_grad=True)
    OT.euclidean_cost(x, x.detach().clone()).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_window_means_over_valid_positions():
    x = torch.arange(2 * 6 * 2, dtype=torch.float64).view(2, 6, 2)
    valid = torch.tensor([[True, True, False, True, True, False], [True] * 6])
    got = OT.window_means(x, valid, window=1)
    for b in range(2):
        idx = [t for t in range(6) if valid[b, t]]
        for r, t in enumerate(idx):
            near = idx[max(r - 1, 0): r + 2]
            torch.testing.assert_close(got[b, t], x[b, near].mean(0))
        for t in range(6):
            if not valid[b, t]:
                assert got[b, t].abs().sum() == 0


@pytest.mark.parametrize("costs,sigma", [([0.3, 1.2, 0.1], 0.7), ([5.0, 0.0, 0.1], 0.7), ([1.0, 1.0, 1.0], 0.5),
                                         ([0.2, 0.25, 0.9], 10.0)])
def test_simplex_weights_solve_the_qp(costs, sigma):
    """Against a grid search over {a >= 0.01, sum a = 1} (step 1e-3)."""
    c = np.array(costs)
    grid = np.arange(0.01, 0.98 + 1e-9, 1e-3)
    a1, a2 = np.meshgrid(grid, grid, indexing="ij")
    a3 = 1 - a1 - a2
    ok = a3 >= 0.01 - 1e-12
    objective = c[0] * a1 + c[1] * a2 + c[2] * a3 + sigma * ((a1 - 1 / 3) ** 2 + (a2 - 1 / 3) ** 2 + (a3 - 1 / 3) ** 2)
    objective[~ok] = np.inf
    i, j = np.unravel_index(np.argmin(objective), objective.shape)
    want = np.array([a1[i, j], a2[i, j], a3[i, j]])
    got = OT.simplex_weights(torch.tensor(costs), sigma).numpy()
    assert got.sum() == pytest.approx(1.0) and (got >= 0.01 - 1e-12).all()
    np.testing.assert_allclose(got, want, atol=2e-3)
    if len(set(costs)) == 1:
        np.testing.assert_allclose(got, 1 / 3)


def test_logit_transport_with_infinite_logits_matches_a_float64_reference():
    """Top-k logits with +-inf entries (+inf counts as -inf: probability 0), padding, interpolation:
    OT_logit against loops in float64 with the plain-domain plan; finite gradients."""
    g = torch.Generator().manual_seed(3)
    student = torch.randn(5, 6, generator=g, dtype=torch.float64) * 2
    teacher = torch.randn(7, 9, generator=g, dtype=torch.float64) * 2
    student[0, 1], student[2, 4], teacher[1, 0], teacher[3, 3], teacher[3, 5] = (
        float("-inf"), float("inf"), float("inf"), float("-inf"), float("-inf"))
    student.requires_grad_(True)
    s_mask = torch.tensor([[True, True, True, False], [True, True, False, False]])  # 3 + 2 student labels
    t_mask = torch.tensor([[True, True, True, True, False], [True, True, True, False, False]])  # 4 + 3
    from distill_plugins.criterions.cross_tokenizer_kd import padded_rows

    k, t, tau = 6, 0.4, 2.0
    s_top, s_valid = padded_rows(OT.top_logits(student, k).double(), s_mask)
    t_top, t_valid = padded_rows(OT.top_logits(teacher, k).double(), t_mask)
    partner = torch.tensor([[0, 1, 1, 2], [0, -1, 1, -1]])  # [B, longest teacher]; -1: no partner
    sal_s, sal_t = torch.rand(2, 3, generator=g, dtype=torch.float64), torch.rand(2, 4, generator=g, dtype=torch.float64)
    weights = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    got, _ = OT.logit_transport(s_top, t_top, s_valid, t_valid, partner, sal_s, sal_t, weights, t, tau,
                                alpha=0.1, max_iter=2000, tol=1e-13)
    got.sum().backward()
    assert torch.isfinite(student.grad).all()

    def probs(row):
        row = [(-np.inf if x == np.inf else x) for x in row]
        e = [0.0 if x == -np.inf else np.exp(x / tau) for x in row]
        return np.array(e) / sum(e)

    for b, (s_rows, t_rows) in enumerate([((0, 3), (0, 4)), ((3, 5), (4, 7))]):
        top = lambda rows: [sorted([(-np.inf if x == np.inf else x) for x in r], reverse=True)[:k]  # noqa: E731
                            for r in rows]  # +inf counts as -inf, then the k largest
        s_sorted = top(student.detach().numpy()[s_rows[0]:s_rows[1]])
        t_sorted = top(teacher.numpy()[t_rows[0]:t_rows[1]])
        cost = np.zeros((len(t_sorted), len(s_sorted)))
        for j, tj in enumerate(t_sorted):
            pj = int(partner[b, j])
            z = [(1 - t) * s_sorted[pj][v] + t * tj[v] for v in range(k)] if pj >= 0 else tj
            p = probs(z)
            for i, si in enumerate(s_sorted):
                q = probs(si)
                kl = sum(p[v] * (np.log(p[v]) - np.log(q[v])) for v in range(k) if p[v] > 0 and q[v] > 0)
                kl += sum(p[v] * np.log(p[v]) for v in range(k) if p[v] > 0 and q[v] == 0)
                cost[j, i] = (0.2 * np.linalg.norm(p - q) + 0.5 * kl
                              + 0.3 * abs(float(sal_t[b, j]) - float(sal_s[b, i])))
        want = (reference_plan(cost, 0.1) * cost).sum()
        assert got[b].item() == pytest.approx(want, rel=1e-7)


def test_simplex_weights_at_the_largest_floor_are_all_the_floor():
    """n * floor = 1 (the largest floor the option check allows for three costs): nothing is left to
    distribute, every weight is the floor."""
    got = OT.simplex_weights(torch.tensor([1.0, 2.0, 3.0]), 0.7, 1 / 3)
    torch.testing.assert_close(got, torch.full((3,), 1 / 3))
