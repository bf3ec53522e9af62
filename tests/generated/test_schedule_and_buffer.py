"""Replay buffer, data-source rule and tau adaptation follow spec section 3 (DistiLLM)."""
import math
from types import SimpleNamespace

import pytest

from distill_plugins.errors import DistillError
from distill_plugins.generated import schedule
from distill_plugins.generated.replay_buffer import ReplayBuffer
from distill_plugins.generated.schedule import GENERATE, GENERATE_REPLAY, GROUND_TRUTH, REPLAY
from distill_plugins.generated.student_data import StudentData, validate_options

import torch


def ex(i):
    return {"id": i, "source": torch.tensor([2, i]), "target": torch.tensor([1, i]), "prompt_length": 1}


def test_buffer_is_a_fifo_of_its_capacity_sampled_without_replacement():
    buf = ReplayBuffer(5, seed=0)
    assert not buf.full and len(buf) == 0
    buf.push([ex(i) for i in range(3)])
    assert len(buf) == 3 and not buf.full
    buf.push([ex(i) for i in range(3, 8)])
    assert buf.full and len(buf) == 5
    assert sorted(e["id"] for e in buf.items) == [3, 4, 5, 6, 7]  # the oldest fell out first
    drawn = buf.sample(4)
    assert len({e["id"] for e in drawn}) == 4 and {e["id"] for e in drawn} <= {3, 4, 5, 6, 7}
    assert len(buf.sample(50)) == 5  # never more than it holds
    seen = {e["id"] for _ in range(200) for e in buf.sample(1)}
    assert seen == {3, 4, 5, 6, 7}  # uniform over the contents: every item comes up
    with pytest.raises(ValueError):
        ReplayBuffer(0)


def test_replay_share_schedules():
    assert schedule.replay_share(0.6, 25, 100, "decreasing") == pytest.approx(0.6 * 0.75)
    assert schedule.replay_share(0.6, 25, 100, "increasing") == pytest.approx(0.6 * 0.25)
    assert schedule.replay_share(0.6, 25, 100, "constant") == pytest.approx(0.3)
    assert schedule.replay_share(0.6, 100, 100, "decreasing") == 0.0


@pytest.mark.parametrize("r,tau,s,full,expected", [
    (0.05, 0.5, 0.1, True, GENERATE),        # r < s: fresh generation even with a full buffer
    (0.30, 0.5, 0.1, False, GENERATE),       # s <= r < tau, buffer not full: generate
    (0.30, 0.5, 0.1, True, REPLAY),          # s <= r < tau, buffer full: replay
    (0.50, 0.5, 0.1, True, GROUND_TRUTH),    # r >= tau
    (0.00, 0.0, 0.0, False, GROUND_TRUTH),   # tau 0 (DistiLLM's start): always ground truth
])
def test_adaptive_rule(r, tau, s, full, expected):
    assert schedule.choose_source("adaptive", r, tau=tau, s=s, buffer_full=full) == expected


def test_mixed_and_always_rules():
    assert schedule.choose_source("mixed", 0.49, lam=0.5) == GENERATE_REPLAY
    assert schedule.choose_source("mixed", 0.5, lam=0.5) == GROUND_TRUTH
    assert all(schedule.choose_source("always", r) == GENERATE_REPLAY for r in (0.0, 0.5, 0.999))


def test_decision_random_is_shared_and_uniform():
    a = [schedule.decision_random(7, u, 0) for u in range(2000)]
    assert a == [schedule.decision_random(7, u, 0) for u in range(2000)]  # every worker draws the same
    assert all(0.0 <= r < 1.0 for r in a)
    assert abs(sum(a) / len(a) - 0.5) < 0.03
    assert schedule.decision_random(7, 3, 0) != schedule.decision_random(7, 3, 1)
    assert schedule.decision_random(7, 3, 0) != schedule.decision_random(8, 3, 0)


def test_tau_adaptation_on_a_scripted_sequence_of_validation_losses():
    th = schedule.AdaptiveThreshold(tau=0.0, eps=0.1, prev_loss=2.0)  # dev loss of the initial model
    script = [  # (dev loss, tau after, prev after)
        (2.05, 0.0, 2.0),   # +0.05 < eps
        (2.10, 0.1, 2.10),  # +0.10 >= eps: raise, new reference
        (2.15, 0.1, 2.10),  # +0.05 over the *new* reference
        (1.50, 0.1, 2.10),  # a drop never lowers tau nor the reference
        (2.25, 0.2, 2.25),
        (3.00, 0.3, 3.00),
    ] + [(3.0 + 0.2 * k, min(0.3 + 0.1 * k, 1.0), 3.0 + 0.2 * k) for k in range(1, 10)]
    for loss, tau, prev in script:
        th.observe(loss)
        assert th.tau == pytest.approx(tau) and th.prev_loss == pytest.approx(prev)
    assert th.tau == 1.0  # capped
    fresh = schedule.AdaptiveThreshold(tau=0.2, eps=0.1)  # no initial loss: the first one is the reference
    assert not fresh.observe(5.0) and fresh.prev_loss == 5.0 and fresh.tau == 0.2


def cfg(**kw):
    base = dict(student_data_mode="adaptive", student_data_lambda=0.5, replay_buffer_size=4, adaptive_tau_init=0.0,
                adaptive_loss_eps=0.1, replay_ratio="decreasing", gen_max_new_tokens=8, gen_top_p=1.0,
                gen_temperature=1.0, max_update=10, seed=1, tokens_per_sample=64, student_data_trace=None)
    base.update(kw)
    return SimpleNamespace(**base)


class Meter:
    def __init__(self, avg):
        self.avg = avg


def test_validation_hook_adapts_on_the_first_subset_in_nats():
    sd = StudentData(cfg(), task=None)
    sd.threshold.prev_loss = 2.0
    bits = 2.2 / math.log(2)  # fairseq logs base 2
    sd.begin_valid()
    sd.after_valid({"nll_loss": round(bits, 3)}, {"nll_loss": Meter(bits)})
    assert sd.threshold.tau == pytest.approx(0.1) and sd.threshold.prev_loss == pytest.approx(2.2)
    sd.after_valid({"nll_loss": 100.0}, {"nll_loss": Meter(100.0)})  # a second subset: ignored
    assert sd.threshold.tau == pytest.approx(0.1)
    state = sd.state_dict()
    other = StudentData(cfg(), task=None)
    other.load_state_dict(state)
    assert other.threshold.tau == pytest.approx(0.1) and other.threshold.prev_loss == pytest.approx(2.2)


@pytest.mark.parametrize("kw,flag", [
    (dict(student_data_mode="mixed", student_data_lambda=1.5), "--student-data-lambda"),
    (dict(student_data_lambda=-0.1), "--student-data-lambda"),
    (dict(adaptive_tau_init=1.2), "--adaptive-tau-init"),
    (dict(adaptive_tau_init=-0.5), "--adaptive-tau-init"),
    (dict(replay_buffer_size=0), "--replay-buffer-size"),
    (dict(gen_top_p=0.0), "--gen-top-p"),
    (dict(max_update=0), "--max-update"),
])
def test_bad_options_are_one_line_errors(kw, flag):
    with pytest.raises(DistillError) as e:
        validate_options(cfg(**kw))
    assert flag in str(e.value) and "\n" not in str(e.value)


def test_buffer_batches_never_repeat_an_example():
    """uniform sampling without replacement (random.sample), every time"""
    buf = ReplayBuffer(5, seed=0)
    buf.push([{"id": i, "source": torch.tensor([2, i]), "target": torch.tensor([1, i]), "prompt_length": 1}
              for i in range(5)])
    for _ in range(100):
        assert sorted(e["id"] for e in buf.sample(5)) == [0, 1, 2, 3, 4]
