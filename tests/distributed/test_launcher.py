"""distill-launch: the torchrun command it builds, and one-line errors for contradictory input.
(In-process: the real CLI runs in test_data_parallel.py and test_teacher_precision.py.)"""
import shlex

import pytest

from distill_plugins.cli.launch import main
from distill_plugins.errors import DistillError

TRAIN = ["data-bin", "--user-dir", "distill_plugins", "--task", "instruction_distillation"]


def dry_run(capsys, *args):
    assert main([*args, "--dry-run", "--", *TRAIN, "--cpu"]) == 0
    return shlex.split(capsys.readouterr().out)


def value(cmd, flag):
    return cmd[cmd.index(flag) + 1]


def test_dry_run_builds_the_worker_command(capsys):
    cmd = dry_run(capsys, "--nproc-per-node", "2", "--master-port", "29555")
    assert cmd[1:3] == ["-m", "torch.distributed.run"] and value(cmd, "--nproc_per_node") == "2"
    assert value(cmd, "--master_port") == "29555" and value(cmd, "--master_addr") == "127.0.0.1"
    tail = cmd[cmd.index("distill_plugins.cli.distributed_worker") + 1:]
    assert tail[:len(TRAIN)] == TRAIN
    assert value(tail, "--distributed-backend") == "gloo"  # CPU


def test_multi_node_arguments_reach_torchrun(capsys):
    cmd = dry_run(capsys, "--nnodes", "3", "--node-rank", "2", "--master-addr", "10.0.0.1", "--nproc-per-node", "1")
    assert value(cmd, "--nnodes") == "3" and value(cmd, "--node_rank") == "2"
    assert value(cmd, "--master_addr") == "10.0.0.1"


def test_worker_states_rank_world_size_and_device():
    from distill_plugins.cli.distributed_worker import distributed_arguments

    args = distributed_arguments({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4"})
    assert value(args, "--distributed-rank") == "3" and value(args, "--device-id") == "1"
    assert value(args, "--distributed-world-size") == "4" and value(args, "--distributed-init-method") == "env://"
    with pytest.raises(DistillError, match="RANK is not set"):
        distributed_arguments({})


@pytest.mark.parametrize("args, message", [
    (["--nproc-per-node", "2", *TRAIN], "put the fairseq-train arguments after '--'"),
    (["--nproc-per-node", "2", "--", *TRAIN, "--distributed-world-size", "2"], "sets --distributed-world-size itself"),
    (["--nproc-per-node", "2", "--", *TRAIN, "--cpu", "--ddp-backend", "fully_sharded"], "fully_sharded needs CUDA"),
    (["--nproc-per-node", "2", "--", *TRAIN, "--cpu", "--distributed-backend", "nccl"], "nccl needs GPUs"),
    (["--nnodes", "2", "--", *TRAIN], "needs --master-addr"),
    (["--nnodes", "2", "--node-rank", "2", "--master-addr", "h", "--", *TRAIN], "--node-rank must be in [0, 1]"),
    (["--nnodes", "0", "--", *TRAIN], "--nnodes must be >= 1, got 0"),  # was blamed on --node-rank
])
def test_bad_input_is_one_line_error(args, message):
    with pytest.raises(DistillError) as e:
        main(args)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_failed_workers_end_with_one_line_error(data_bin, tmp_path):
    """Through the real CLI: a bad fairseq-train argument stops both workers; each prints its own
    one-line error, and the launch ends with one more (no torchrun traceback) and a non-zero exit."""
    from conftest import TINY_MODEL, TRAIN_COMMON, cli, run
    from dist_helpers import free_port

    proc = run([cli("distill-launch"), "--nproc-per-node", "2", "--master-port", free_port(), "--",
                data_bin, *TRAIN_COMMON, *TINY_MODEL, "--criterion", "kd", "--save-dir", tmp_path / "save",
                "--max-update", "2"], check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("fairseq-distill: error: 2 of 2 workers failed (first: rank"), lines[-3:]
    assert sum("needs a teacher: pass --teacher-path" in line for line in lines) == 2
    assert not (tmp_path / "save").exists() or not list((tmp_path / "save").iterdir())


def test_dual_space_kd_refuses_a_sharded_teacher(data_bin, teacher_ckpt, tmp_path):
    """dskd reads the teacher's hidden states and output layer, which --teacher-sharding fsdp splits
    over the workers: refused in one line on every worker (was a TypeError traceback at the first batch)."""
    from conftest import TINY_MODEL, TRAIN_COMMON, cli, run
    from dist_helpers import free_port

    proc = run([cli("distill-launch"), "--nproc-per-node", "2", "--master-port", free_port(), "--",
                data_bin, *TRAIN_COMMON, *TINY_MODEL, "--criterion", "dskd", "--teacher-path", teacher_ckpt,
                "--teacher-sharding", "fsdp", "--ddp-backend", "no_c10d", "--save-dir", tmp_path / "save",
                "--max-update", "1"], check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("fairseq-distill: error: 2 of 2 workers failed"), lines[-3:]
    assert sum("--teacher-sharding replicated" in line for line in lines) == 2, proc.stderr[-3000:]


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_needs_no_separator(flag, capsys):
    """Before: distill-launch --help asked for the '--' separator instead of printing the help."""
    with pytest.raises(SystemExit) as e:
        main([flag])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: distill-launch [options] -- <fairseq-train arguments>" in out and "--nproc-per-node" in out
