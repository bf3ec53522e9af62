"""--ddp-backend fully_sharded (fairscale FSDP) with a KD criterion, where it can run.

It cannot run on CPU: fairscale's FSDP checks its process group by moving a tensor to CUDA
(``validate_process_group``), so torch without CUDA fails with "Torch not compiled with CUDA
enabled" whatever the model's device. Where CUDA or fairscale is missing the test is SKIPPED
with that reason. One worker per GPU (at most 2 here). fairseq's default checkpoint save fails
under FSDP with fairscale 0.4.13 (``gather_full_optim_state_dict``: 'FlatParameter' object has no
attribute '_full_param_padded'), so the run saves with ``--use-sharded-state``.
"""
import glob

import pytest
import torch

from conftest import TINY_MODEL, TRAIN_COMMON, cli, run
from dist_helpers import EXACT, free_port, load, updates


def fully_sharded_unavailable():
    if not torch.cuda.is_available():
        return ("--ddp-backend fully_sharded needs CUDA: fairscale's FSDP moves a tensor to the GPU to "
                "validate its process group, which fails on a CPU-only torch")
    try:
        import fairscale  # noqa: F401
    except ImportError:
        return "fairscale is not installed (optional): pip install fairscale==0.4.13"
    return None


def gpu_args(data, save_dir, *extra, max_update):
    common = [a for a in TRAIN_COMMON if a != "--cpu"]
    return [data, *common, *TINY_MODEL, *EXACT, "--save-dir", save_dir, "--max-update", str(max_update), *extra]


UNAVAILABLE = fully_sharded_unavailable()
pytestmark = pytest.mark.skipif(UNAVAILABLE is not None, reason=UNAVAILABLE or "")


def test_fully_sharded_student_with_kd(data_bin, teacher_ckpt, tmp_path):
    n = min(torch.cuda.device_count(), 2)
    kd = ["--criterion", "kd", "--teacher-path", teacher_ckpt]
    launch = [cli("distill-launch"), "--nproc-per-node", str(n), "--master-port", str(free_port()), "--"]
    # reference: the same global batch on one GPU without sharding
    ref = run([cli("fairseq-train"), *gpu_args(data_bin, tmp_path / "ref", *kd, "--update-freq", str(n),
                                                max_update=4)])
    sharded = tmp_path / "fsdp"
    fsdp = ["--ddp-backend", "fully_sharded", "--use-sharded-state"]
    proc = run([*launch, *gpu_args(data_bin, sharded, *kd, *fsdp, max_update=4)])
    log = proc.stdout + proc.stderr
    expected, got = updates(ref.stdout + ref.stderr), updates(log)
    assert sorted(got) == [1, 2, 3, 4]
    for step in got:
        assert got[step]["loss"] == pytest.approx(expected[step]["loss"], abs=2e-3)
    shards = sorted(glob.glob(str(sharded / "checkpoint_last-shard*.pt")))
    assert len(shards) == n
    for path in shards:  # the teacher is never part of the sharded student or its optimizer state
        ckpt = load(path)
        assert ckpt["criterion"] is None
        assert not any("teacher" in k for k in ckpt["model"])
    # resume with the same number of workers (sharded state needs it)
    proc = run([*launch, *gpu_args(data_bin, sharded, *kd, *fsdp, max_update=6)])
    log = proc.stdout + proc.stderr
    assert "@ 4 updates" in log and sorted(updates(log)) == [5, 6]
    assert load(shards[0])["optimizer_history"][-1]["num_updates"] == 6
