"""The fp32 master weights of a --bf16/--fp16 run in its checkpoints, so that a resume continues exactly.

fairseq's ``FP16Optimizer`` trains a half-precision model with an fp32 copy of every parameter (the
master weights: the optimizer updates them and rounds them into the model). fairseq 0.12.3's
checkpoint holds the half-precision model and the optimizer's moments but not the master weights;
on a resume they are rebuilt from the rounded model, so every parameter loses its low 16 bits and
the resumed run drifts from the uninterrupted one (updates smaller than half a bf16 step of a weight
are lost for good). fairseq saves its EMA's fp32 copy the same way (``extra_state["ema_fp32_params"]``).

Here every checkpoint that fairseq-train writes gets ``extra_state["fp32_master_params"]`` (the
optimizer's fp32 tensors, in its order), and fairseq-train's resume copies them back into the
optimizer, after checking that they are the loaded model's weights before rounding (so a checkpoint
whose model was changed afterwards, or another model, keeps fairseq's behaviour, with a warning).
The checkpoint's ``model`` stays the half-precision model that fairseq-generate and export load.
Two wrappers (``apply``, from ``compat.apply``): of ``checkpoint_utils.save_checkpoint`` and
``checkpoint_utils.load_checkpoint``, which fairseq-train calls on every worker.
"""
import contextlib
import logging

import torch

logger = logging.getLogger(__name__)

KEY = "fp32_master_params"


def _masters_and_models(trainer):
    """(fp32 master tensors, the same values in the model's precision) of a trainer whose optimizer
    keeps master weights, else None. Flat masters (fairseq's --fp16 on one GPU) are paired with
    the model's parameters flattened in the same order."""
    opt = getattr(trainer, "_optimizer", None)  # not trainer.optimizer: that would build one
    fp32 = getattr(opt, "fp32_params", None)
    params = getattr(opt, "fp16_params", None)
    if fp32 is None or params is None:
        return None
    if isinstance(fp32, dict):  # flat: one tensor per device
        if len(fp32) != 1:
            return None  # pipeline parallel: not handled
        (flat,) = fp32.values()
        return [flat.data], lambda: [torch.cat([p.data.reshape(-1) for p in params])]
    return [p.data for p in fp32], lambda: [p.data for p in params]


@contextlib.contextmanager
def masters_in_state_dict(trainer):
    """While writing a checkpoint, ``trainer.state_dict()`` also returns the master weights (not with
    ``--no-save-optimizer-state``: such a checkpoint cannot resume exactly anyway, and the masters
    would add 4 bytes a parameter to it)."""
    pair = _masters_and_models(trainer)
    cfg = getattr(trainer, "cfg", None)
    if pair is None or getattr(getattr(cfg, "checkpoint", None), "no_save_optimizer_state", False):
        yield
        return
    masters, _ = pair
    original = trainer.state_dict

    def state_dict():
        state = original()
        state.setdefault("extra_state", {})[KEY] = [m.detach().to("cpu", copy=True) for m in masters]
        return state

    own = "state_dict" in vars(trainer)  # an instance attribute already (not Trainer's method)
    trainer.state_dict = state_dict
    try:
        yield
    finally:
        if own:
            trainer.state_dict = original
        else:
            del trainer.state_dict  # Trainer's method shows through again


def restore(trainer, extra_state) -> bool:
    """Copy a checkpoint's master weights into the trainer's optimizer; True if done."""
    saved = (extra_state or {}).get(KEY)
    pair = _masters_and_models(trainer)
    if saved is None or pair is None:
        return False
    masters, model_values = pair
    shapes_match = len(saved) == len(masters) and all(s.shape == m.shape for s, m in zip(saved, masters))
    if not shapes_match or not all(
        torch.equal(s.to(device=v.device, dtype=v.dtype), v) for s, v in zip(saved, model_values())
    ):
        logger.warning("the checkpoint's fp32 master weights are not its model's weights (another model, or "
                       "changed since it was saved); the master weights are rebuilt from the model, as fairseq does")
        return False
    for s, m in zip(saved, masters):
        m.copy_(s.to(m.device))
    logger.info(f"restored the fp32 master weights of {sum(m.numel() for m in masters):,} parameters")
    return True


def saving_masters(save_checkpoint):
    """``checkpoint_utils.save_checkpoint`` whose checkpoints hold the master weights."""

    def save(cfg, trainer, epoch_itr, val_loss):
        with masters_in_state_dict(trainer):
            return save_checkpoint(cfg, trainer, epoch_itr, val_loss)

    save._distill_saves_masters = True
    return save


def restoring_masters(load_checkpoint):
    """``checkpoint_utils.load_checkpoint`` that puts the saved master weights back."""

    def load(cfg, trainer, **passthrough_args):
        extra_state, epoch_itr = load_checkpoint(cfg, trainer, **passthrough_args)
        if extra_state and KEY in extra_state:
            trainer.optimizer  # noqa: B018  built now (from the loaded model) if the load did not
            restore(trainer, extra_state)
            del extra_state[KEY]  # fairseq-train keeps extra_state for the whole run
        return extra_state, epoch_itr

    load._distill_restores_masters = True
    return load


def apply():
    from fairseq import checkpoint_utils

    if not getattr(checkpoint_utils.save_checkpoint, "_distill_saves_masters", False):
        checkpoint_utils.save_checkpoint = saving_masters(checkpoint_utils.save_checkpoint)
    if not getattr(checkpoint_utils.load_checkpoint, "_distill_restores_masters", False):
        checkpoint_utils.load_checkpoint = restoring_masters(checkpoint_utils.load_checkpoint)
