"""LoRA (Hu et al. 2022): train a low-rank update of chosen weight matrices, freeze everything else.

    W_eff = W + (alpha / r) * B A,     A: [r, in], B: [out, r],  A ~ kaiming-uniform, B = 0

so training starts from the pretrained model exactly. The update is attached as a
``torch.nn.utils.parametrize`` parametrization of ``module.weight``: every reader of ``.weight``
sees W_eff, including code that bypasses ``module.forward`` (fairseq's fused
``F.multi_head_attention_forward`` path, HF ``Conv1D``), and merging is removing the
parametrization with its value kept. (No LoRA dropout: a dropout on the input cannot be written as
a weight.) Only ``lora_A``/``lora_B`` require grad, so fairseq's optimizer, which takes only
parameters with ``requires_grad``, holds and updates nothing else.

Targets are dotted suffixes of module names, with shorthands for the common projections:
q, k, v, o (attention), gate, up, down (MLP). HF GPT-2 fuses q, k, v into ``attn.c_attn``: any of
q/k/v selects the whole fused matrix there.
"""
import math
import re
from typing import Dict, Iterable, List, Optional

import torch
from torch import nn
from torch.nn.utils import parametrize

from .errors import DistillError

ALIASES: Dict[str, List[str]] = {
    "q": ["q_proj", "attn.c_attn"],
    "k": ["k_proj", "attn.c_attn"],
    "v": ["v_proj", "attn.c_attn"],
    "o": ["o_proj", "out_proj", "attn.c_proj"],
    "gate": ["gate_proj"],
    "up": ["up_proj", "fc1", "mlp.c_fc"],
    "down": ["down_proj", "fc2", "mlp.c_proj"],
}


class LoRADelta(nn.Module):
    """Parametrization W -> W + scale * B A for a 2-D weight of shape [m, n]."""

    def __init__(self, shape, rank: int, alpha: float, device=None):
        super().__init__()
        m, n = shape
        self.lora_A = nn.Parameter(torch.empty(rank, n, device=device))
        self.lora_B = nn.Parameter(torch.zeros(m, rank, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scale = alpha / rank

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + (self.lora_B @ self.lora_A).to(weight.dtype) * self.scale


def _patterns(targets: str) -> Dict[str, List[str]]:
    """Each comma-separated target and the module-name suffixes it stands for."""
    return {t: ALIASES.get(t, [t]) for t in (x.strip() for x in targets.split(",")) if t}


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(name == p or name.endswith("." + p) for p in patterns)


def apply_lora(model: nn.Module, rank: int, alpha: float, targets: str) -> List[str]:
    """Freeze ``model`` and give the matching 2-D weights a LoRA update; returns their names."""
    if rank <= 0:
        raise DistillError(f"--lora-rank must be > 0, got {rank}")
    per_target = _patterns(targets)
    patterns = [p for ps in per_target.values() for p in ps]
    chosen = [
        (name, mod) for name, mod in model.named_modules()
        if _matches(name, patterns) and isinstance(getattr(mod, "weight", None), nn.Parameter) and mod.weight.dim() == 2
    ]
    matrices = [name for name, _ in chosen]
    unmatched = [t for t, ps in per_target.items() if not any(_matches(name, ps) for name in matrices)]
    if not chosen or unmatched:  # a typo beside a good target would otherwise be dropped silently
        linear = sorted({n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise DistillError(
            f"--lora-targets {targets!r}: {', '.join(repr(t) for t in unmatched) or 'nothing'} matches no weight "
            "matrix of this model; use q,k,v,o,gate,up,down or one of: " + ", ".join(linear)
        )
    model.requires_grad_(False)
    for _name, mod in chosen:
        w = mod.weight
        delta = LoRADelta(tuple(w.shape), rank, alpha, device=w.device).to(w.dtype)
        parametrize.register_parametrization(mod, "weight", delta)
    for _name, mod in chosen:
        for p in mod.parametrizations.weight[0].parameters():
            p.requires_grad_(True)
    return [name for name, _ in chosen]


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRADelta) for m in model.modules())


def merge_lora(model: nn.Module) -> int:
    """Fold every LoRA update into its weight (W <- W + scale B A) and remove it; returns the count."""
    count = 0
    for mod in list(model.modules()):
        if parametrize.is_parametrized(mod, "weight") and any(
            isinstance(p, LoRADelta) for p in mod.parametrizations.weight
        ):
            parametrize.remove_parametrizations(mod, "weight", leave_parametrized=True)
            count += 1
    return count


def load_base_weights(model: nn.Module, state: dict, strict: bool = True, ignore_missing=(),
                      ignore_unexpected: Optional[re.Pattern] = None):
    """``model.load_state_dict`` for a state dict without LoRA: a weight that carries a LoRA update
    is stored as ``<module>.parametrizations.weight.original`` and its ``lora_A/B`` keep their values.
    Strict about parameters (buffers may be missing), except the keys in ``ignore_missing`` and the
    extra keys ``ignore_unexpected`` (a regex) matches; shapes must fit (one-line error)."""
    own = model.state_dict()
    renamed = {}
    for key, value in state.items():
        alt = key[: -len(".weight")] + ".parametrizations.weight.original" if key.endswith(".weight") else key
        renamed[alt if key not in own and alt in own else key] = value
    unfit = [f"{k} {tuple(v.shape)} where the model has {tuple(own[k].shape)}" for k, v in renamed.items()
             if k in own and torch.is_tensor(v) and v.shape != own[k].shape]
    if unfit:
        raise DistillError(f"weights do not fit the model built from its config: {'; '.join(unfit[:3])}"
                           f"{f' (and {len(unfit) - 3} more)' if len(unfit) > 3 else ''}; config.json and the weights "
                           "disagree")
    missing, unexpected = model.load_state_dict(renamed, strict=False)
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    skip = set(ignore_missing) | {k[: -len(".parametrizations.weight.original")] + ".weight" for k in ignore_missing}
    missing = [k for k in missing if k in params and ".parametrizations.weight.0." not in k and k not in skip]
    if ignore_unexpected is not None:
        unexpected = [k for k in unexpected if not ignore_unexpected.search(k)]
    if strict and (missing or unexpected):
        raise DistillError(f"weights do not fit the model built from its config: missing {missing[:5]}, unexpected "
                           f"{unexpected[:5]}; config.json and the weights disagree")
    return missing, unexpected
