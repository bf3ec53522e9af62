"""distill-launch: the torchrun command it builds, and one-line errors for contradictory input."""
import shlex

import pytest

from conftest import cli, run

TRAIN = ["data-bin", "--user-dir", "distill_plugins", "--task", "instruction_distillation"]


def launch(*args, check=True):
    return run([cli("distill-launch"), *args], check=check)


def test_dry_run_builds_one_worker_command_per_rank():
    out = launch("--nproc-per-node", "2", "--master-port", "29555", "--dry-run", "--", *TRAIN, "--cpu").stdout
    cmd = shlex.split(out)
    assert cmd[1:4] == ["-m", "torch.distributed.run", "--nproc_per_node"] and cmd[4] == "2"
    assert "-m" in cmd[5:] and "distill_plugins.cli.distributed_worker" in cmd
    tail = cmd[cmd.index("distill_plugins.cli.distributed_worker") + 1:]
    assert tail[:len(TRAIN)] == TRAIN
    assert tail[tail.index("--distributed-backend") + 1] == "gloo"  # CPU
    assert cmd[cmd.index("--master_port") + 1] == "29555" and cmd[cmd.index("--master_addr") + 1] == "127.0.0.1"


def test_multi_node_arguments_reach_torchrun():
    out = launch("--nnodes", "3", "--node-rank", "2", "--master-addr", "10.0.0.1", "--nproc-per-node", "1",
                 "--dry-run", "--", *TRAIN, "--cpu").stdout
    cmd = shlex.split(out)
    assert cmd[cmd.index("--nnodes") + 1] == "3" and cmd[cmd.index("--node_rank") + 1] == "2"
    assert cmd[cmd.index("--master_addr") + 1] == "10.0.0.1"


@pytest.mark.parametrize("args, message", [
    (["--nproc-per-node", "2", *TRAIN], "put the fairseq-train arguments after '--'"),
    (["--nproc-per-node", "2", "--", *TRAIN, "--distributed-world-size", "2"], "sets --distributed-world-size itself"),
    (["--nproc-per-node", "2", "--", *TRAIN, "--cpu", "--ddp-backend", "fully_sharded"], "fully_sharded needs CUDA"),
    (["--nproc-per-node", "2", "--", *TRAIN, "--cpu", "--distributed-backend", "nccl"], "nccl needs GPUs"),
    (["--nnodes", "2", "--", *TRAIN], "needs --master-addr"),
    (["--nnodes", "2", "--node-rank", "2", "--master-addr", "h", "--", *TRAIN], "--node-rank must be in [0, 1]"),
])
def test_bad_input_is_one_line_error(args, message):
    proc = launch(*args, check=False)
    assert proc.returncode == 1
    err = proc.stderr.strip()
    assert message in err and "Traceback" not in err and len(err.splitlines()) == 1
