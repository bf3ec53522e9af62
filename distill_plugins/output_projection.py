"""The output layer a fused loss can take over: ``logits = hidden @ weight.T``, then fixed columns.

``--kd-impl fused`` (``chunked_divergences.fused_kd_loss``, ``ProjectedLogits``) runs a model with
``features_only=True`` and makes its logits a chunk at a time from ``weight``. That is exact only
when the model's logits are nothing more than that product. A model says so either with a plain
bias-free ``nn.Linear`` as ``decoder.output_projection`` (fairseq's transformer_lm), or with a
``fused_output()`` method on its decoder or its output projection returning a ``FusedOutput``, or
None when it cannot (``models/hf_causal_lm.py``: Hugging Face heads, vocabulary rows no token maps
to). Anything else (adaptive softmax, a bias, unknown layers) is not fusable.
"""
from typing import NamedTuple, Optional

import torch

from .chunked_divergences import FixedColumns


class FusedOutput(NamedTuple):
    weight: torch.Tensor  # [V, d]; a tied embedding table is the same tensor
    fixed: Optional[FixedColumns] = None


def unwrap(model):
    """The model inside DDP/FSDP wrappers (``ModuleProxyWrapper(DistributedDataParallel(m))``)."""
    while isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return model


def fusable_output(model) -> Optional[FusedOutput]:
    """The ``FusedOutput`` of ``model``'s decoder, or None if its logits are more than that."""
    decoder = getattr(unwrap(model), "decoder", None)
    if decoder is None or getattr(decoder, "adaptive_softmax", None) is not None:
        return None
    proj = getattr(decoder, "output_projection", None)
    for owner in (decoder, proj):
        if callable(getattr(owner, "fused_output", None)):
            return owner.fused_output()
    if isinstance(proj, torch.nn.Linear) and proj.bias is None:
        return FusedOutput(proj.weight)
    return None
