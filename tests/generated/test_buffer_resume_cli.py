"""A resumed fairseq-train run (checkpoint_last.pt) continues with the same replay buffer: on one
worker it makes the same decisions, trains on the same batches and ends with the same buffer as
an uninterrupted run; every replayed or generated batch keeps to --max-tokens."""
import json

import torch

from conftest import train

MAX_TOKENS = 256


def steps(prefix):
    with open(f"{prefix}.rank0.jsonl") as f:
        return [e for e in map(json.loads, f) if "update" in e]


def buffer_state(save_dir):
    return torch.load(save_dir / "checkpoint_last.pt", map_location="cpu", weights_only=False)[
        "task_state"]["student_data"]["buffer"]


def test_resume_continues_with_the_same_buffer(data_bin, teacher_ckpt, tmp_path):
    # ImitKD: every update generates, pushes and trains on a random buffer batch, so the buffer's
    # contents and sampling state decide every batch after the resume
    args = ["--criterion", "kd", "--kd-ratio", "1.0", "--teacher-path", teacher_ckpt, "--student-data-mode",
            "always", "--gen-max-new-tokens", "6", "--replay-buffer-size", "6", "--max-tokens", str(MAX_TOKENS),
            "--disable-validation"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    train(data_bin, whole, *args, "--student-data-trace", whole / "t", max_update=6)
    train(data_bin, split, *args, "--student-data-trace", split / "t", max_update=3)
    saved = buffer_state(split)
    first = steps(split / "t")
    assert len(saved["ids"]) == first[-1]["fill"] == 6  # full (oldest evicted) after 3 updates, then saved
    proc = train(data_bin, split, *args, "--student-data-trace", split / "t", max_update=6)
    assert "replay buffer restored with 6 sequences" in proc.stdout + proc.stderr

    a, b = steps(whole / "t"), steps(split / "t")
    assert [e["update"] for e in a] == [e["update"] for e in b] == list(range(6))
    keys = ("source", "fill", "bsz", "ids", "width")
    assert [{k: e[k] for k in keys} for e in a] == [{k: e[k] for k in keys} for e in b]
    end_a, end_b = buffer_state(whole), buffer_state(split)
    for k in ("tokens", "lengths", "ids", "prompt_lengths"):
        assert torch.equal(end_a[k], end_b[k]), k
    assert all(e["bsz"] * e["width"] <= MAX_TOKENS for e in a)  # replayed batches keep to the budget


def test_resume_with_a_checkpoint_suffix_restores_the_buffer(data_bin, teacher_ckpt, tmp_path):
    # fairseq resumes from checkpoint_last_s.pt; the task state must come from that file too
    args = ["--criterion", "kd", "--kd-ratio", "1.0", "--teacher-path", teacher_ckpt, "--student-data-mode",
            "always", "--gen-max-new-tokens", "6", "--replay-buffer-size", "6", "--max-tokens", str(MAX_TOKENS),
            "--disable-validation", "--checkpoint-suffix", "_s"]
    train(data_bin, tmp_path, *args, max_update=2)
    assert (tmp_path / "checkpoint_last_s.pt").is_file() and not (tmp_path / "checkpoint_last.pt").exists()
    proc = train(data_bin, tmp_path, *args, max_update=3)
    log = proc.stdout + proc.stderr
    assert "Loaded checkpoint" in log and "replay buffer restored with 6 sequences" in log
