"""Data parallel distillation through the real CLIs on CPU (gloo): 2 workers == 1 process.

fairseq shuffles the epoch's batches identically on every worker and gives worker r batches
r, r+2, r+4, ...; one process with ``--update-freq 2`` takes batches 2k and 2k+1 for update k, so
both see the same global batch at every update. The losses are token means over it (sample_size
summed over workers), so the logged losses and the final parameters must agree.
"""
import os

import pytest

from dist_helpers import (assert_same_parameters, assert_teacher_absent, train_one, train_two, train_two_nodes,
                          updates)

# criterion -> how its 2 workers are launched and synchronised (together: every --ddp-backend on CPU)
CASES = {
    "kd": ("one node, 2 workers", train_two, ["--ddp-backend", "pytorch_ddp"]),
    "skew_kl": ("2 nodes x 1 worker, teacher sharded", train_two_nodes,
                ["--ddp-backend", "no_c10d", "--teacher-sharding", "fsdp"]),
}


@pytest.fixture(scope="module")
def runs(data_bin, teacher_ckpt, tmp_path_factory):
    """For each criterion: a 1-process and a 2-worker run of 4 updates (logs and save dirs)."""
    out = {}
    for criterion, (_, launch, backend) in CASES.items():
        kd = ["--criterion", criterion, "--teacher-path", teacher_ckpt]
        one, two = tmp_path_factory.mktemp(f"{criterion}-1p"), tmp_path_factory.mktemp(f"{criterion}-2p")
        log1 = train_one(data_bin, one, *kd)
        log1 = log1.stdout + log1.stderr
        log2 = launch(data_bin, two, *kd, *backend)
        log2 = log2 if isinstance(log2, str) else log2.stdout + log2.stderr
        out[criterion] = {"one": (one, log1), "two": (two, log2), "kd": kd}
    return out


@pytest.mark.parametrize("criterion", list(CASES))
def test_two_workers_match_one_process(criterion, runs, teacher_ckpt):
    r = runs[criterion]
    (one, log1), (two, log2) = r["one"], r["two"]
    assert "training on 2 devices" in log2
    u1, u2 = updates(log1), updates(log2)
    assert sorted(u1) == sorted(u2) == [1, 2, 3, 4]
    assert u1 == u2  # loss, nll_loss, kd_loss, words and sentences per update
    assert_same_parameters(one / "checkpoint_last.pt", two / "checkpoint_last.pt")
    for save in (one, two):
        assert_teacher_absent(save / "checkpoint_last.pt", teacher_ckpt)


def test_teacher_sharded_over_workers(runs):
    log = runs["skew_kl"]["two"][1]
    assert "teacher sharded over 2 workers" in log


@pytest.mark.parametrize("direction", ["2->1", "1->2"])
def test_resume_with_another_number_of_workers(direction, runs, data_bin, tmp_path, teacher_ckpt):
    """Resume after 2 updates with the other number of workers: the same 4 updates as one run.
    (fairseq alone would restart the data at the wrong place: its position counts one worker's batches.)"""
    r = runs["kd"]
    source = r["two"][0] if direction == "2->1" else r["one"][0]
    restore = ["--restore-file", str(source / "checkpoint_1_2.pt")]
    if direction == "2->1":
        proc = train_one(data_bin, tmp_path, *r["kd"], *restore)
        expected = "2 batches x 2 workers -> 4 x 1"
    else:
        proc = train_two(data_bin, tmp_path, *r["kd"], *restore, "--ddp-backend", "legacy_ddp")
        expected = "4 batches x 1 workers -> 2 x 2"
    log = proc.stdout + proc.stderr
    assert "@ 2 updates" in log and expected in log
    assert updates(log) == {k: v for k, v in updates(r["one"][1]).items() if k > 2}
    assert_same_parameters(tmp_path / "checkpoint_last.pt", r["one"][0] / "checkpoint_last.pt")
    assert_teacher_absent(tmp_path / "checkpoint_last.pt", teacher_ckpt)
    assert os.path.isfile(tmp_path / "checkpoint_last.pt")
