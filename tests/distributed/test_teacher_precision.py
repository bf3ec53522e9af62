"""A bf16 teacher beside an fp32 student, with 2 CPU workers (each loads and casts its own teacher)."""
import pytest
import torch

from dist_helpers import load, train_one, train_two, updates


def test_bf16_teacher_beside_fp32_student(data_bin, teacher_ckpt, tmp_path):
    kd = ["--criterion", "kd", "--teacher-path", teacher_ckpt]
    fp32 = train_one(data_bin, tmp_path / "fp32", *kd, max_update=2)
    bf16 = train_two(data_bin, tmp_path / "bf16", *kd, "--teacher-dtype", "bf16", max_update=2)
    log = bf16.stdout + bf16.stderr
    assert "parameters, bf16" in log
    ref, low = updates(fp32.stdout + fp32.stderr), updates(log)
    assert sorted(low) == [1, 2]
    for step in (1, 2):
        # the CE term does not involve the teacher: identical; the KD term moves by bf16 rounding only
        assert low[step]["nll_loss"] == ref[step]["nll_loss"]
        assert low[step]["kd_loss"] == pytest.approx(ref[step]["kd_loss"], rel=0.02)
        assert low[step]["kd_loss"] != 0
    student = load(tmp_path / "bf16" / "checkpoint_last.pt")["model"]
    assert all(v.dtype == torch.float32 for v in student.values())
