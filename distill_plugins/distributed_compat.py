"""Fixes that fairseq 0.12.3's multi-process training needs on torch 2.13, and one hook.

1. ``--ddp-backend pytorch_ddp`` (fairseq's default) on CPU workers. fairseq always builds
   ``DistributedDataParallel(module, device_ids=[device_id], output_device=device_id)``
   (``models/distributed_fairseq_model.py``); torch accepts ``device_ids`` only for GPU modules,
   so every CPU run failed with "DistributedDataParallel device_ids and output_device arguments
   only work with single-device/multiple-device GPU modules or CPU modules". The class used there
   becomes a subclass that drops ``device_ids``/``output_device`` for a module on the CPU; GPU
   modules are untouched and the gradient averaging is torch's own.

2. Resuming any multi-worker run. Rank 0 loads the checkpoint and sends it to the others
   (``trainer.load_checkpoint`` -> ``distributed_utils.broadcast_object``), which unpickle it with
   ``torch.load``'s default ``weights_only=True`` (torch >= 2.6); the state holds an omegaconf
   ``DictConfig``, so every worker but rank 0 died with "Unsupported global: GLOBAL
   omegaconf.dictconfig.DictConfig". The receiving side now unpickles fully: the bytes are the
   state that rank 0 of the same job has just loaded from the checkpoint it was given.

3. Every worker's own task state in the checkpoint. fairseq writes the checkpoint, and calls
   ``task.state_dict()``, on rank 0 alone, so what each worker keeps for itself (its replay
   buffer, its MiniLLM rollout store) was lost for ranks > 0. fairseq-train calls
   ``checkpoint_utils.save_checkpoint`` on every worker; it now first runs the task's
   ``gather_worker_states()`` (if it has one), a collective that hands rank 0 every worker's state
   for its ``state_dict``. (Not in ``Trainer.consolidate_optimizer``, which also runs on the one
   worker that crashed, before its ``crash.pt``: a collective there would hang the job.) The
   function object keeps fairseq's ``save_checkpoint.best`` (the best validation loss), which
   fairseq reads and writes through the module attribute, so it stays on the wrapper.

4. Workers that end with their process group alive. fairseq-train never destroys the default
   process group, so its gloo/NCCL threads are torn down by C++ static destructors after Python
   has finalized; a CPU worker sometimes died there with "terminate called without an active
   exception" (SIGABRT, exit code -6) after a finished run, failing the launch. The process group
   is now destroyed at interpreter exit (``atexit``), while Python is still alive.
"""
import atexit
import io

import torch
from torch.nn.parallel import DistributedDataParallel


class CPUAwareDistributedDataParallel(DistributedDataParallel):
    """``DistributedDataParallel`` that ignores ``device_ids`` for a module living on the CPU."""

    def __init__(self, module, device_ids=None, output_device=None, **kwargs):
        if {p.device.type for p in module.parameters()} == {"cpu"}:
            device_ids, output_device = None, None
        super().__init__(module, device_ids=device_ids, output_device=output_device, **kwargs)


def receive_trusted_object(send_object):
    """fairseq's ``_broadcast_object_slow`` with the receiving ranks unpickling the whole object."""
    from fairseq.distributed import utils as du

    def broadcast_object_slow(obj, src_rank, group, dist_device):
        if du.get_rank(group) == src_rank:
            return send_object(obj, src_rank, group, dist_device)
        length = torch.LongTensor([0]).to(dist_device)
        du.broadcast(length, src=src_rank, group=group)
        buffer = torch.ByteTensor(int(length.item())).to(dist_device)
        du.broadcast(buffer, src=src_rank, group=group)
        return torch.load(io.BytesIO(buffer.cpu().numpy()), map_location="cpu", weights_only=False)

    broadcast_object_slow._distill_patched = True
    return broadcast_object_slow


def gather_worker_states_first(save_checkpoint):
    """``checkpoint_utils.save_checkpoint`` that first lets the task gather its workers' states."""

    def save(cfg, trainer, epoch_itr, val_loss):
        gather = getattr(trainer.task, "gather_worker_states", None)
        if gather is not None and not cfg.no_save:
            gather()
        return save_checkpoint(cfg, trainer, epoch_itr, val_loss)

    save._distill_gathers_worker_states = True
    return save


def destroy_process_group_at_exit():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def apply():
    from fairseq.distributed import utils as du
    from fairseq.models import distributed_fairseq_model
    from fairseq import checkpoint_utils

    if not getattr(checkpoint_utils.save_checkpoint, "_distill_gathers_worker_states", False):
        checkpoint_utils.save_checkpoint = gather_worker_states_first(checkpoint_utils.save_checkpoint)

    if not issubclass(distributed_fairseq_model.DistributedDataParallel, CPUAwareDistributedDataParallel):
        distributed_fairseq_model.DistributedDataParallel = CPUAwareDistributedDataParallel
    atexit.unregister(destroy_process_group_at_exit)  # once, however often apply() runs
    atexit.register(destroy_process_group_at_exit)
    if not getattr(du._broadcast_object_slow, "_distill_patched", False):
        du._broadcast_object_slow = receive_trusted_object(du._broadcast_object_slow)
