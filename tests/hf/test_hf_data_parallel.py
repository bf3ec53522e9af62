"""Data parallel KD of a wrapped HF LLaMA student with an HF teacher, through distill-launch on CPU
(gloo): 2 workers give the same updates as 1 process with --update-freq 2 (tests/distributed's
argument), and a 2-worker checkpoint resumes in 1 process to the same end."""
import os
import sys

import pytest

pytest.importorskip("transformers", reason="needs the hf extra (transformers)")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "distributed"))

import hf_fixtures as F  # noqa: E402
from conftest import TRAIN_COMMON, cli, run  # noqa: E402
from dist_helpers import assert_same_parameters, free_port, load, updates  # noqa: E402


def args(save_dir, *extra):
    data = F.prepared("llama")
    return [data, *TRAIN_COMMON, "--batch-size", "4", "--save-interval-updates", "2", "--max-update", "4",
            "--save-dir", save_dir, "--arch", "hf_causal_lm", "--hf-model-dir", F.hf_dir("llama", small=True, seed=1),
            "--criterion", "kd", "--teacher-path", F.hf_dir("llama"), *extra]


def one(save_dir, *extra):
    proc = run([cli("fairseq-train"), *args(save_dir, "--update-freq", "2", *extra)])
    return proc.stdout + proc.stderr


def two(save_dir, *extra):
    proc = run([cli("distill-launch"), "--nproc-per-node", "2", "--master-port", free_port(), "--",
                *args(save_dir, "--ddp-backend", "pytorch_ddp", *extra)])
    return proc.stdout + proc.stderr


def test_two_workers_match_one_process_and_resume(tmp_path):
    log1, log2 = one(tmp_path / "1p"), two(tmp_path / "2p")
    assert "training on 2 devices" in log2 and "using --kd-impl chunked" not in log2  # fused under DDP
    u1, u2 = updates(log1), updates(log2)
    assert sorted(u1) == [1, 2, 3, 4] and u1 == u2  # loss, nll_loss, kd_loss, wpb, bsz per update
    assert_same_parameters(tmp_path / "1p" / "checkpoint_last.pt", tmp_path / "2p" / "checkpoint_last.pt")
    state = load(tmp_path / "2p" / "checkpoint_last.pt")
    assert state["cfg"]["model"]["hf_config"] and not any("teacher" in k for k in state["model"])

    # resume the 2-worker run after 2 updates in 1 process: the same last 2 updates and parameters
    log = one(tmp_path / "resumed", "--restore-file", str(tmp_path / "2p" / "checkpoint_1_2.pt"))
    assert "@ 2 updates" in log
    assert updates(log) == {k: v for k, v in u1.items() if k > 2}
    assert_same_parameters(tmp_path / "resumed" / "checkpoint_last.pt", tmp_path / "1p" / "checkpoint_last.pt")
