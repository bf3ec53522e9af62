"""One fairseq-train worker started by torchrun (through ``distill-launch``).

torchrun exports RANK, LOCAL_RANK and WORLD_SIZE (plus MASTER_ADDR/PORT for the ``env://``
rendezvous). fairseq's own torchrun detection sets ``device_id = rank % cuda.device_count()``,
which divides by zero on CPU and is wrong across nodes with unequal GPU counts, so each worker
states rank, world size and device (its local rank) explicitly and does not spawn further
processes. Then fairseq-train runs as usual.

A worker that finished leaves with ``os._exit(0)`` once the interpreter's exit handlers have run
(they destroy the process group, ``distributed_compat``, flush logs and close files): the C++
static destructors that would run after them still aborted a CPU worker now and then ("terminate
called without an active exception", exit code -6, after "done training"; twice in about two
thousand test runs), failing a finished launch.
"""
import atexit
import os
import sys

from ..errors import DistillError


def distributed_arguments(env):
    try:
        rank, local_rank, world = (int(env[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    except KeyError as e:
        raise DistillError(f"{e.args[0]} is not set: start workers with distill-launch (or torchrun)") from None
    return [
        "--distributed-world-size", str(world), "--distributed-rank", str(rank), "--device-id", str(local_rank),
        "--distributed-init-method", "env://", "--distributed-no-spawn",
    ]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    sys.argv = ["fairseq-train", *argv, *distributed_arguments(os.environ)]
    from fairseq_cli.train import cli_main

    try:
        cli_main()
    except SystemExit as e:
        if not isinstance(e.code, str):
            raise
        # The interpreter would print the message and its newline in two writes, so the workers'
        # lines could interleave on the shared stderr; one write per line keeps them whole.
        sys.stderr.write(e.code + "\n")
        sys.stderr.flush()
        sys.exit(1)
    leave()


def leave():
    """Exit 0 now: run the exit handlers while Python is alive, then skip C++ static destruction."""
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
