"""multi_teacher_kd: loss = (1 - r) CE + r sum_k w_k D_k, checked against an independent float64
reference (value and gradient) and against the single-teacher criterions; bad options."""
import copy
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from fairseq.data import Dictionary
from fairseq.logging import metrics

import distill_plugins  # noqa: F401  (registers the criterions)
from distill_plugins.criterions.js import JSConfig, JSCriterion
from distill_plugins.criterions.kd import ForwardKLConfig, ForwardKLCriterion
from distill_plugins.criterions.multi_teacher_kd import MultiTeacherKDConfig, MultiTeacherKDCriterion
from distill_plugins.criterions.skew_kl import SkewKLConfig, SkewKLCriterion
from distill_plugins.errors import DistillError
from distill_plugins.teacher import Teacher

V, B, T = 13, 3, 7


class TinyLM(torch.nn.Module):
    def __init__(self, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = torch.nn.Parameter(torch.randn(V, 6, generator=g))
        self.out = torch.nn.Parameter(torch.randn(6, V, generator=g) * 1.5)

    def forward(self, src_tokens, src_lengths=None):
        return (self.emb[src_tokens] @ self.out,)


def make_task(teacher_seeds):
    d = Dictionary()
    for i in range(V - len(d)):
        d.add_symbol(f"w{i}")
    teachers = [Teacher(TinyLM(s), path=f"t{s}", sha256=str(s)) for s in teacher_seeds]
    return SimpleNamespace(target_dictionary=d, teachers=teachers, teacher=teachers[0] if teachers else None)


def make_sample(pad):
    g = torch.Generator().manual_seed(0)
    src = torch.randint(4, V, (B, T), generator=g)
    target = torch.randint(4, V, (B, T), generator=g)
    target[:, :2] = pad  # the prompt
    target[2, 5:] = pad  # padding
    return {"net_input": {"src_tokens": src, "src_lengths": torch.full((B,), T)}, "target": target}


# -- independent float64 reference ------------------------------------------------------------------
def ref_divergence(name, s, t, temperature, alpha=None, beta=None):
    log_q, log_p = torch.log_softmax(s / temperature, -1), torch.log_softmax(t / temperature, -1)
    q, p = log_q.exp(), log_p.exp()
    if name == "forward_kl":
        return (p * (log_p - log_q)).sum(-1)
    if name == "skew_kl":
        return (p * (log_p - torch.log(alpha * p + (1 - alpha) * q))).sum(-1)
    if name == "js":
        log_m = torch.log((1 - beta) * p + beta * q)
        return beta * (q * (log_q - log_m)).sum(-1) + (1 - beta) * (p * (log_p - log_m)).sum(-1)
    raise AssertionError(name)


def ref_loss(student, task, sample, kd_ratio, weights, names, temperature, alpha, beta):
    mask = sample["target"].ne(task.target_dictionary.pad())
    s = student(**sample["net_input"])[0][mask]  # student in float64
    ce = F.cross_entropy(s, sample["target"][mask], reduction="sum")
    kd = 0
    for w, name, teacher in zip(weights, names, task.teachers):
        t = copy.deepcopy(teacher.model).double()(**sample["net_input"])[0][mask]
        kd = kd + w * ref_divergence(name, s, t, temperature, alpha, beta).sum()
    return (1 - kd_ratio) * ce + kd_ratio * kd


def test_loss_and_gradient_match_float64_reference():
    task = make_task([11, 12, 13])
    sample = make_sample(task.target_dictionary.pad())
    cfg = MultiTeacherKDConfig(kd_ratio=0.3, temperature=2.0, teacher_weights="0.5,0.2,1.3",
                               teacher_divergences="kd,skew_kl,js", skew_alpha=0.2, js_beta=0.7)
    crit = MultiTeacherKDCriterion(task, cfg)
    student = TinyLM(1)
    loss, sample_size, log = crit(student, sample)
    grads = torch.autograd.grad(loss, list(student.parameters()))

    student64 = copy.deepcopy(student).double()
    ref = ref_loss(student64, task, sample, 0.3, [0.5, 0.2, 1.3], ["forward_kl", "skew_kl", "js"], 2.0, 0.2, 0.7)
    ref_grads = torch.autograd.grad(ref, list(student64.parameters()))
    assert sample_size == int(sample["target"].ne(task.target_dictionary.pad()).sum()) == 13
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), rg, rtol=1e-4, atol=1e-6)
    # the logged kd_loss is the weighted sum of the per-teacher terms
    kd_k = [log[f"kd_loss_{k}"].item() for k in range(3)]
    assert log["kd_loss"].item() == pytest.approx(0.5 * kd_k[0] + 0.2 * kd_k[1] + 1.3 * kd_k[2], rel=1e-5)


def test_equals_weighted_sum_of_single_teacher_criterions():
    task = make_task([21, 22, 23])
    sample = make_sample(task.target_dictionary.pad())
    weights = [0.5, 0.2, 0.3]  # sum to 1: then sum_k w_k loss_k = (1 - r) CE + r sum_k w_k D_k exactly
    multi = MultiTeacherKDCriterion(task, MultiTeacherKDConfig(
        kd_ratio=0.6, teacher_weights="0.5,0.2,0.3", teacher_divergences="forward_kl,skew_kl,js",
        skew_alpha=0.1, js_beta=0.5))
    singles = [  # TinyLM has no decoder.output_projection: the plain path (same values as fused)
        ForwardKLCriterion(make_task([21]), ForwardKLConfig(kd_ratio=0.6, kd_impl="plain")),
        SkewKLCriterion(make_task([22]), SkewKLConfig(kd_ratio=0.6, skew_alpha=0.1, kd_impl="plain")),
        JSCriterion(make_task([23]), JSConfig(kd_ratio=0.6, js_beta=0.5, kd_impl="plain")),
    ]
    student = TinyLM(2)
    with torch.no_grad():
        loss, _, log = multi(student, sample)
        single = [c(student, sample) for c in singles]
    assert loss.item() == pytest.approx(sum(w * s[0].item() for w, s in zip(weights, single)), rel=1e-6)
    for k, (_, _, slog) in enumerate(single):
        assert log[f"kd_loss_{k}"].item() == pytest.approx(slog["kd_loss"].item(), rel=1e-6)
    assert log["nll_loss"].item() == pytest.approx(single[0][2]["nll_loss"].item(), rel=1e-6)


def test_defaults_equal_weights_forward_kl_and_metrics_per_teacher():
    task = make_task([31, 32])
    sample = make_sample(task.target_dictionary.pad())
    crit = MultiTeacherKDCriterion(task, MultiTeacherKDConfig(kd_ratio=1.0))
    assert crit.weights == [0.5, 0.5] and crit.divergence_names == ["forward_kl", "forward_kl"]
    _, n, log = crit(TinyLM(3), sample)
    with metrics.aggregate() as agg:
        MultiTeacherKDCriterion.reduce_metrics([log, log])  # two micro-batches
    values = agg.get_smoothed_values()
    for k in range(2):
        assert values[f"kd_loss_{k}"] == pytest.approx(log[f"kd_loss_{k}"].item() / n / math.log(2), abs=1e-3)


@pytest.mark.parametrize("options, message", [
    ({"teacher_weights": "0.5"}, "gives 1 weight(s) for 2 teacher(s)"),
    ({"teacher_weights": "0.5,-1"}, "must be finite and >= 0"),
    ({"teacher_weights": "0,0"}, "all 0"),
    ({"teacher_weights": "a,b"}, "not a comma-separated list of numbers"),
    ({"teacher_divergences": "kd"}, "gives 1 name(s) for 2 teacher(s)"),
    ({"teacher_divergences": "kd,bogus"}, "unknown divergence 'bogus'"),
    ({"skew_alpha": 1.5}, "--skew-alpha must be in [0, 1]"),
])
def test_bad_options_are_one_line_errors(options, message):
    with pytest.raises(DistillError) as e:
        MultiTeacherKDCriterion(make_task([41, 42]), MultiTeacherKDConfig(**options))
    assert message in e.value.message and "\n" not in e.value.message
    if "bogus" in message:  # lists the valid names
        assert "adaptive_kl" in e.value.message and "skew_reverse_kl" in e.value.message


def test_needs_a_teacher():
    with pytest.raises(DistillError, match="needs a teacher"):
        MultiTeacherKDCriterion(make_task([]), MultiTeacherKDConfig())
