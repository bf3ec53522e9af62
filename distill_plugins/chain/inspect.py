"""Ask fairseq about a stage before anything trains: does fairseq-train accept its arguments, and
how many parameters does its model have (built on the meta device: no memory, no weights)?"""
import contextlib
import io
import logging
from typing import List

import torch

from ..errors import DistillError


@contextlib.contextmanager
def _quiet():
    logging.disable(logging.INFO)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            yield err
    finally:
        logging.disable(logging.NOTSET)


def count_parameters(stage_name: str, argv: List[str]) -> int:
    """Parameters of the stage's model, from fairseq-train's own parsing of ``argv``."""
    import distill_plugins  # noqa: F401
    from fairseq import options
    from fairseq.models import ARCH_MODEL_REGISTRY
    from fairseq.tasks import TASK_REGISTRY

    with _quiet() as err:
        try:
            args = options.parse_args_and_arch(options.get_training_parser(), input_args=argv)
        except SystemExit:
            lines = [ln for ln in err.getvalue().strip().splitlines() if ln.strip()]
            reason = lines[-1].split("error: ", 1)[-1] if lines else "invalid arguments"
            raise DistillError(f"stage {stage_name!r}: fairseq-train rejects its arguments: {reason}") from None
        # the legacy namespace path: no hydra composition (seconds per stage)
        task = TASK_REGISTRY[args.task].setup_task(args)
        try:
            with torch.device("meta"):
                model = ARCH_MODEL_REGISTRY[args.arch].build_model(args, task)
        except Exception as e:
            raise DistillError(f"stage {stage_name!r}: fairseq cannot build its model ({type(e).__name__}: {e})") from None
    return sum(p.numel() for p in model.parameters())
