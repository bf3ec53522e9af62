"""The minillm criterion's loss on a rollout batch is L_pg + L_reg + lm_coef * L_pt (spec 2) with every
option reaching its term (gamma, cliprange, reward scaling and clipping, lm_coef, kd_ratio,
--no-single-step-reg), finite although the student gives <pad> log q = -inf at padded positions; on a
batch without rollouts (validation) it is the summed CE over the response tokens."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from distill_plugins import policy_gradient as pg
from distill_plugins.criterions.minillm import MiniLLMConfig, MiniLLMCriterion
from distill_plugins.rollouts import rollout_batch
from test_logged_statistics import collect, crafted_setup  # noqa: F401 (fixtures)
from test_teacher_mixed_sampling import prompts, setup  # noqa: F401

OPTIONS = dict(kd_impl="plain", gamma=0.5, cliprange=0.05, reward_scaling=2.0, cliprange_reward=0.3, lm_coef=0.25,
               kd_ratio=0.3)


def terms(student, teacher, batch, lm, pad, cfg):
    """(L_pg, L_reg, L_pt) from the pure functions (each tested against float64 elsewhere)."""
    mask = batch["target"].ne(pad)
    ro = batch["rollout"]
    logits = student(**batch["net_input"])[0]
    rewards = pg.per_token_rewards(ro["teacher_logp"], ro["old_logp"], mask, cfg.reward_scaling, cfg.cliprange_reward)
    advantages, _ = pg.advantages_and_returns(rewards, mask, cfg.gamma, distributed=False)
    policy = pg.ppo_policy_loss(pg.token_log_probs(logits, batch["target"]), ro["old_logp"], advantages, ro["weight"],
                                mask, cfg.cliprange)
    reg = pg.single_step_reverse_kl(logits, teacher.logits(batch["net_input"]), mask)
    pt = pg.pretraining_loss(student(**lm["net_input"])[0], teacher.logits(lm["net_input"]), lm["target"], pad,
                             cfg.kd_ratio)
    return policy.loss, reg, pt.loss


def criterion_for(d, teacher, cfg):
    task = SimpleNamespace(target_dictionary=d, teacher=teacher, provides_rollouts=True, teachers=None)
    return MiniLLMCriterion(task, cfg)


@pytest.mark.parametrize("no_reg", [False, True])
def test_rollout_loss_is_the_sum_of_its_terms_with_non_default_options(crafted_setup, no_reg):  # noqa: F811
    task, d, student, teacher_model, teacher = crafted_setup
    assert student.decoder.logits[d.pad()] == -float("inf")  # log q(<pad>) = -inf at padded targets
    cfg = MiniLLMConfig(no_single_step_reg=no_reg, **OPTIONS)
    batch = rollout_batch(collect(crafted_setup, 0.2, 8, seed=5), d.pad())
    assert batch["target"].eq(d.pad()).any()  # padded rows
    batch["lm"] = lm = prompts(d, 3)
    loss, sample_size, _ = criterion_for(d, teacher, cfg)(student, batch)
    policy, reg, pt = terms(student, teacher, batch, lm, d.pad(), cfg)
    expected = policy + (0.0 if no_reg else reg) + cfg.lm_coef * pt
    assert torch.isfinite(loss) and sample_size == 1
    assert float(loss) == pytest.approx(float(expected), rel=1e-6, abs=1e-7)
    # the options change the value on this batch, so each must have reached its term
    default = sum(terms(student, teacher, batch, lm, d.pad(), MiniLLMConfig(kd_impl="plain", kd_ratio=0.3)))
    assert abs(float(default) - float(expected)) > 1e-3


def test_batch_without_rollouts_gives_the_summed_ce(crafted_setup):  # noqa: F811
    task, d, student, teacher_model, teacher = crafted_setup
    batch = rollout_batch(collect(crafted_setup, 0.0, 4, seed=3), d.pad())
    del batch["rollout"]
    loss, sample_size, _ = criterion_for(d, teacher, MiniLLMConfig(kd_impl="plain"))(student, batch)
    mask = batch["target"].ne(d.pad())
    logits = student(**batch["net_input"])[0]
    assert sample_size == int(mask.sum()) > 1
    expected = F.cross_entropy(logits[mask].float(), batch["target"][mask], reduction="sum")
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)


def test_ppo_loss_is_finite_with_minus_inf_log_probs_at_padding():
    logp = torch.tensor([[-1.0, -0.5, -float("inf")]], requires_grad=True)
    mask = torch.tensor([[True, True, False]])
    old, adv, w = torch.tensor([[-1.2, -0.4, 0.0]]), torch.tensor([[0.5, -1.0, 0.0]]), torch.ones(1, 3)
    out = pg.ppo_policy_loss(logp, old, adv, w, mask)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(logp.grad).all() and logp.grad[0, 2] == 0
    ratio = torch.exp(torch.tensor([0.2, -0.1]))
    expected = torch.max(-torch.tensor([0.5, -1.0]) * ratio, -torch.tensor([0.5, -1.0]) * ratio.clamp(0.8, 1.2)).mean()
    torch.testing.assert_close(out.loss.detach(), expected)
