"""MiniLLM's logged statistics as MiniLLM logs them (spec 2; M/minillm/losses.py, sampler.py):
``reward`` is the per-rollout discounted, length-normalised sum of r_t, and ``rev_kl`` is measured on
a pure-student response to each prompt, a second sample when the rollouts are teacher-mixed."""
import math
from types import SimpleNamespace

import pytest
import torch

from distill_plugins import policy_gradient as pg
from distill_plugins.criterions.minillm import MiniLLMConfig, MiniLLMCriterion
from distill_plugins.rollouts import RolloutStore, SEQUENCE_FIELDS, collect_rollouts, rollout_batch, sampler_model
from distill_plugins.sampling import generation_args
from distill_plugins.teacher import Teacher
from test_teacher_mixed_sampling import P, Q, prompts, setup  # noqa: F401 (setup: the crafted models' fixture)

ALPHA = 0.2
KL_QP = sum(q * math.log(q / p) for q, p in zip(Q, P))  # the crafted models' per-step KL(q || p)


def reference_sequence_rkl(student, teacher, mask):
    """float64 loops: per row, the mean over its masked positions of sum_v q (log q - log p) over the
    entries finite in both models (softmax over each model's finite entries); 0 for an empty row."""
    out = []
    for b in range(mask.size(0)):
        vals = []
        for t in range(mask.size(1)):
            if not mask[b, t]:
                continue
            s, u = student[b, t].double(), teacher[b, t].double()
            fs, fu = torch.isfinite(s), torch.isfinite(u)
            log_q = s - torch.logsumexp(s[fs], 0)
            log_p = u - torch.logsumexp(u[fu], 0)
            both = fs & fu
            vals.append(float((log_q[both].exp() * (log_q[both] - log_p[both])).sum()))
        out.append(sum(vals) / len(vals) if vals else 0.0)
    return torch.tensor(out, dtype=torch.float64)


def test_sequence_reverse_kl_matches_float64_reference_with_inf_padding_and_empty_rows():
    g = torch.Generator().manual_seed(3)
    b, t, v = 4, 6, 11
    student = torch.randn(b, t, v, generator=g, dtype=torch.float64) * 3
    teacher = torch.randn(b, t, v, generator=g, dtype=torch.float64) * 3
    student[0, 1, [2, 5]] = -math.inf  # masked vocabulary in the student
    teacher[1, 2, [0, 7]] = -math.inf  # and in the teacher
    student[2, 3, 4] = teacher[2, 3, 4] = -math.inf
    mask = torch.tensor([[0, 1, 1, 1, 0, 0],   # prompt, 3 response tokens, padding
                         [0, 0, 1, 1, 1, 1],
                         [1, 1, 1, 1, 1, 1],
                         [0, 0, 0, 0, 0, 0]],  # empty response
                        dtype=torch.bool)
    student[~mask] = math.nan  # padding positions must not be read
    got = pg.sequence_reverse_kl(student, teacher, mask)
    ref = reference_sequence_rkl(student, teacher, mask)
    assert got.dtype == torch.float64 and torch.allclose(got, ref, rtol=1e-12, atol=1e-12)
    assert got[3] == 0 and torch.isfinite(got).all()
    # float32 inputs: the same values to float32 precision
    got32 = pg.sequence_reverse_kl(student.float(), teacher.float(), mask)
    assert got32.dtype == torch.float32 and torch.allclose(got32.double(), ref, rtol=1e-5, atol=1e-6)


def test_reward_statistic_is_the_discounted_length_normalised_sum_per_rollout():
    gamma = 0.95
    rewards = torch.tensor([[0.0, 0.5, -1.0, 2.0, 0.0],
                            [0.0, 0.0, 0.0, 1.5, -0.5],
                            [3.0, 1.0, 0.0, -2.0, 4.0],
                            [0.0, 0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 0, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    returns = pg.length_normalized_returns(rewards * mask, mask, gamma)
    got = pg.sequence_values(returns, mask)
    ref = []
    for row, m in zip(rewards.tolist(), mask.tolist()):  # losses.py _get_cumsum_rewards(...) / lens
        rs = [r for r, keep in zip(row, m) if keep]
        ref.append(sum(gamma ** k * r for k, r in enumerate(rs)) / len(rs) if rs else 0.0)
    assert torch.allclose(got, torch.tensor(ref, dtype=torch.float64), rtol=1e-12, atol=1e-12)


@pytest.fixture(scope="module")
def crafted_setup(setup):
    task, d, student, teacher_model = setup
    return task, d, student, teacher_model, Teacher(teacher_model, path="crafted", sha256="0" * 64)


def collect(crafted_setup, alpha, n, with_student_sample=True, seed=0):
    task, d, student, teacher_model, teacher = crafted_setup
    sampler = sampler_model(student, teacher_model, alpha)
    generator = task.build_generator([sampler], generation_args(max_len=64))
    student_generator = task.build_generator([student], generation_args(max_len=64)) if with_student_sample else None
    torch.manual_seed(seed)
    return collect_rollouts(task, student, teacher, sampler, generator, prompts(d, n), alpha, max_len=64,
                            student_generator=student_generator)


def test_teacher_mixed_rollouts_log_rev_kl_on_a_second_pure_student_sample(crafted_setup):
    n = 2000
    rollouts = collect(crafted_setup, ALPHA, n)
    # the crafted models' next-token distributions are constant: every response's mean per-step KL is KL(q || p)
    assert all(r["student_rev_kl"] == pytest.approx(KL_QP, rel=1e-5) for r in rollouts)
    # lengths tell the samples apart: EOS has probability 0.10 under q, 0.14 under the mixture
    # (geometric lengths with means 10 and 7.1, cut at 60 tokens; standard errors about 0.2)
    student_len = sum(r["student_len"] for r in rollouts) / n
    mixed_len = sum(len(r["old_logp"]) for r in rollouts) / n
    eos_mix = (1 - ALPHA) * Q[0] + ALPHA * P[0]
    assert abs(student_len - 1 / Q[0]) < 1.0, student_len
    assert abs(mixed_len - 1 / eos_mix) < 0.8, mixed_len
    assert any(r["student_len"] != len(r["old_logp"]) for r in rollouts)


def test_pure_student_rollouts_log_rev_kl_on_themselves_and_the_option_drops_it(crafted_setup):
    rollouts = collect(crafted_setup, 0.0, 50, with_student_sample=False)
    assert all(r["student_len"] == len(r["old_logp"]) for r in rollouts)
    assert all(r["student_rev_kl"] == pytest.approx(KL_QP, rel=1e-5) for r in rollouts)
    mixed = collect(crafted_setup, ALPHA, 20, with_student_sample=False)
    assert not any(name in r for r in mixed for name in SEQUENCE_FIELDS)
    assert not set(SEQUENCE_FIELDS) & set(rollout_batch(mixed, 1)["rollout"])


def test_store_checkpoint_keeps_the_logged_per_rollout_values(crafted_setup):
    pad = crafted_setup[1].pad()
    rollouts = collect(crafted_setup, ALPHA, 12)
    store = RolloutStore(ppo_epochs=2, seed=4)
    store.fill(rollouts)
    store.next_minibatch(5)
    resumed = RolloutStore(ppo_epochs=2)
    resumed.load_state_dict(store.state_dict(pad))
    for a, b in zip(resumed.rollouts, store.rollouts):
        assert {k: a[k] for k in SEQUENCE_FIELDS} == {k: b[k] for k in SEQUENCE_FIELDS}
    old = store.state_dict(pad)
    del old["sequence_fields"]  # a checkpoint written before these fields existed still loads
    resumed.load_state_dict(old)
    assert not any(name in r for r in resumed.rollouts for name in SEQUENCE_FIELDS)


def test_criterion_logs_reward_and_rev_kl_per_rollout(crafted_setup):
    task, d, student, teacher_model, teacher = crafted_setup
    fake_task = SimpleNamespace(target_dictionary=d, teacher=teacher, provides_rollouts=True, teachers=None)
    cfg = MiniLLMConfig(kd_impl="plain")
    criterion = MiniLLMCriterion(fake_task, cfg)
    rollouts = collect(crafted_setup, ALPHA, 8, seed=5)
    batch = rollout_batch(rollouts, d.pad())
    _, _, log = criterion(student, batch)
    ref = []
    for r in rollouts:  # float64, per rollout: sum_k gamma^k r_k / n with r = clip((log p - log q_old) / 0.5)
        rs = ((r["teacher_logp"].double() - r["old_logp"].double()) / cfg.reward_scaling).clamp(-100, 100)
        ref.append(sum(cfg.gamma ** k * float(x) for k, x in enumerate(rs)) / len(rs))
    assert log["reward"] == pytest.approx(sum(ref) / len(ref), rel=1e-5)
    assert log["rev_kl"] == pytest.approx(KL_QP, rel=1e-5)
    assert log["stu_len"] == pytest.approx(sum(r["student_len"] for r in rollouts) / len(rollouts))
    assert log["reg_loss"] == pytest.approx(KL_QP, rel=1e-5)  # the current student's exact KL on the rollouts
