"""Let fairseq's ``--ddp-backend pytorch_ddp`` (its default) run on CPU workers.

fairseq 0.12.3 always builds ``DistributedDataParallel(module, device_ids=[device_id],
output_device=device_id)`` (``models/distributed_fairseq_model.py``). torch only accepts
``device_ids`` for single-device GPU modules; for a CPU module they must be ``None``, so every CPU
run with ``pytorch_ddp`` fails with "DistributedDataParallel device_ids and output_device arguments
only work with single-device/multiple-device GPU modules or CPU modules". The class used there is
replaced by a subclass that drops ``device_ids``/``output_device`` when the module's parameters are
on the CPU and leaves GPU modules untouched. Gradient averaging is torch's own.
"""
from torch.nn.parallel import DistributedDataParallel


class CPUAwareDistributedDataParallel(DistributedDataParallel):
    """``DistributedDataParallel`` that ignores ``device_ids`` for a module living on the CPU."""

    def __init__(self, module, device_ids=None, output_device=None, **kwargs):
        devices = {p.device.type for p in module.parameters()}
        if devices == {"cpu"}:
            device_ids, output_device = None, None
        super().__init__(module, device_ids=device_ids, output_device=output_device, **kwargs)


def apply():
    from fairseq.models import distributed_fairseq_model

    if not issubclass(distributed_fairseq_model.DistributedDataParallel, CPUAwareDistributedDataParallel):
        distributed_fairseq_model.DistributedDataParallel = CPUAwareDistributedDataParallel
