"""MiniLLM's L_pt = (1 - k) LM + k KL(p || q) on an --lm-data batch and L_reg (single-step reverse KL):
--kd-impl chunked and fused give plain's value (and a float64 reference) and plain's gradients
(L_pt for k = 0.5, the spec, and 0)."""
import pytest
import torch
from omegaconf import OmegaConf

import distill_plugins  # noqa: F401  (registers criterions)
from conftest import in_memory_kd_task
from distill_plugins import divergences as D
from distill_plugins.data.lm_corpus import LMBlocks
from distill_plugins.data.prompt_response_dataset import collate_examples
from distill_plugins.output_projection import fusable_output


@pytest.fixture(scope="module")
def setup():
    task, student = in_memory_kd_task(tokens_per_sample=16)
    task.provides_rollouts = True  # what --task minillm declares; L_pt needs only the teacher
    d = task.dictionary
    g = torch.Generator().manual_seed(3)
    blocks = [torch.randint(d.nspecial, len(d), (11,), generator=g) for _ in range(4)]
    lm = collate_examples([LMBlocks(blocks, d.eos(), d.pad())[i] for i in range(4)], d.pad())
    lm["target"][1, 4:] = d.pad()  # padding is no label
    return task, student, lm


def reference64(task, student, lm, k):
    with torch.no_grad():
        s = student(**lm["net_input"])[0].double()
        t = task.teacher.logits(lm["net_input"]).double()
    mask = lm["target"].ne(task.dictionary.pad())
    ce = -torch.log_softmax(s[mask], -1).gather(1, lm["target"][mask].unsqueeze(1)).mean()
    kd = D.forward_kl(s[mask], t[mask]).mean()
    return float((1 - k) * ce + k * kd), float(ce), float(kd) if k > 0 else 0.0  # k = 0: no teacher forward


@pytest.mark.parametrize("k", [0.5, 0.0])
def test_chunked_and_fused_equal_plain(setup, k):
    task, student, lm = setup
    assert fusable_output(student) is not None and task.teacher.projected_logits(lm["net_input"], lm["target"].ne(
        task.dictionary.pad())) is not None  # fused really fuses both sides
    want = reference64(task, student, lm, k)
    results = {}
    for impl in ("plain", "chunked", "fused"):
        criterion = task.build_criterion(OmegaConf.create(
            {"_name": "minillm", "kd_ratio": k, "kd_impl": impl, "kd_chunk_size": 7}))
        student.zero_grad()
        pt = criterion.pretraining_term(student, lm)
        pt.loss.backward()
        results[impl] = pt, [p.grad.clone() for p in student.parameters()]
        assert (float(pt.loss.detach()), float(pt.lm.detach()), float(pt.kd.detach())) == pytest.approx(want, rel=1e-5, abs=1e-7), impl
    for impl in ("chunked", "fused"):
        for a, b in zip(results[impl][1], results["plain"][1]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_single_step_term_chunked_and_fused_equal_plain(setup):
    """L_reg = mean_t KL(q_t || p_t) over response tokens: same value and gradient on every path."""
    task, student, lm = setup
    sample = dict(lm)  # any batch: its labelled positions stand for a rollout's response tokens
    mask = sample["target"].ne(task.dictionary.pad())
    with torch.no_grad():
        want = D.reverse_kl(student(**sample["net_input"])[0].double()[mask],
                            task.teacher.logits(sample["net_input"]).double()[mask]).mean()
    grads = {}
    for impl in ("plain", "chunked", "fused"):
        criterion = task.build_criterion(OmegaConf.create({"_name": "minillm", "kd_impl": impl, "kd_chunk_size": 5}))
        student.zero_grad()
        reg = criterion.single_step_term(student(**sample["net_input"])[0], sample["net_input"], mask)
        assert float(reg.detach()) == pytest.approx(float(want), rel=1e-5), impl
        reg.backward()
        grads[impl] = [p.grad.clone() for p in student.parameters()]
    for impl in ("chunked", "fused"):
        for a, b in zip(grads[impl], grads["plain"]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
