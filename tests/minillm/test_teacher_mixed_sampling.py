"""Teacher-mixed sampling draws from (1 - a) q + a p, and the stored per-token importance weights,
student and teacher log-probabilities are the exact values of two crafted models."""
import math

import pytest
import torch
from fairseq.data import Dictionary
from fairseq.models import FairseqIncrementalDecoder, FairseqLanguageModel
from scipy.stats import chisquare

from distill_plugins.data.prompt_response_dataset import collate_examples, join_prompt_response
from distill_plugins.policy_gradient import mixture_importance_weights
from distill_plugins.rollouts import RolloutStore, collect_rollouts, rollout_batch, sampler_model
from distill_plugins.sampling import generation_args
from distill_plugins.tasks.instruction_distillation import InstructionDistillationConfig, InstructionDistillationTask
from distill_plugins.teacher import Teacher

ALPHA = 0.2
SYMBOLS = ["a", "b", "c", "d", "e"]
# next-token distributions over [eos, a, b, c, d, e], the same at every position
Q = [0.10, 0.40, 0.30, 0.14, 0.05, 0.01]
P = [0.30, 0.05, 0.10, 0.15, 0.20, 0.20]


class ConstantDecoder(FairseqIncrementalDecoder):
    """Logits that do not depend on the input: a known next-token distribution at every step."""

    def __init__(self, dictionary, probs):
        super().__init__(dictionary)
        logits = torch.full((len(dictionary),), -math.inf)
        for sym, pr in zip(["</s>"] + SYMBOLS, probs):
            logits[dictionary.index(sym)] = math.log(pr)
        self.logits = torch.nn.Parameter(logits, requires_grad=False)

    def forward(self, prev_output_tokens, encoder_out=None, incremental_state=None, **kwargs):
        b, t = prev_output_tokens.shape
        return self.logits.expand(b, t, -1).clone(), {"attn": [None]}

    def max_positions(self):
        return 64


def crafted(dictionary, probs):
    return FairseqLanguageModel(ConstantDecoder(dictionary, probs)).eval()


@pytest.fixture(scope="module")
def setup():
    d = Dictionary()
    for s in SYMBOLS:
        d.add_symbol(s)
    task = InstructionDistillationTask(InstructionDistillationConfig(data="unused"), d)
    return task, d, crafted(d, Q), crafted(d, P)


def prompts(d, n):
    prompt = torch.tensor([d.index("a"), d.index("c"), d.index("b")])
    examples = [join_prompt_response(prompt, torch.tensor([d.eos()]), d.pad(), d.eos(), 64, i) for i in range(n)]
    return collate_examples(examples, d.pad())


def test_first_tokens_follow_the_mixture_and_weights_are_exact(setup):
    task, d, student, teacher_model = setup
    teacher = Teacher(teacher_model, path="crafted", sha256="0" * 64)
    n = 4000
    sampler = sampler_model(student, teacher_model, ALPHA)
    assert not sampler.training and not teacher_model.training
    generator = task.build_generator([sampler], generation_args(max_len=8))
    torch.manual_seed(0)
    rollouts = collect_rollouts(task, student, teacher, sampler, generator, prompts(d, n), ALPHA, max_len=8)
    assert not teacher_model.training  # sampling left the teacher in eval mode
    ids = [d.eos()] + [d.index(s) for s in SYMBOLS]
    first = [int(r["target"][r["prompt_length"]]) for r in rollouts]
    counts = [first.count(i) for i in ids]
    assert sum(counts) == n
    mix = [(1 - ALPHA) * q + ALPHA * p for q, p in zip(Q, P)]
    assert chisquare(counts, [n * m for m in mix]).pvalue > 1e-3
    # the test has the power to tell the mixture from the student alone
    assert chisquare(counts, [n * q for q in Q]).pvalue < 1e-8

    lq = {i: math.log(q) for i, q in zip(ids, Q)}
    lp = {i: math.log(p) for i, p in zip(ids, P)}
    for r in rollouts[:200]:
        labels = r["target"][r["prompt_length"]:]
        assert len(labels) == len(r["weight"]) == len(r["old_logp"]) == len(r["teacher_logp"])
        for k, y in enumerate(labels.tolist()):
            q, p = math.exp(lq[y]), math.exp(lp[y])
            assert r["old_logp"][k].item() == pytest.approx(lq[y], abs=1e-5)
            assert r["teacher_logp"][k].item() == pytest.approx(lp[y], abs=1e-5)
            assert r["weight"][k].item() == pytest.approx(q / ((1 - ALPHA) * q + ALPHA * p), rel=1e-5)

    # collated back into a batch, the per-token fields sit exactly at the response labels
    batch = rollout_batch(rollouts[:5], d.pad())
    mask = batch["target"].ne(d.pad())
    for name in ("old_logp", "teacher_logp", "weight"):
        assert torch.equal(batch["rollout"][name][mask], torch.cat([r[name] for r in rollouts[:5]]))
        assert batch["rollout"][name][~mask].abs().sum() == 0


def test_alpha_zero_samples_the_student(setup):
    task, d, student, teacher_model = setup
    sampler = sampler_model(student, teacher_model, 0.0)
    assert sampler is student
    teacher = Teacher(teacher_model, path="crafted", sha256="0" * 64)
    generator = task.build_generator([sampler], generation_args(max_len=6))
    torch.manual_seed(1)
    rollouts = collect_rollouts(task, student, teacher, sampler, generator, prompts(d, 2000), 0.0, max_len=6)
    ids = [d.eos()] + [d.index(s) for s in SYMBOLS]
    first = [int(r["target"][r["prompt_length"]]) for r in rollouts]
    assert chisquare([first.count(i) for i in ids], [2000 * q for q in Q]).pvalue > 1e-3
    assert all(bool((r["weight"] == 1).all()) for r in rollouts)


def test_importance_weight_formula_float64():
    torch.manual_seed(0)
    lq = torch.log_softmax(torch.randn(50, dtype=torch.float64), 0)
    lp = torch.log_softmax(torch.randn(50, dtype=torch.float64) * 3, 0)
    for a in (0.0, 0.2, 0.7):
        ref = lq.exp() / ((1 - a) * lq.exp() + a * lp.exp())
        assert torch.allclose(mixture_importance_weights(lq, lp, a), ref, rtol=1e-12)
    # the weights are bounded by 1 / (1 - a) and the mixture expectation of w is 1
    w = mixture_importance_weights(lq, lp, 0.2)
    assert float(w.max()) <= 1 / 0.8 + 1e-12
    assert float(((0.8 * lq.exp() + 0.2 * lp.exp()) * w).sum()) == pytest.approx(1.0, abs=1e-12)


def test_store_replays_each_collection_for_ppo_epochs_then_clears():
    store = RolloutStore(ppo_epochs=3, seed=0)
    assert store.exhausted()
    store.fill([{"id": i} for i in range(10)])
    seen = []
    while not store.exhausted():
        seen.append([r["id"] for r in store.next_minibatch(4)])
    assert [len(b) for b in seen] == [4, 4, 2] * 3  # a pass never spills into the next
    passes = [sorted(sum(seen[i:i + 3], [])) for i in (0, 3, 6)]
    assert passes == [list(range(10))] * 3
    assert sum(seen[0:3], []) != sum(seen[3:6], [])  # a fresh order each pass
    assert store.next_minibatch(4) is None and store.rollouts == []
