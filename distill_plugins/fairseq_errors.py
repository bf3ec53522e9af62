"""One-line errors for fairseq's own failures in the documented pipeline.

fairseq ends these with a traceback that does not say what to change. ``install`` (called by
``compat.apply``, so whenever fairseq loads this package with ``--user-dir``) sets a
``sys.excepthook`` that prints ``fairseq-distill: error: ...`` instead for the failures listed in
``RULES``; any other exception keeps its full traceback (a bug should show where it is). The exit
status stays 1.
"""
import re
import sys
from typing import Callable, List, Optional, Tuple


def _state_dict_mismatch(exc: BaseException) -> str:
    first = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line or "Missing key" in line
                  or "Unexpected key" in line), "")
    return (f"the checkpoint's parameters do not fit this model ({first.rstrip('.')}): it was trained on other "
            "data (another dictionary) or is another architecture; pass the data directory and --arch it was "
            "trained with")


RULES: List[Tuple[type, str, Callable[[BaseException], str]]] = [
    (AttributeError, "has no attribute 'xla_device'",
     lambda e: "fairseq-train --bf16 turns on its TPU path and fails without one; use distill-train ... --bf16 "
               "(fairseq-train with that undone; README, mixed precision)"),
    (AssertionError, "Torch not compiled with CUDA enabled",
     lambda e: "this run asks for CUDA (--fp16, or a cuda device) but this torch build has none: drop --fp16 "
               "and pass --cpu (bf16 on CPU: distill-train --bf16)"),
    (Exception, "Cannot load model parameters from checkpoint",
     lambda e: f"{str(e).split(';')[0]}: --save-dir holds a checkpoint of another model; pass a fresh --save-dir "
               "(or --finetune-from-model to start from it)"),
    (AssertionError, "Must specify batch size",
     lambda e: "fairseq-train needs a batch size: pass --max-tokens N (tokens per batch, e.g. 4096) or "
               "--batch-size N (sequences per batch)"),
    (OSError, "Model file not found", lambda e: f"{str(e).strip()}; check --path"),
    (RuntimeError, "Error(s) in loading state_dict", _state_dict_mismatch),
]


def explain(exc: BaseException) -> Optional[str]:
    """The one-line message for a known fairseq failure (or one it caused), else None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        for kind, needle, message in RULES:
            if isinstance(exc, kind) and needle in str(exc):
                return re.sub(r"\s+", " ", message(exc)).strip()
        exc = exc.__cause__ or exc.__context__
    return None


def install() -> None:
    if getattr(sys.excepthook, "_fairseq_distill", False):
        return
    previous = sys.excepthook

    def hook(kind, exc, tb):
        message = explain(exc)
        if message is None:
            return previous(kind, exc, tb)
        sys.stderr.write(f"fairseq-distill: error: {message}\n")
        sys.stderr.flush()

    hook._fairseq_distill = True
    sys.excepthook = hook
