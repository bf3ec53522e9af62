"""Shard the frozen teacher's parameters across the data-parallel workers (``--teacher-sharding fsdp``).

By default every worker holds a full teacher copy (``replicated``), whatever ``--ddp-backend`` does
with the student. With ``fsdp`` the teacher is wrapped in torch's own fully sharded data parallel
(``torch.distributed.fsdp.fully_shard``, FSDP2; not fairscale, which needs CUDA and has no
inference-only mode): each worker keeps 1/W of every parameter, every repeated block
(``nn.ModuleList`` element, e.g. a decoder layer) is its own unit, all-gathered just before its
forward and freed right after, and the rest (embeddings, output projection, final norm) is one
unit freed after the teacher's forward. Memory per worker: teacher / W + the largest unit
gathered. Works with gloo on CPU and nccl on GPU, beside any student ``--ddp-backend``.

The teacher's forward is then a collective: every worker must call it equally often, as the
token-level KD criterions do (fairseq feeds dummy batches to workers that run out of data).
Criterions whose teacher calls depend on the data (teacher sampling) must keep it replicated.
"""
import logging

import torch
import torch.distributed as dist
from torch import nn

from .errors import DistillError

logger = logging.getLogger(__name__)


def sharding_units(model: nn.Module):
    """The repeated blocks of ``model``: elements of every ``nn.ModuleList`` that own parameters."""
    units = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList):
            units += [m for m in module if any(True for _ in m.parameters())]
    return units


def shard_teacher(model: nn.Module, device: torch.device) -> nn.Module:
    """Shard ``model`` (frozen, in its final dtype) over the default process group, onto ``device``."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        logger.info("--teacher-sharding fsdp with one worker: the teacher stays whole")
        return model.to(device)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        raise DistillError(
            f"--teacher-sharding fsdp needs torch.distributed.fsdp.fully_shard (torch >= 2.6), "
            f"this is torch {torch.__version__}; use --teacher-sharding replicated"
        ) from None
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    units = sharding_units(model)
    for unit in units:  # one block at a time on the device: the full teacher never is
        fully_shard(unit.to(device), mesh=mesh, reshard_after_forward=True)
    for name, p in model.named_parameters():
        if not isinstance(p, torch.distributed.tensor.DTensor):
            p.data = p.data.to(device)
    for b in model.buffers():
        b.data = b.data.to(device)
    fully_shard(model, mesh=mesh, reshard_after_forward=True)
    local = sum(p.to_local().numel() for p in model.parameters())
    total = sum(p.numel() for p in model.parameters())
    logger.info(f"teacher sharded over {dist.get_world_size()} workers ({len(units)} blocks + rest): "
                f"{local:,} of {total:,} parameters on this worker")
    return model


def is_sharded(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(model, FSDPModule)
