"""PPO clipping, the single-step reverse-KL term and the LM/KD term: values and gradients on crafted
inputs against analytic formulas and float64 finite differences."""
import pytest
import torch
import torch.nn.functional as F

from distill_plugins import policy_gradient as pg
from distill_plugins.errors import DistillError

EPS = 0.2


def crafted_ppo():
    """Five response tokens, one in each regime of the clipped objective, plus one padding position.

    rho = exp(logp - old) * w:  token 0: A > 0, rho 1.5 (clipped, no gradient); 1: A > 0, rho 0.5
    (unclipped side is the max); 2: A < 0, rho 1.5 (unclipped); 3: A < 0, rho 0.5 (clipped);
    4: A > 0, rho 1.05 (inside the trust region); 5: padding."""
    rho = torch.tensor([1.5, 0.5, 1.5, 0.5, 1.05, 3.0], dtype=torch.float64)
    w = torch.tensor([1.2, 0.9, 1.0, 0.8, 1.1, 1.0], dtype=torch.float64)
    old = torch.tensor([-1.0, -2.0, -0.5, -3.0, -1.5, -2.0], dtype=torch.float64)
    logp = old + torch.log(rho / w)
    adv = torch.tensor([2.0, 1.0, -1.5, -0.5, 0.7, 5.0], dtype=torch.float64)
    mask = torch.tensor([1, 1, 1, 1, 1, 0], dtype=torch.bool)
    return logp.view(1, -1), old.view(1, -1), adv.view(1, -1), w.view(1, -1), mask.view(1, -1), rho


def test_ppo_loss_value_clip_fraction_and_gradient():
    logp, old, adv, w, mask, rho = crafted_ppo()
    logp = logp.clone().requires_grad_(True)
    out = pg.ppo_policy_loss(logp, old, adv, w, mask, EPS)
    a = adv[0]
    clipped_rho = rho.clamp(1 - EPS, 1 + EPS)
    per_token = torch.max(-a * rho, -a * clipped_rho)[:5]
    assert float(out.loss.detach()) == pytest.approx(float(per_token.sum() / 5), rel=1e-12)
    assert float(out.clip_fraction) == pytest.approx(2 / 5)  # tokens 0 and 3
    out.loss.backward()
    # d/dlogp of -A rho is -A rho where the unclipped term is active, 0 where the clip is
    unclipped_active = torch.tensor([False, True, True, False, True, False])
    expected = torch.where(unclipped_active, -a * rho / 5, torch.zeros_like(rho))
    assert torch.allclose(logp.grad[0], expected, atol=1e-12)


def test_ppo_gradient_matches_finite_differences():
    logp, old, adv, w, mask, _ = crafted_ppo()
    # gradcheck perturbs by 1e-6: every token is away from the kinks at 1 +- eps
    assert torch.autograd.gradcheck(lambda x: pg.ppo_policy_loss(x, old, adv, w, mask, EPS).loss,
                                    (logp.clone().requires_grad_(True),), eps=1e-6, atol=1e-8)


def test_ppo_gradient_reaches_student_logits():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 6, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, 6, (2, 4))
    mask = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 0]], dtype=torch.bool)
    old = pg.token_log_probs(logits.detach() + 0.3 * torch.randn(2, 4, 6, dtype=torch.float64), tokens)
    adv = torch.randn(2, 4, dtype=torch.float64)
    w = torch.rand(2, 4, dtype=torch.float64) + 0.5

    def loss(z):
        return pg.ppo_policy_loss(pg.token_log_probs(z, tokens), old, adv, w, mask, EPS).loss

    assert torch.autograd.gradcheck(loss, (logits,), eps=1e-6, atol=1e-8)
    g = torch.autograd.grad(loss(logits), logits)[0]
    assert g[~mask].abs().sum() == 0  # prompt and padding positions get no gradient


def test_single_step_term_value_and_analytic_gradient():
    torch.manual_seed(1)
    s = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 3, 5, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]], dtype=torch.bool)
    reg = pg.single_step_reverse_kl(s, t, mask)
    lq, lp = torch.log_softmax(s.detach(), -1), torch.log_softmax(t, -1)
    kl = (lq.exp() * (lq - lp)).sum(-1)
    assert float(reg.detach()) == pytest.approx(float(kl[mask].mean()), rel=1e-12)
    reg.backward()
    # d KL(q || p) / d z_k = q_k (log q_k - log p_k - KL), averaged over the 4 response tokens
    analytic = lq.exp() * (lq - lp - kl.unsqueeze(-1)) / 4 * mask.unsqueeze(-1)
    assert torch.allclose(s.grad, analytic, atol=1e-12)
    assert torch.autograd.gradcheck(lambda z: pg.single_step_reverse_kl(z, t, mask), (s.detach().requires_grad_(True),))


def test_pretraining_term_mixes_lm_and_kd():
    torch.manual_seed(2)
    s = torch.randn(2, 4, 7, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 4, 7, dtype=torch.float64)
    target = torch.randint(2, 7, (2, 4))
    target[1, 3] = 1  # padding
    out = pg.pretraining_loss(s, t, target, pad=1, kd_ratio=0.5)
    m = target.ne(1)
    ce = F.cross_entropy(s.detach()[m], target[m])
    lp, lq = torch.log_softmax(t[m], -1), torch.log_softmax(s.detach()[m], -1)
    kd = (lp.exp() * (lp - lq)).sum(-1).mean()
    assert float(out.lm.detach()) == pytest.approx(float(ce), rel=1e-12)
    assert float(out.kd.detach()) == pytest.approx(float(kd), rel=1e-12)
    assert float(out.loss.detach()) == pytest.approx(float(0.5 * ce + 0.5 * kd), rel=1e-12)
    assert torch.autograd.gradcheck(lambda z: pg.pretraining_loss(z, t, target, 1, 0.5).loss,
                                    (s.detach().requires_grad_(True),))


def test_criterion_refuses_a_task_without_rollouts():
    from distill_plugins.criterions.minillm import MiniLLMConfig, MiniLLMCriterion

    class Plain:
        teacher = object()
        source_dictionary = target_dictionary = None

    with pytest.raises(DistillError, match="--task minillm"):
        MiniLLMCriterion(Plain(), MiniLLMConfig())
    with pytest.raises(DistillError, match="--cliprange"):
        MiniLLMCriterion(Plain(), MiniLLMConfig(cliprange=1.5))
