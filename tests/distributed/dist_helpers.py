"""Helpers for the multi-process tests: launching, parsing train logs, inspecting checkpoints."""
import os
import random
import re
import socket
import subprocess

import pytest
import torch

from conftest import TINY_MODEL, TRAIN_COMMON, cli, run

# Deterministic and small: no dropout, 4 sentences per micro-batch, a checkpoint after 2 updates.
EXACT = ["--dropout", "0", "--attention-dropout", "0", "--batch-size", "4", "--save-interval-updates", "2"]


def free_port():
    """A free TCP port for a rendezvous, below Linux's ephemeral range (32768-60999): a port the OS
    handed out (bind to 0) can be taken as the local end of another process's outgoing connection
    (gloo's pairs, the other pytest worker's runs) before the rendezvous binds it, which once made a
    2-node run's worker abort in the full suite. Each pytest worker draws from its own 6,000 ports."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    base = 20000 + 6000 * (int(worker[2:]) % 2 if worker[2:].isdigit() else 0)
    rng = random.Random()
    for _ in range(200):
        port = base + rng.randrange(6000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port in the test range")


def train_args(data, save_dir, *extra, max_update=4):
    return [data, *TRAIN_COMMON, *TINY_MODEL, *EXACT, "--save-dir", save_dir, "--max-update", str(max_update), *extra]


def train_one(data, save_dir, *extra, max_update=4):
    """One process; ``--update-freq 2`` makes its update the same global batch as 2 workers."""
    return run([cli("fairseq-train"), *train_args(data, save_dir, "--update-freq", "2", *extra, max_update=max_update)])


def train_two(data, save_dir, *extra, max_update=4):
    """Two CPU workers on one node through distill-launch (torchrun, gloo)."""
    return run([cli("distill-launch"), "--nproc-per-node", "2", "--master-port", free_port(), "--",
                *train_args(data, save_dir, *extra, max_update=max_update)])


def train_two_nodes(data, save_dir, *extra, max_update=4):
    """Two 'nodes' of one CPU worker each, on this machine: node 0 hosts the rendezvous."""
    port = free_port()
    args = train_args(data, save_dir, *extra, max_update=max_update)
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen([cli("distill-launch"), "--nnodes", "2", "--node-rank", str(rank), "--master-addr",
                          "127.0.0.1", "--master-port", str(port), "--nproc-per-node", "1", "--", *args],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        for rank in (0, 1)
    ]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        if p.returncode != 0:
            errors = [line for line in out.splitlines() if "Error" in line or "error:" in line]
            pytest.fail(f"node exited {p.returncode}:\n" + "\n".join(errors[:20]) + "\n...\n" + out[-3000:])
    return outs[0]


def updates(log):
    """{num_updates: {loss, nll_loss, kd_loss, wpb, bsz}} from fairseq's train_inner lines."""
    rows = {}
    for line in log.splitlines():
        if "train_inner" not in line:
            continue
        kv = dict(re.findall(r"(\w+)=([-\d.e+]+)", line))
        rows[int(kv["num_updates"])] = {k: float(kv[k]) for k in ("loss", "nll_loss", "kd_loss", "wpb", "bsz")}
    return rows


def load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def assert_same_parameters(a, b):
    ma, mb = load(a)["model"], load(b)["model"]
    assert ma.keys() == mb.keys()
    for k in ma:
        torch.testing.assert_close(ma[k], mb[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")


def student_parameter_shapes(model_state):
    """Shapes of the student's parameters in order, the tied output projection counted once."""
    shapes, seen = [], set()
    for k, v in model_state.items():
        if k.endswith(".version") or v.data_ptr() in seen:
            continue
        seen.add(v.data_ptr())
        shapes.append(tuple(v.shape))
    return shapes


def assert_teacher_absent(ckpt_path, teacher_path):
    """The checkpoint holds the student only: no criterion state, no teacher weights, and an
    optimizer state of exactly the student's parameters (the teacher is wider: 48 vs 32 dims)."""
    ckpt, teacher = load(ckpt_path), load(teacher_path)["model"]
    assert ckpt["criterion"] is None
    student = ckpt["model"]
    assert not any("teacher" in k for k in student)
    assert teacher["decoder.embed_tokens.weight"].shape[1] != student["decoder.embed_tokens.weight"].shape[1]
    state = ckpt["last_optimizer_state"]["state"]
    assert [tuple(state[i]["exp_avg"].shape) for i in sorted(state)] == student_parameter_shapes(student)
    assert ckpt["task_state"]["teachers"][0]["sha256"]  # recorded by hash, never stored
