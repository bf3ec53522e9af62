"""End-to-end through the real CLIs: preprocess, SFT, KD with every criterion, resume, generate, score."""
import json
import os

import pytest
import torch

from conftest import USER_DIR, cli, run, train

CRITERIONS = ["kd", "reverse_kl", "skew_kl", "skew_reverse_kl", "js", "tvd", "adaptive_kl"]


def test_prepare_writes_pairs_and_report(data_bin):
    report = json.load(open(os.path.join(data_bin, "prepare_report.json")))
    assert report["splits"]["train"]["kept"] == 240
    for split in ("train", "valid", "test"):
        for side in ("src", "tgt"):
            assert os.path.getsize(os.path.join(data_bin, f"{split}.src-tgt.{side}.bin")) > 0
    # one joined dictionary
    assert open(os.path.join(data_bin, "dict.src.txt")).read() == open(os.path.join(data_bin, "dict.tgt.txt")).read()


@pytest.mark.parametrize("criterion", CRITERIONS)
def test_kd_criterion_trains_and_logs_both_terms(criterion, data_bin, teacher_ckpt, tmp_path):
    proc = train(data_bin, tmp_path, "--criterion", criterion, "--teacher-path", teacher_ckpt, max_update=4)
    log = proc.stdout + proc.stderr
    assert "kd_loss=" in log and "nll_loss=" in log
    ckpt = torch.load(tmp_path / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    # the teacher is recorded by path and hash, never stored
    teachers = ckpt["task_state"]["teachers"]
    assert teachers[0]["path"] == os.path.abspath(teacher_ckpt) and len(teachers[0]["sha256"]) == 64
    assert ckpt["criterion"] is None
    assert not any(k.startswith("teacher") for k in ckpt["model"])


def test_resume_continues_from_last_checkpoint(data_bin, teacher_ckpt, tmp_path):
    train(data_bin, tmp_path, "--criterion", "skew_kl", "--teacher-path", teacher_ckpt, max_update=3)
    proc = train(data_bin, tmp_path, "--criterion", "skew_kl", "--teacher-path", teacher_ckpt, max_update=6)
    log = proc.stdout + proc.stderr
    assert "Loaded checkpoint" in log and "@ 3 updates" in log
    ckpt = torch.load(tmp_path / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    assert ckpt["optimizer_history"][-1]["num_updates"] == 6


def test_generate_then_score(data_bin, teacher_ckpt, tmp_path):
    out = tmp_path / "gen"
    run([cli("fairseq-generate"), data_bin, "--user-dir", USER_DIR, "--task", "instruction_distillation",
         "--path", teacher_ckpt, "--gen-subset", "test", "--sampling", "--beam", "1", "--sampling-topk", "-1",
         "--no-repeat-ngram-size", "6", "--max-len-b", "160", "--batch-size", "5", "--seed", "10", "--cpu",
         "--results-path", out])
    text = (out / "generate-test.txt").read_text()
    assert text.count("\nH-") + text.startswith("H-") == 16  # every test prompt, none dropped
    hypotheses = [line.split("\t") for line in text.splitlines() if line.startswith("H-")]
    assert any(h[2].strip() for h in hypotheses)  # --max-len-b counts the prompt (~80 tokens): room is left
    # S- is the prompt, H- only the response
    first_source = text.split("S-")[1].split("\n")[0].split("\t", 1)[1]
    decoded = first_source.replace(" ", "").replace("\u2581", " ")
    assert "Repeat" in decoded or "Reverse" in decoded
    res = tmp_path / "score.json"
    proc = run([cli("distill-score"), data_bin, out / "generate-test.txt", "--json", res])
    result = json.load(open(res))
    assert result["examples"] == 16 and 0.0 <= result["rouge_l"] <= 100.0
    assert "Rouge-L" in proc.stdout
