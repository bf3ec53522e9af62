"""DistiLLM's extra LM term on a pre-training corpus (--lm-data, --lm-coef; spec section 3):

    loss = (1 - kd_ratio) * CE + kd_ratio * D + lm_coef * N * LM / N_lm

checked against float64 parts on every --kd-impl path, the one-line errors, and a short
fairseq-train run with --lm-data (together with student-generated data) that logs lm_loss."""
import math

import pytest
import torch
from fairseq.logging import metrics
from omegaconf import OmegaConf

import distill_plugins  # noqa: F401  (registers task, criterions, archs)
from conftest import in_memory_kd_task, train
from distill_plugins import divergences as D
from distill_plugins.data.lm_corpus import LMBlocks
from distill_plugins.data.prompt_response_dataset import collate_examples, join_prompt_response
from distill_plugins.errors import DistillError
from distill_plugins.tasks.instruction_distillation import InstructionDistillationConfig, InstructionDistillationTask


@pytest.fixture(scope="module")
def setup():
    task, student = in_memory_kd_task(tokens_per_sample=16)
    d = task.dictionary
    g = torch.Generator().manual_seed(0)
    word = lambda n: torch.randint(d.nspecial, len(d), (n,), generator=g)  # noqa: E731
    eos = torch.tensor([d.eos()])
    sample = collate_examples([join_prompt_response(word(p), torch.cat([word(r), eos]), d.pad(), d.eos(), 16, i)
                               for i, (p, r) in enumerate([(3, 4), (5, 1), (2, 6)])], d.pad())
    blocks = [word(9) for _ in range(3)]  # contiguous LM blocks: a label on every position
    lm = collate_examples([LMBlocks(blocks, d.eos(), d.pad())[i] for i in range(3)], d.pad())
    lm["target"][2, 6:] = d.pad()  # and some padding, which is no label
    return task, student, sample, lm


def lm_ce64(student, lm, pad):
    """Summed float64 CE of the student on the LM batch's labels, and their number."""
    with torch.no_grad():
        logits = student(**lm["net_input"])[0].double()
    mask = lm["target"].ne(pad)
    lp = torch.log_softmax(logits[mask], -1)
    return float(-lp.gather(1, lm["target"][mask].unsqueeze(1)).sum()), int(mask.sum())


def test_lm_term_chunked_and_fused_give_plain_gradients(setup):
    task, student, _, lm = setup
    grads = {}
    for impl in ("plain", "chunked", "fused"):
        criterion = task.build_criterion(OmegaConf.create(
            {"_name": "kd", "kd_ratio": 0.5, "kd_impl": impl, "kd_chunk_size": 5}))
        student.zero_grad()
        lm_sum, n_lm = criterion.lm_term(student, lm)
        lm_sum.backward()
        grads[impl] = (float(lm_sum.detach()), [p.grad.clone() for p in student.parameters() if p.grad is not None])
    assert float(grads["plain"][0]) == pytest.approx(lm_ce64(student, lm, task.dictionary.pad())[0], rel=1e-5)
    for impl in ("chunked", "fused"):
        assert grads[impl][0] == pytest.approx(grads["plain"][0], rel=1e-5)
        assert len(grads[impl][1]) == len(grads["plain"][1])
        for a, b in zip(grads[impl][1], grads["plain"][1]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("impl", ["plain", "chunked", "fused"])
@pytest.mark.parametrize("lm_coef", [1.0, 0.25])
def test_loss_is_the_sum_of_its_parts(setup, impl, lm_coef):
    task, student, sample, lm = setup
    pad = task.dictionary.pad()
    criterion = task.build_criterion(OmegaConf.create(
        {"_name": "skew_kl", "kd_ratio": 0.3, "skew_alpha": 0.1, "kd_impl": impl, "kd_chunk_size": 5,
         "lm_coef": lm_coef}))
    with torch.no_grad():  # the CE/KD parts in float64, independently of the criterion
        s = student(**sample["net_input"])[0].double()
        t = task.teacher.logits(sample["net_input"]).double()
    mask = sample["target"].ne(pad)
    labels = sample["target"][mask]
    ce = float(-torch.log_softmax(s[mask], -1).gather(1, labels.unsqueeze(1)).sum())
    kd = float(D.skew_kl(s[mask], t[mask], alpha=0.1).sum())
    n = int(mask.sum())
    lm_sum, n_lm = lm_ce64(student, lm, pad)
    assert n_lm == 3 * 8 - 3  # 8 labels a block (column 0 is the BOS, no label); row 2 padded from column 6

    loss, sample_size, log = criterion(student, dict(sample, lm=lm))
    want = 0.7 * ce + 0.3 * kd + lm_coef * n * lm_sum / n_lm
    assert sample_size == n and loss.requires_grad
    assert float(loss.detach()) == pytest.approx(want, rel=1e-5)
    assert float(log["lm_loss"]) == pytest.approx(lm_sum, rel=1e-5) and log["lm_ntokens"] == n_lm
    plain, _, plain_log = criterion(student, sample)  # without an LM batch: the CE/KD mix alone
    assert float(plain.detach()) == pytest.approx(0.7 * ce + 0.3 * kd, rel=1e-5) and "lm_loss" not in plain_log

    with metrics.aggregate() as agg:  # logged per LM token, in base 2 like fairseq's losses
        type(criterion).reduce_metrics([log])
    assert agg.get_smoothed_values()["lm_loss"] == pytest.approx(lm_sum / n_lm / math.log(2), abs=2e-3)

    student.zero_grad()  # the LM term has gradient
    (loss - plain).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())


def test_bad_lm_options_are_one_line_errors(setup, data_bin, plain_lm_data, tmp_path):
    task, *_ = setup
    with pytest.raises(DistillError, match="--lm-coef must be >= 0"):
        task.build_criterion(OmegaConf.create({"_name": "kd", "lm_coef": -1.0}))
    with_lm = InstructionDistillationTask.setup_task(InstructionDistillationConfig(data=data_bin, lm_data=plain_lm_data, seed=1))
    with pytest.raises(DistillError, match="cross_entropy would ignore it"):
        with_lm.build_criterion(OmegaConf.create({"_name": "cross_entropy", "sentence_avg": False}))
    missing = InstructionDistillationTask.setup_task(InstructionDistillationConfig(data=data_bin,
                                                                                   lm_data=str(tmp_path / "no")))
    with pytest.raises(DistillError, match="is not a directory"):
        missing.load_lm_corpus()
    with pytest.raises(DistillError, match="--lm-batch-size must be >= 1"):
        InstructionDistillationTask.setup_task(InstructionDistillationConfig(data=data_bin, lm_batch_size=0))


def test_fairseq_train_with_lm_data_logs_lm_loss(data_bin, teacher_ckpt, plain_lm_data, tmp_path):
    proc = train(data_bin, tmp_path, "--criterion", "skew_kl", "--kd-ratio", "1.0", "--teacher-path", teacher_ckpt,
                 "--lm-data", plain_lm_data, "--lm-batch-size", "2", "--tokens-per-sample", "128",
                 "--student-data-mode", "always", "--gen-max-new-tokens", "6", "--replay-buffer-size", "8",
                 max_update=2)
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "| train_inner |" in ln]
    assert len(lines) == 2
    for line in lines:
        fields = dict(f.strip().split("=", 1) for f in line.split("|")[-1].split(",") if "=" in f)
        assert float(fields["lm_loss"]) > 0 and fields["src_gen"] == "1"
