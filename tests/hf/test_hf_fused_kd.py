"""--kd-impl fused on Hugging Face students and teachers: the same loss and gradients as plain.

The fused loss takes ``lm_head``'s weight (tied or not) and the final hidden states, and sets the
logit of vocabulary rows no HF token maps to, as the model's own output does."""
import pytest

pytest.importorskip("transformers", reason="needs the hf extra (transformers)")

import torch  # noqa: E402

import hf_fixtures as F  # noqa: E402
from distill_plugins.output_projection import fusable_output  # noqa: E402

# (family, extra flags, criterion): every wrapped family, GPT-2 on both backends
CASES = [("gpt2", [], "kd"), ("gpt2", ["--hf-backend", "wrapped"], "kd"), ("opt", [], "kd"), ("llama", [], "kd"),
         ("llama", [], "skew_reverse_kl"), ("mistral", [], "kd"), ("qwen2", [], "kd")]
IDS = ["gpt2-native", "gpt2-wrapped", "opt", "llama", "llama-skew_reverse_kl", "mistral", "qwen2"]


def loss_and_grads(criterion, model, sample, impl):
    criterion.cfg.kd_impl = impl
    model.zero_grad()
    loss, _, log = criterion(model, sample)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: float(log[k]) for k in ("loss", "nll_loss", "kd_loss")}, grads


@pytest.mark.parametrize("family,extra,criterion_name", CASES, ids=IDS)
def test_fused_equals_plain(family, extra, criterion_name):
    task, model, cfg = F.build(F.prepared(family), "--arch", "hf_causal_lm",
                               "--hf-model-dir", F.hf_dir(family, small=True, seed=1), *extra,
                               "--criterion", criterion_name, "--teacher-path", F.hf_dir(family),
                               "--kd-chunk-size", "7", "--temperature", "2")
    criterion = task.build_criterion(cfg.criterion)
    model.eval()  # no dropout: the two runs must see the same network (gradients still flow)
    sample = F.batch(task, split="train", n=6)
    mask = sample["target"].ne(task.dictionary.pad())
    # both sides really fuse (and mask the absent rows where the dictionary has some)
    student_out, teacher = fusable_output(model), task.teacher
    assert student_out is not None and teacher.projected_logits(sample["net_input"], mask) is not None
    assert (student_out.fixed is not None) == bool(model.hf_vocab.absent_rows())
    tied = model.hf_config.tie_word_embeddings if family != "gpt2" else True
    assert tied == (family != "llama")  # the fixtures cover tied and untied heads

    plain, g_plain = loss_and_grads(criterion, model, sample, "plain")
    fused, g_fused = loss_and_grads(criterion, model, sample, "fused")
    for k in plain:
        assert fused[k] == pytest.approx(plain[k], rel=1e-5), k
    assert g_plain.keys() == g_fused.keys() and len(g_plain) == len(list(model.parameters()))
    for n in g_plain:
        torch.testing.assert_close(g_fused[n], g_plain[n], rtol=1e-4, atol=1e-6, msg=lambda m: f"{n}: {m}")
