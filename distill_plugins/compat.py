"""Workarounds that fairseq 0.12.3 needs on numpy 2 and torch >= 2.6 (see README, "Why ve-fairseq").

- numpy 2 removed ``np.compat``; fairseq's LM datasets still read ``np.compat.long``.
- fairseq-generate's BLEU scorer segfaults on empty hypotheses (patched below).
- torch >= 2.6 loads checkpoints with ``weights_only=True``; legacy fairseq checkpoints pickle an
  ``argparse.Namespace``, which must be allow-listed.
- multi-worker runs: ``pytorch_ddp`` on CPU and resuming with several workers (``distributed_compat.py``).
- --bf16/--fp16 checkpoints lack the fp32 master weights, so a resume rounds them (``master_weights.py``).
- fairseq's ``gelu_accurate`` (GPT-2's tanh GELU, every ``kd_gpt2_*`` model and converted GPT-2)
  is eight elementwise kernels, and a graph break under ``torch.compile``; it becomes torch's one
  fused op (``_fuse_gelu_accurate``).
- fairseq-train without ``--arch`` ends in a bare ``RuntimeError()``; it becomes a one-line error
  that names the architectures this package registers (``_explain_missing_arch``).
- fairseq's decoder self-attention passes an explicit future mask (no FlashAttention) and, with
  padding, a dense [batch x heads, T, T] mask; it goes through ``is_causal`` (``causal_attention.py``).
- fairseq's own failures in the documented pipeline (--bf16 without a TPU, CUDA asked for on a CPU
  build, a checkpoint of another model) end in one-line errors (``fairseq_errors.py``).
"""
import argparse
import types

import numpy as np
import torch


def apply():
    try:
        np.compat.long  # noqa: B018
    except AttributeError:
        np.compat = types.SimpleNamespace(long=int)
    if hasattr(torch.serialization, "add_safe_globals"):
        torch.serialization.add_safe_globals([argparse.Namespace])
    _patch_bleu_empty_sequences()
    _explain_missing_arch()
    _fuse_gelu_accurate()
    from . import causal_attention, distributed_compat, fairseq_errors, master_weights

    fairseq_errors.install()
    causal_attention.apply()
    distributed_compat.apply()
    master_weights.apply()


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), GPT-2's GELU (Hendrycks and Gimpel 2016), in
    one kernel (fp32 inside for half-precision inputs)."""
    return torch.nn.functional.gelu(x, approximate="tanh")


def _fuse_gelu_accurate():
    """fairseq's ``gelu_accurate`` computes the same function as 8 separate elementwise ops (each
    reading and writing a [tokens, 4 d] tensor, and saving them for backward), and its
    ``setattr`` on first call breaks ``torch.compile``'s graph in every layer. Models take the
    function from ``fairseq.modules`` when they are built (``utils.get_activation_fn``), which
    happens after this runs. Same values to fp32 rounding (tests/test_compat.py)."""
    from fairseq import modules
    from fairseq.modules import gelu as gelu_module

    if modules.gelu_accurate is gelu_tanh:
        return
    gelu_module.gelu_accurate = modules.gelu_accurate = gelu_tanh


def _explain_missing_arch():
    """``options.parse_args_and_arch`` raises ``RuntimeError()``, with no message, when a training
    parser gets no ``--arch`` (an unknown one is refused by argparse's choices already)."""
    from fairseq import options

    original = options.parse_args_and_arch
    if getattr(original, "_distill_patched", False):
        return

    def parse_args_and_arch(parser, input_args=None, *args, **kwargs):
        try:
            return original(parser, input_args, *args, **kwargs)
        except RuntimeError as e:
            if e.args or getattr(parser.parse_known_args(input_args)[0], "arch", "") is not None:
                raise
            from fairseq.models import ARCH_CONFIG_REGISTRY, ARCH_MODEL_REGISTRY

            from .errors import DistillError

            ours = [a for a, f in ARCH_CONFIG_REGISTRY.items()  # kd_gpt2_* configure a fairseq model
                    if __package__ in (f.__module__.split(".")[0], ARCH_MODEL_REGISTRY[a].__module__.split(".")[0])]
            raise DistillError(f"no --arch given; choose a model architecture, e.g. one of this package's: "
                               f"{', '.join(ours)}") from None

    parse_args_and_arch._distill_patched = True
    options.parse_args_and_arch = parse_args_and_arch


def _patch_bleu_empty_sequences():
    """fairseq-generate's default BLEU scorer (C libbleu) segfaults when a hypothesis or reference
    is empty after stripping EOS/pad, which a model that answers with EOS at once produces.
    Such pairs are counted in Python exactly as the C code means to (lengths and n-gram counts,
    no matches); all others go to the C code unchanged."""
    try:
        from fairseq.scoring import bleu
    except ImportError:
        return
    original = bleu.Scorer.add
    if getattr(original, "_distill_patched", False):
        return

    def add(self, ref, pred):
        def content(t):
            t = t.contiguous().view(-1)
            return int((t.ne(self.pad) & t.ne(self.eos)).sum())

        n_ref, n_pred = content(ref), content(pred)
        if n_ref > 0 and n_pred > 0:
            return original(self, ref, pred)
        self.stat.reflen += n_ref
        self.stat.predlen += n_pred
        for n in range(1, 5):
            setattr(self.stat, f"count{n}", getattr(self.stat, f"count{n}") + max(0, n_pred - n + 1))

    add._distill_patched = True
    bleu.Scorer.add = add
    brevity = bleu.Scorer.brevity
    bleu.Scorer.brevity = lambda self: 0.0 if self.stat.predlen == 0 else brevity(self)
