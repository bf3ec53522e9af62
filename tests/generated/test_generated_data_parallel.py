"""2-process CPU data parallelism with student generation: completes and the workers agree on every
decision and on tau (each generates for its own prompts)."""
import os
import socket

from conftest import BIN, TINY_MODEL, TRAIN_COMMON, run


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read(path):
    import json

    with open(path) as f:
        return [json.loads(line) for line in f]


def test_two_workers_agree_on_tau_and_sources(data_bin, teacher_ckpt, tmp_path):
    args = [data_bin, *TRAIN_COMMON, *TINY_MODEL, "--save-dir", tmp_path, "--max-update", "4",
            "--criterion", "skew_kl", "--kd-ratio", "1.0", "--teacher-path", teacher_ckpt,
            "--student-data-mode", "adaptive", "--adaptive-tau-init", "0.6", "--gen-max-new-tokens", "6",
            "--replay-buffer-size", "12", "--validate-interval-updates", "2", "--student-data-trace", tmp_path / "t",
            "--distributed-world-size", "2", "--distributed-init-method", "env://", "--distributed-no-spawn",
            "--distributed-backend", "gloo", "--device-id", "0", "--ddp-backend", "legacy_ddp"]
    cmd = " ".join(f"'{a}'" for a in args)
    proc = run([os.path.join(BIN, "torchrun"), "--no-python", "--nproc_per_node", "2", "--master_port",
                str(free_port()), "bash", "-c",
                f"exec '{os.path.join(BIN, 'fairseq-train')}' {cmd} --distributed-rank $RANK"])
    log = proc.stdout + proc.stderr
    assert "training on 2 devices" in log and "num_updates=4" in log
    a, b = read(f"{tmp_path / 't'}.rank0.jsonl"), read(f"{tmp_path / 't'}.rank1.jsonl")
    keys = ("update", "r", "s", "tau", "source", "event", "dev_loss")
    assert [{k: e.get(k) for k in keys} for e in a] == [{k: e.get(k) for k in keys} for e in b]
    assert sum(e.get("event") == "valid" for e in a) == 2
    steps = [(x, y) for x, y in zip(a, b) if "update" in x]
    assert any(x["source"] != "gt" for x, _ in steps)
    # the checkpoint holds every worker's own buffer (gathered before rank 0 writes), by rank; rank 0's
    # is the checkpoint's own (stored once)
    import torch

    state = torch.load(tmp_path / "checkpoint_last.pt", map_location="cpu", weights_only=False)["task_state"]
    assert state["workers"][0] is None
    saved = [state["student_data"]] + [w["student_data"] for w in state["workers"][1:]]
    assert [w["buffer_rank"] for w in saved] == [0, 1] and all(w["world"] == 2 for w in saved)
    # each worker trains on its own prompts (different batches)
    assert [x["bsz"] for x, _ in steps] != [y["bsz"] for _, y in steps] or any(x["fill"] != y["fill"] for x, y in steps)
