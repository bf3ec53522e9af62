"""The task state of the checkpoint that a fairseq-train run resumes from.

fairseq's trainer saves ``task.state_dict()`` in every checkpoint (``task_state``) but does not hand
it back when it restores one (only ``checkpoint_utils.load_model_ensemble`` calls the task's
``load_state_dict``), so our tasks read it at their first ``train_step``: from the file fairseq
restores (``restore_path``, the rules of ``checkpoint_utils.load_checkpoint``), read where fairseq
reads it: by rank 0 and sent to the other workers, or by every worker when fairseq loads on every
rank (``--load-checkpoint-on-all-dp-ranks``, sharded FSDP state), so that all workers restore the
same state even when only rank 0 sees the checkpoint.
"""
import os

import torch

from .data.sharded_order import rank_and_world


def _sharded_state(cfg) -> bool:
    return getattr(cfg, "ddp_backend", None) == "fully_sharded" and bool(getattr(cfg, "use_sharded_state", False))


def restore_path(cfg, rank: int = 0) -> str:
    """The checkpoint fairseq-train restores on worker ``rank``: SAVE_DIR/checkpoint_last{suffix}.pt
    (on a first launch --continue-once, if given), or --restore-file with the suffix. The suffix is
    --checkpoint-suffix, plus ``-shard{rank}`` for sharded FSDP state (``Trainer.checkpoint_suffix``)."""
    suffix = getattr(cfg, "checkpoint_suffix", "") or ""
    if _sharded_state(cfg):
        suffix += f"-shard{rank}"
    restore = getattr(cfg, "restore_file", "checkpoint_last.pt") or "checkpoint_last.pt"
    if restore == "checkpoint_last.pt":
        path = os.path.join(cfg.save_dir, f"checkpoint_last{suffix}.pt")
        continue_once = getattr(cfg, "continue_once", None)
        return continue_once if continue_once and not os.path.exists(path) else path
    return restore.replace(".pt", suffix + ".pt")


def _read_task_state(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    try:
        state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except RuntimeError:  # not a zip checkpoint: mmap unsupported
        state = torch.load(path, map_location="cpu", weights_only=False)
    return dict(state.get("task_state") or {})


def restored_task_state(cfg, update_num: int) -> dict:
    """The ``task_state`` of the restored checkpoint, or {} for a run that starts at update 0."""
    if update_num <= 0 or not getattr(cfg, "save_dir", None):
        return {}
    rank, world = rank_and_world()
    every_rank = bool(getattr(cfg, "load_checkpoint_on_all_dp_ranks", False)) or _sharded_state(cfg)
    if world == 1 or every_rank:
        return _read_task_state(restore_path(cfg, rank))
    from fairseq.distributed import utils as distributed_utils

    state = _read_task_state(restore_path(cfg)) if rank == 0 else None
    return distributed_utils.broadcast_object(state, src_rank=0,
                                              group=distributed_utils.get_data_parallel_group())
