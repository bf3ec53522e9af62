"""Through the real CLIs: distill-prepare with an HF tokenizer, fairseq-train KD with an HF teacher
and an HF student, fairseq-generate, distill-export-hf; LoRA training changes adapters only; --bf16
through distill-train."""
import math
import os
import re

import pytest

pytest.importorskip("transformers", reason="needs the hf extra (transformers)")

import torch  # noqa: E402

import hf_fixtures as F  # noqa: E402
from conftest import TRAIN_COMMON, USER_DIR, cli, run  # noqa: E402


def fairseq_train(data, save_dir, *extra, max_update=2):
    return run([cli("fairseq-train"), data, *TRAIN_COMMON, "--save-dir", save_dir, "--max-update", str(max_update),
                "--arch", "hf_causal_lm", *extra])


def test_kd_hf_teacher_hf_student_train_generate_export(tmp_path):
    from safetensors.torch import load_file

    data = F.prepared("gpt2", cli=True)  # the real distill-prepare CLI
    teacher = F.hf_dir("gpt2")  # runs as native fairseq transformer_lm
    student = F.hf_dir("gpt2", small=True, seed=1)  # run through the HF wrapper
    proc = fairseq_train(data, tmp_path / "ckpt", "--hf-model-dir", student, "--hf-backend", "wrapped",
                         "--criterion", "kd", "--teacher-path", teacher)
    log = proc.stdout + proc.stderr
    assert "kd_loss=" in log and "num_updates=2" in log.replace(" ", "")  # noqa
    ckpt = tmp_path / "ckpt" / "checkpoint_last.pt"
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert state["cfg"]["model"]["hf_config"]  # the checkpoint needs no HF directory to load
    assert state["task_state"]["teachers"][0]["path"] == os.path.abspath(teacher)
    assert not any("teacher" in k for k in state["model"])

    run([cli("distill-export-hf"), ckpt, tmp_path / "hf", "--data", data])
    before, after = load_file(os.path.join(student, "model.safetensors")), load_file(tmp_path / "hf" / "model.safetensors")
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) >= len(before) // 2, changed

    out = tmp_path / "gen"
    run([cli("fairseq-generate"), data, "--user-dir", USER_DIR, "--task", "instruction_distillation", "--path", ckpt,
         "--gen-subset", "test", "--beam", "2", "--max-len-b", "80", "--batch-size", "4", "--cpu",
         "--results-path", out])
    text = (out / "generate-test.txt").read_text()
    assert sum(line.startswith("H-") for line in text.splitlines()) == 6


def test_lora_training_changes_adapters_only(tmp_path):
    data = F.prepared("llama")
    student = F.hf_dir("llama")
    fairseq_train(data, tmp_path / "ckpt", "--hf-model-dir", student, "--criterion", "cross_entropy",
                  "--lora-rank", "4", "--lora-targets", "q,k,v,o,gate,up,down")
    trained = torch.load(tmp_path / "ckpt" / "checkpoint_last.pt", map_location="cpu", weights_only=False)["model"]
    _, fresh, _ = F.build(data, "--arch", "hf_causal_lm", "--hf-model-dir", student, "--lora-rank", "4",
                          "--lora-targets", "q,k,v,o,gate,up,down")
    start = fresh.state_dict()
    assert trained.keys() == start.keys()
    adapters = [k for k in start if k.endswith(("lora_A", "lora_B"))]
    assert len(adapters) == 2 * 2 * 7  # 2 layers x 7 matrices x (A, B)
    for k in start:
        if k not in adapters:
            assert torch.equal(trained[k], start[k]), f"{k} changed"
    assert all(not torch.equal(trained[k], start[k]) for k in adapters if k.endswith("lora_B"))


def test_bf16_kd_training_through_distill_train(tmp_path):
    """--bf16 on CPU through distill-train (fairseq-train's --bf16 would ask for a TPU): an HF LLaMA
    student in bf16 with fp32 master weights, an HF teacher in bf16, the fused KD loss."""
    data, student = F.prepared("llama"), F.hf_dir("llama", small=True, seed=1)
    proc = run([cli("distill-train"), data, *TRAIN_COMMON, "--save-dir", tmp_path, "--max-update", "3",
                "--arch", "hf_causal_lm", "--hf-model-dir", student, "--criterion", "kd",
                "--teacher-path", F.hf_dir("llama"), "--teacher-dtype", "bf16", "--bf16"])
    log = proc.stdout + proc.stderr
    assert "num_updates=3" in log.replace(" ", "") and "using --kd-impl chunked" not in log
    losses = [float(x) for x in re.findall(r"train_inner.* loss=([-\d.e+naif]+)", log)]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses), losses
    state = torch.load(tmp_path / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    assert state["cfg"]["common"]["bf16"] and state["cfg"]["criterion"]["kd_impl"] == "fused"
    assert state["optimizer_history"][-1]["optimizer_name"] == "FP16Optimizer"  # bf16 model, fp32 master
    _, fresh, _ = F.build(data, "--arch", "hf_causal_lm", "--hf-model-dir", student)
    start = fresh.state_dict()
    # every matrix moved; the RMSNorm gains (1.0 at the start) move by less than bf16's step at 1.0
    # (2^-7) in 3 small updates, and the checkpoint holds the bf16 model, as fairseq saves it
    matrices = [k for k, v in start.items() if v.dim() == 2]
    assert len(matrices) == 16 and all(not torch.equal(state["model"][k], start[k]) for k in matrices)
