"""The task state of the checkpoint that a fairseq-train run resumes from.

fairseq's trainer saves ``task.state_dict()`` in every checkpoint (``task_state``) but does not hand
it back when it restores one (only ``checkpoint_utils.load_model_ensemble`` calls the task's
``load_state_dict``), so our tasks read it at their first ``train_step``.
"""
import os

import torch


def restore_path(cfg) -> str:
    """The checkpoint fairseq-train restores: --restore-file, by default SAVE_DIR/checkpoint_last.pt."""
    restore = getattr(cfg, "restore_file", "checkpoint_last.pt") or "checkpoint_last.pt"
    if restore == "checkpoint_last.pt":
        return os.path.join(cfg.save_dir, restore)
    return restore


def restored_task_state(cfg, update_num: int) -> dict:
    """The ``task_state`` of the restored checkpoint, or {} for a run that starts at update 0."""
    if update_num <= 0 or not getattr(cfg, "save_dir", None):
        return {}
    path = restore_path(cfg)
    if not os.path.isfile(path):
        return {}
    try:
        state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except RuntimeError:  # not a zip checkpoint: mmap unsupported
        state = torch.load(path, map_location="cpu", weights_only=False)
    return dict(state.get("task_state") or {})
