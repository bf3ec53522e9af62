"""Dual-space KD (DSKD, Zhang et al. 2024; spec section 1d): each model's hidden states projected into
the other's representation space and read out by the other's output layer.

* ``DualSpaceProjectors``: the trainable projections, held by the criterion (so fairseq's optimizer
  and checkpoints take them; the frozen teacher is never part of it): ``t2s`` d_t -> d_s, ``s2t``
  d_s -> d_t and, with cross-model attention, ``query`` 2 d_s -> 2 d_t.
* ``readout``: logits ``hidden @ weight.T`` of an output layer (its fixed columns set).
* ``cross_model_attention``: DSKD-CMA's soft alignment of two tokenizations of one sequence:
  softmax over the other model's non-padding positions of scaled dot products.
* ``sequence_std``: the scale DSKD-CMA divides the teacher's embeddings and hidden states by.
* ``token_embeddings``: a model's input embedding table (its output projection when it has none).
* ``chunked_rows``: a row-local function over chunks of rows, each recomputed in the backward pass.
"""
import math
from typing import Callable, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .chunked_divergences import FixedColumns
from .output_projection import unwrap

MASKED_SCORE = -1e5  # DSKD's attention mask value


class DualSpaceProjectors(nn.Module):
    def __init__(self, student_dim: int, teacher_dim: int, cross_attention: bool = False):
        super().__init__()
        self.t2s = nn.Linear(teacher_dim, student_dim)
        self.s2t = nn.Linear(student_dim, teacher_dim)
        self.query = nn.Linear(2 * student_dim, 2 * teacher_dim) if cross_attention else None


def readout(hidden: Tensor, weight: Tensor, fixed: Optional[FixedColumns] = None) -> Tensor:
    """Logits of ``hidden`` [..., d] through an output layer ``weight`` [V, d], in float32."""
    logits = hidden.float() @ weight.float().t()
    return fixed.apply_(logits) if fixed is not None else logits


def cross_model_attention(query: Tensor, key: Tensor, key_mask: Tensor) -> Tensor:
    """Attention weights [B, Tq, Tk] = softmax_k(query . key / sqrt(d)), with every position where
    ``key_mask`` [B, Tk] is False scored -1e5 (so it gets no weight)."""
    scores = query.float() @ key.float().transpose(1, 2) / math.sqrt(query.size(-1))
    scores = scores.masked_fill(~key_mask.unsqueeze(1), MASKED_SCORE)
    return torch.softmax(scores, dim=-1)


def sequence_std(x: Tensor, valid: Tensor) -> Tensor:
    """Standard deviation of each sequence's entries ``x`` [B, T, d] over its positions where ``valid``
    [B, T] (unbiased), shaped [B, 1, 1]. DSKD divides by the std of the whole padded batch tensor;
    per sequence, the scale no longer depends on what else is in the batch or on the padding."""
    m = valid.unsqueeze(-1).to(x.dtype)
    n = (m.sum(dim=(1, 2)) * x.size(-1)).clamp_min(2)
    mean = (x * m).sum(dim=(1, 2)) / n
    var = (((x - mean.view(-1, 1, 1)) * m) ** 2).sum(dim=(1, 2)) / (n - 1)
    std = var.sqrt()
    # a sequence with no valid position (or constant entries) keeps its scale: 0 / 0 would put NaN
    # into rows that no loss reads but whose NaN * 0 still reaches the gradient
    return torch.where(std > 0, std, torch.ones_like(std)).view(-1, 1, 1)


def token_embeddings(model) -> Tensor:
    """The input embedding table [V, d] of a fairseq decoder (``decoder.embed_tokens``), else the
    weight of its output projection (tied in GPT-2)."""
    from .output_projection import fusable_output

    embed = getattr(getattr(unwrap(model), "decoder", None), "embed_tokens", None)
    if isinstance(embed, nn.Embedding):
        return embed.weight
    out = fusable_output(model)
    if out is None:
        raise ValueError(f"{type(unwrap(model)).__name__} has neither decoder.embed_tokens nor a plain output layer")
    return out.weight


def next_tokens(src_tokens: Tensor, target: Tensor, pad: int) -> Tensor:
    """The token each position predicts, at every position (prompt included): the label where there
    is one, else the next input token; padding after the end."""
    shifted = torch.cat([src_tokens[:, 1:], src_tokens.new_full((src_tokens.size(0), 1), pad)], dim=1)
    return torch.where(target.ne(pad), target, shifted)


def chunked_rows(fn: Callable[..., Tuple[Tensor, Tensor]], rows: Sequence[Tensor],
                 chunk_size: Optional[int]) -> Tuple[Tensor, Tensor]:
    """(sum of ``fn``'s first output, concatenation of its second) over chunks of ``chunk_size`` rows
    of every tensor in ``rows`` (all [N, ...]). ``fn`` must be row-local and deterministic. Each chunk
    runs under ``torch.utils.checkpoint``: only its inputs are kept, its vocabulary-sized intermediates
    are freed and recomputed in the backward pass. ``chunk_size`` None: one call on all rows, nothing
    recomputed (the plain form)."""
    n = rows[0].size(0)
    if chunk_size is None or n <= chunk_size:
        return fn(*rows)
    grad = torch.is_grad_enabled()
    sums, outs = None, []
    for start in range(0, n, chunk_size):
        part = [r[start:start + chunk_size] for r in rows]
        s, o = checkpoint(fn, *part, use_reentrant=False) if grad else fn(*part)
        sums = s if sums is None else sums + s
        outs.append(o)
    return sums, torch.cat(outs)
