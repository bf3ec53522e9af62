"""benchmarks/gpu_checks.sh's own plumbing on the CPU (DEVICE=cpu SMALL=1): a named stage runs and
its figures and complete log are packed; BUDGET_S skips the stages that no longer fit, so a device
call ends within its limit."""
import os
import sys
import tarfile

from conftest import REPO, run

SCRIPT = os.path.join(REPO, "benchmarks", "gpu_checks.sh")


def gpu_checks(tmp_path, **env):
    path = os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]  # python3 = this interpreter
    return run(["bash", SCRIPT], env=dict(PATH=path, DEVICE="cpu", SMALL="1", OUT=str(tmp_path / "out"), **env))


def test_a_named_stage_runs_and_is_packed_with_its_whole_log(tmp_path):
    proc = gpu_checks(tmp_path, STAGES="loss_forward_kl")
    log = open(tmp_path / "out" / "gpu_checks.log").read()
    assert "== loss_forward_kl: exit 0" in log and "== done" in log
    assert "== step" not in log and "== loss_reverse_kl" not in log  # only the named stage
    with tarfile.open(tmp_path / "out" / "gpu_checks.tar.gz") as tar:
        names = set(tar.getnames())
        assert {"gpu_checks/loss_forward_kl.json", "gpu_checks/loss_forward_kl.log"} <= names
        stage_log = tar.extractfile("gpu_checks/loss_forward_kl.log").read().decode()
    assert "| fused |" in stage_log  # the table printed last is in the packed log
    assert proc.returncode == 0


def test_budget_skips_what_does_not_fit(tmp_path):
    gpu_checks(tmp_path, BUDGET_S="1", STAGES="step loss kernels")
    log = open(tmp_path / "out" / "gpu_checks.log").read()
    for stage in ("step", "loss_forward_kl", "loss_reverse_kl", "loss_skew_kl", "kernels", "loss_activation"):
        assert f"== {stage}: skipped" in log
    assert "exit 0 in" not in log and "== done" in log
