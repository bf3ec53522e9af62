"""distill-launch: run fairseq-train on several processes and nodes with torchrun, correctly.

    distill-launch --nproc-per-node 2 -- data-bin --user-dir distill_plugins --task instruction_distillation ...
    distill-launch --nnodes 2 --node-rank 0 --master-addr node0 --nproc-per-node 8 -- ...   # on node 0
    distill-launch --nnodes 2 --node-rank 1 --master-addr node0 --nproc-per-node 8 -- ...   # on node 1

Everything after ``--`` goes to fairseq-train unchanged. Plain ``torchrun fairseq-train`` does not
work: without ``--distributed-world-size`` it trains N independent copies into one save dir, and
with it fairseq divides by the GPU count (0 on CPU). Each worker started here passes fairseq its
rank, world size and device itself (``env://`` rendezvous, no spawning; see
``distributed_worker.py``). The process-group backend is nccl on GPUs and gloo on CPU
(``--cpu`` or no CUDA). ``--ddp-backend`` is left to the user (fairseq's default ``pytorch_ddp``
also works on CPU with this package); ``fully_sharded`` needs CUDA and fairscale. torchrun runs in
this process; when workers fail, the launch ends with one line that says how many and which rank
first, below the workers' own messages, and exit code 1 (not torchrun's traceback).
"""
import argparse
import shlex
import sys

from ..errors import DistillError

# Flags the launcher derives from torchrun's environment; a user value would contradict it.
LAUNCHER_FLAGS = (
    "--distributed-world-size", "--distributed-rank", "--device-id", "--distributed-init-method",
    "--distributed-no-spawn", "--distributed-port", "--distributed-num-procs",
)


def flag_value(args, flag):
    """Value of ``flag`` in a fairseq argument list (``--x v`` or ``--x=v``), else None."""
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def has_flag(args, flag):
    return any(a == flag or a.startswith(flag + "=") for a in args)


def cuda_device_count():
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def worker_arguments(train_args, gpus_on_node, nproc_per_node):
    """fairseq-train arguments that every worker shares (rank and device are added per worker)."""
    train_args = list(train_args)
    for flag in LAUNCHER_FLAGS:
        if has_flag(train_args, flag):
            raise DistillError(f"distill-launch sets {flag} itself from torchrun; remove it from the fairseq-train arguments")
    on_cpu = has_flag(train_args, "--cpu") or gpus_on_node == 0
    if on_cpu and not has_flag(train_args, "--cpu"):
        train_args.append("--cpu")
    if not on_cpu and nproc_per_node > gpus_on_node:
        raise DistillError(
            f"--nproc-per-node {nproc_per_node} but this node has {gpus_on_node} GPU(s); one process per GPU "
            "(or pass --cpu to train on CPU)"
        )
    backend = flag_value(train_args, "--distributed-backend")
    if backend is None:
        train_args += ["--distributed-backend", "gloo" if on_cpu else "nccl"]
    elif on_cpu and backend == "nccl":
        raise DistillError("--distributed-backend nccl needs GPUs; use gloo on CPU (or leave it out)")
    if flag_value(train_args, "--ddp-backend") == "fully_sharded":
        if on_cpu:
            raise DistillError(
                "--ddp-backend fully_sharded needs CUDA: fairscale's FSDP moves tensors to the GPU even for "
                "CPU models; use pytorch_ddp or legacy_ddp on CPU"
            )
        try:
            import fairscale  # noqa: F401
        except ImportError:
            raise DistillError(
                "--ddp-backend fully_sharded needs fairscale: pip install --no-build-isolation fairscale==0.4.13"
            ) from None
    return train_args


def torchrun_command(opts, train_args):
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        "--nproc_per_node", str(opts.nproc_per_node), "--nnodes", str(opts.nnodes),
        "--node_rank", str(opts.node_rank), "--master_addr", opts.master_addr,
        "--master_port", str(opts.master_port), "--max_restarts", "0",
        "-m", "distill_plugins.cli.distributed_worker", *train_args,
    ]
    return cmd


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    split = argv.index("--") if "--" in argv else len(argv)
    mine, train_args = argv[:split], argv[split + 1:]
    p = argparse.ArgumentParser(prog="distill-launch", description=__doc__.split("\n\n")[0],
                                usage="distill-launch [options] -- <fairseq-train arguments>")
    p.add_argument("--nproc-per-node", type=int, default=None,
                   help="workers on this node (default: its GPU count, 1 on CPU)")
    p.add_argument("--nnodes", type=int, default=1, help="number of nodes")
    p.add_argument("--node-rank", type=int, default=0, help="this node's index, 0..nnodes-1")
    p.add_argument("--master-addr", default=None,
                   help="host name or IP of node 0, reachable from every node (default 127.0.0.1 on one node)")
    p.add_argument("--master-port", type=int, default=29500, help="free TCP port on node 0")
    p.add_argument("--dry-run", action="store_true", help="print the torchrun command instead of running it")
    if split == len(argv) and not {"-h", "--help"} & set(argv):
        raise DistillError("put the fairseq-train arguments after '--', e.g. distill-launch --nproc-per-node 2 -- data-bin ...")
    opts = p.parse_args(mine)  # --help exits here
    if not train_args:
        raise DistillError("no fairseq-train arguments after '--'")
    if opts.nnodes < 1:
        raise DistillError(f"--nnodes must be >= 1, got {opts.nnodes}")
    if not 0 <= opts.node_rank < opts.nnodes:
        raise DistillError(f"--node-rank must be in [0, {opts.nnodes - 1}] for --nnodes {opts.nnodes}, got {opts.node_rank}")
    if opts.master_addr is None:
        if opts.nnodes > 1:
            raise DistillError("--nnodes > 1 needs --master-addr: the address of node 0 that every node can reach")
        opts.master_addr = "127.0.0.1"
    gpus = cuda_device_count()
    if opts.nproc_per_node is None:
        opts.nproc_per_node = gpus or 1
    if opts.nproc_per_node < 1:
        raise DistillError(f"--nproc-per-node must be >= 1, got {opts.nproc_per_node}")
    cmd = torchrun_command(opts, worker_arguments(train_args, gpus, opts.nproc_per_node))
    if opts.dry_run:
        print(shlex.join(cmd))
        return 0
    return run_torchrun(cmd[3:], opts.nnodes * opts.nproc_per_node)


def run_torchrun(torchrun_args, world: int) -> int:
    """torchrun in this process (what ``python -m torch.distributed.run`` does), with a failed worker
    reported in one line after the workers' own messages instead of torchrun's traceback."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    sys.stdout.flush()
    try:
        torchrun.run(torchrun.parse_args(torchrun_args))
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        raise DistillError(f"{len(e.failures)} of {world} workers failed (first: rank {rank}, exit code "
                           f"{failure.exitcode}); the workers' own messages are above") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
