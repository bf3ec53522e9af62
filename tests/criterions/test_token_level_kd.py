"""Every registered token-level KD criterion, built in-process through fairseq's registry, against
an independent per-example float64 computation of

    loss = (1 - kd_ratio) * sum_t CE_t + kd_ratio * sum_t D_t,   sample_size = number of labels,

where t runs over response tokens and the EOS only (prompt and padding positions are no labels).
The expected values are computed one example at a time, without padding and without the
criterion's mask, so batching, padding and masking are all checked.
"""
import math

import pytest
import torch
from fairseq.criterions import CRITERION_REGISTRY
from fairseq.data import Dictionary, ListDataset
from fairseq.logging import metrics
from omegaconf import OmegaConf

import distill_plugins  # noqa: F401  (registers task, criterions, archs)
from conftest import in_memory_kd_task
from distill_plugins import divergences as D
from distill_plugins.data.prompt_response_dataset import PromptResponseDataset
from distill_plugins.errors import DistillError
from distill_plugins.tasks.instruction_distillation import (
    InstructionDistillationConfig,
    InstructionDistillationTask,
)

MAX_LEN = 14
# --kd-impl: full logits, 5 tokens at a time, 5 tokens at a time with the output projection fused in
IMPLS = ["plain", "chunked", "fused"]
CHUNK = {"kd_chunk_size": 5}
# criterion -> (its extra options, non-default; the divergence it must compute in float64)
CRITERIONS = {
    "kd": ({}, lambda s, t, T: D.forward_kl(s, t, temperature=T)),
    "reverse_kl": ({}, lambda s, t, T: D.reverse_kl(s, t, temperature=T)),
    "skew_kl": ({"skew_alpha": 0.2}, lambda s, t, T: D.skew_kl(s, t, alpha=0.2, temperature=T)),
    "skew_reverse_kl": (
        {"skew_alpha": 0.3}, lambda s, t, T: D.skew_reverse_kl(s, t, alpha=0.3, temperature=T)
    ),
    "js": ({"js_beta": 0.9}, lambda s, t, T: D.js_divergence(s, t, beta=0.9, temperature=T)),
    "tvd": ({}, lambda s, t, T: D.total_variation(s, t, temperature=T)),
    "adaptive_kl": (
        {"adaptive_kl_alpha": 0.4}, lambda s, t, T: D.adaptive_kl(s, t, alpha=0.4, temperature=T)
    ),
}


@pytest.fixture(scope="module")
def setup():
    """A real task on a 30-word dictionary, a student, and a different (untrained) teacher."""
    return in_memory_kd_task(tokens_per_sample=MAX_LEN)


def examples(dictionary):
    """(prompt, response) word ids, binarized like fairseq-preprocess (each with a trailing EOS):
    varied lengths, an empty response (EOS only), and a prompt longer than MAX_LEN (no labels)."""
    g = torch.Generator().manual_seed(0)
    lengths = [(3, 4), (6, 1), (2, 0), (5, 7), (1, 2), (4, 3), (MAX_LEN + 2, 3)]
    first, n = dictionary.nspecial, len(dictionary) - dictionary.nspecial
    eos = torch.tensor([dictionary.eos()])
    out = []
    for p, r in lengths:
        prompt = torch.randint(first, first + n, (p,), generator=g)
        response = torch.randint(first, first + n, (r,), generator=g)
        out.append((torch.cat([prompt, eos]), torch.cat([response, eos])))
    return out


def dataset(task, pairs):
    prompts = ListDataset([p for p, _ in pairs], sizes=[len(p) for p, _ in pairs])
    responses = ListDataset([r for _, r in pairs], sizes=[len(r) for _, r in pairs])
    return PromptResponseDataset(prompts, responses, task.dictionary, max_len=MAX_LEN, shuffle=False)


def batch(ds, indices):
    return ds.collater([ds[i] for i in indices])


def build(task, name, **options):
    cfg = OmegaConf.create({"_name": name, **options})
    criterion = task.build_criterion(cfg)
    assert isinstance(criterion, CRITERION_REGISTRY[name])
    return criterion


def expected(task, student, pairs, divergence, kd_ratio, temperature):
    """Per example, unpadded: sequence = prompt + response (binarized EOSs dropped/kept as fairseq
    LMs do), the student/teacher predict position i+1 from [EOS] + tokens[:i+1]; labels are the
    response tokens and its EOS, i.e. the predictions made at positions len(prompt)...; float64."""
    ce = kd = 0.0
    n = 0
    for prompt, response in pairs:
        tokens = torch.cat([prompt[:-1], response])[:MAX_LEN]
        source = torch.cat([torch.tensor([task.dictionary.eos()]), tokens[:-1]]).unsqueeze(0)
        first_label = len(prompt) - 1
        labels = tokens[first_label:]
        if len(labels) == 0:
            continue
        net_input = {"src_tokens": source, "src_lengths": torch.tensor([source.size(1)])}
        with torch.no_grad():
            s = student(**net_input)[0][0, first_label:].double()
            t = task.teacher.logits(net_input)[0, first_label:].double()
        lprobs = torch.log_softmax(s, -1)
        ce += float(-lprobs.gather(1, labels.unsqueeze(1)).sum())
        kd += float(divergence(s, t, temperature).sum())
        n += len(labels)
    return (1 - kd_ratio) * ce + kd_ratio * kd, ce, kd, n


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", list(CRITERIONS))
def test_loss_is_ce_kd_mix_over_response_tokens(setup, name, impl):
    task, student = setup
    options, divergence = CRITERIONS[name]
    criterion = build(task, name, kd_ratio=0.3, temperature=2.0, kd_impl=impl, **CHUNK, **options)
    pairs = examples(task.dictionary)
    sample = batch(dataset(task, pairs), range(len(pairs)))
    loss, sample_size, log = criterion(student, sample)

    want, ce, kd, n = expected(task, student, pairs, divergence, 0.3, 2.0)
    # response tokens + one EOS per example; the empty response gives 1, the over-long prompt 0
    assert n == sum(len(r) for _, r in pairs[:-1]) == 23
    assert sample_size == n == log["sample_size"] == log["ntokens"] == sample["ntokens"]
    assert log["nsentences"] == len(pairs)
    assert loss.dtype == torch.float32 and loss.requires_grad
    for got, ref in ((loss, want), (log["loss"], want), (log["nll_loss"], ce), (log["kd_loss"], kd)):
        assert float(got.detach()) == pytest.approx(ref, rel=1e-5, abs=1e-5)
    assert kd > 0 and ce > 0


def test_ratio_extremes_and_fairseq_cross_entropy(setup):
    """kd_ratio 0 is plain CE, equal to fairseq's own cross_entropy criterion; kd_ratio 1 is plain KD."""
    task, student = setup
    pairs = examples(task.dictionary)
    sample = batch(dataset(task, pairs), range(len(pairs)))
    loss0, _, log0 = build(task, "kd", kd_ratio=0.0)(student, sample)
    fairseq_ce, fairseq_n, _ = build(task, "cross_entropy", sentence_avg=False)(student, sample)
    assert fairseq_n == 23
    assert float(loss0.detach()) == pytest.approx(float(fairseq_ce.detach()), rel=1e-6)
    assert float(log0["nll_loss"]) == pytest.approx(float(fairseq_ce.detach()), rel=1e-6)
    loss1, _, log1 = build(task, "kd", kd_ratio=1.0)(student, sample)
    assert float(loss1.detach()) == pytest.approx(float(log1["kd_loss"]), rel=1e-6)
    assert float(log1["kd_loss"]) == pytest.approx(float(log0["kd_loss"]), rel=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_batch_without_labels_gives_zero_loss(setup, impl):
    """A batch whose only example is all prompt: loss 0 (no NaN), sample_size 0."""
    task, student = setup
    pairs = examples(task.dictionary)[-1:]
    loss, sample_size, log = build(task, "skew_kl", kd_impl=impl)(student, batch(dataset(task, pairs), [0]))
    assert sample_size == 0 and float(loss.detach()) == 0.0 and torch.isfinite(log["kd_loss"])


def grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", ["skew_kl", "adaptive_kl"])
def test_gradient_accumulation_is_a_token_mean_over_the_global_batch(setup, name, impl):
    """fairseq divides the summed micro-batch losses by the summed sample sizes: two half batches
    (different lengths and padding) must give the full batch's loss / sample_size and gradient."""
    task, student = setup
    options, _ = CRITERIONS[name]
    criterion = build(task, name, kd_ratio=0.5, kd_impl=impl, **CHUNK, **options)
    pairs = examples(task.dictionary)
    ds = dataset(task, pairs)
    full, first, second = batch(ds, range(7)), batch(ds, [0, 3, 6]), batch(ds, [1, 2, 4, 5])

    student.zero_grad()
    loss, n, _ = criterion(student, full)
    (loss / n).backward()
    g_full = grads(student).clone()

    student.zero_grad()
    loss1, n1, _ = criterion(student, first)
    loss2, n2, _ = criterion(student, second)
    assert n1 + n2 == n and n1 != n2
    ((loss1 + loss2) / (n1 + n2)).backward()  # what the trainer does with update_freq 2
    g_acc = grads(student).clone()
    student.zero_grad()
    loss, loss1, loss2 = loss.detach(), loss1.detach(), loss2.detach()

    assert float((loss1 + loss2) / (n1 + n2)) == pytest.approx(float(loss / n), rel=1e-5)
    torch.testing.assert_close(g_acc, g_full, rtol=1e-4, atol=1e-6)
    # a per-micro-batch mean (DistiLLM/MiniLLM's reduction) would differ here
    assert abs(float((loss1 / n1 + loss2 / n2) / 2) - float(loss / n)) > 1e-3


def test_reduce_metrics_logs_per_token_base2(setup):
    task, student = setup
    criterion = build(task, "js", kd_ratio=0.3)
    pairs = examples(task.dictionary)
    ds = dataset(task, pairs)
    logs = [criterion(student, batch(ds, idx))[2] for idx in ([0, 3, 6], [1, 2, 4, 5])]
    n = sum(log["sample_size"] for log in logs)
    with metrics.aggregate() as agg:
        type(criterion).reduce_metrics(logs)
    values = agg.get_smoothed_values()
    for key in ("loss", "nll_loss", "kd_loss"):
        want = sum(float(log[key]) for log in logs) / n / math.log(2)
        assert values[key] == pytest.approx(want, abs=1e-3)  # logged rounded to 3 decimals
    assert values["ppl"] == pytest.approx(2 ** values["nll_loss"], rel=1e-2)
    assert type(criterion).logging_outputs_can_be_summed()


@pytest.mark.parametrize(
    "options, message",
    [
        ({"_name": "skew_kl", "skew_alpha": 1.5}, "--skew-alpha must be in [0, 1], got 1.5"),
        ({"_name": "kd", "kd_ratio": -0.1}, "--kd-ratio must be in [0, 1], got -0.1"),
        ({"_name": "js", "js_beta": 2.0}, "--js-beta must be in [0, 1]"),
        ({"_name": "adaptive_kl", "adaptive_kl_alpha": -1.0}, "--adaptive-kl-alpha must be in [0, 1]"),
        ({"_name": "tvd", "temperature": 0.0}, "--temperature must be > 0, got 0.0"),
    ],
)
def test_invalid_options_raise(setup, options, message):
    task, _ = setup
    with pytest.raises(DistillError) as e:
        task.build_criterion(OmegaConf.create(options))
    assert message in str(e.value)


def test_needs_a_teacher():
    task = InstructionDistillationTask(InstructionDistillationConfig(), Dictionary())
    with pytest.raises(DistillError, match="needs a teacher: pass --teacher-path"):
        build(task, "reverse_kl")
