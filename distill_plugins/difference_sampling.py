"""MiniPLM's difference sampling: refine a pre-training corpus offline with a teacher and a small
reference LM (Gu et al. 2025, "MiniPLM: Knowledge Distillation for Pre-Training Language Models",
ICLR; spec ``methods.md`` section 8).

Both models score every document x once, log p(x) = sum_{t >= 1} log p(x_t | x_<t) (its first token
is not scored, as MiniPLM's shifted-label losses do not score it; |x| counts the scored tokens);
the documents with the highest difference score are kept (the top ``keep_fraction``, MiniPLM's
alpha) and the student is pre-trained on them with the plain LM loss, so training costs no teacher
forward.

* ``difference`` (default) r(x) = [log p(x) - log p_ref(x)] / |x|: the per-token log-likelihood
  difference, which is what MiniPLM's code ranks (compute_difference_scores.py: the reference's mean
  per-token loss minus the teacher's). It keeps what the teacher knows and the reference does not.
* ``ratio`` r(x) = log p(x) / log p_ref(x): the formula as the spec (from the README) writes it.
  Both log-likelihoods are negative, so its highest values are documents the teacher finds *harder*
  than the reference does, the opposite of the method's intent (up-sample hard, valuable instances);
  kept for comparison only.

Why not the first token: an HF-backed model (which never sees the BOS column) can only give it
log(1/V), a model trained here predicts it from the preceding EOS, so with one of each its term
would shift every score by a length- and token-dependent amount unrelated to what the teacher knows.

A document (fairseq's LM layout: its tokens end with EOS, and the previous document's EOS precedes
it) is scored as [EOS] + x -> x (the first target unscored) in windows of at most ``window``
input tokens, each window a separate forward (as fairseq's LM training cuts a long document into
blocks); documents shorter
than ``window`` are scored whole. Every window starts with the BOS column of the task's inputs: the
first one's is the preceding EOS; a later one's is an EOS put before its context token (the last
token of the window before), with no label, so an HF-backed model (which skips column 0) reads the
context token as transformers would.
"""
import math
from typing import Callable, List, Optional, Sequence

import torch
from torch import Tensor

from .chunked_divergences import teacher_rows

SCORES = ("difference", "ratio")


def document_windows(tokens: Tensor, eos: int, window: int, pad: int) -> List[tuple]:
    """(inputs, targets) pairs of at most ``window`` tokens (``max(window, 2)``) covering every token
    of ``tokens`` but the first once; ``pad`` marks targets that are not scored: the first token, and
    the later windows' BOS column."""
    full = torch.cat([tokens.new_tensor([eos]), tokens.long()])
    n = len(tokens)
    end = min(window, n)
    first = full[1:end + 1].clone()
    first[0] = pad
    pairs = [(full[:end], first)]
    step = max(window - 1, 1)  # later windows: the BOS column takes one of the ``window`` inputs
    for s in range(end, n, step):
        e = min(s + step, n)
        pairs.append((torch.cat([full.new_tensor([eos]), full[s:e]]), torch.cat([full.new_tensor([pad]), full[s + 1:e + 1]])))
    return pairs


def _batches(lengths: Sequence[int], max_tokens: int):
    """Index lists of windows, longest first, each batch with (size x longest) <= max_tokens."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batch, longest = [], 0
    for i in order:
        if batch and max(longest, lengths[i]) * (len(batch) + 1) > max_tokens:
            yield batch
            batch, longest = [], 0
        batch.append(i)
        longest = max(longest, lengths[i])
    if batch:
        yield batch


def _target_log_probs(source, labels: Tensor, chunk_size: int) -> Tensor:
    """log softmax(rows)[labels] in float32, ``chunk_size`` rows of [N, V] logits at a time."""
    out = []
    for start in range(0, labels.numel(), chunk_size):
        end = min(start + chunk_size, labels.numel())
        rows = teacher_rows(source, start, end).float()
        out.append(rows.gather(-1, labels[start:end, None]).squeeze(-1) - torch.logsumexp(rows, -1))
    return torch.cat(out) if out else labels.new_zeros(0, dtype=torch.float32)


@torch.no_grad()
def document_log_likelihoods(model, documents: Sequence[Tensor], pad: int, eos: int, window: int,
                             max_tokens: int = 8192, chunk_size: int = 1024, device=None,
                             progress: Optional[Callable[[int], None]] = None) -> Tensor:
    """log p(x) of every document (float64, [len(documents)]) under ``model`` (a ``teacher.Teacher``:
    frozen, its own dtype; batches go to ``device``, and its logits are made ``chunk_size`` label
    tokens at a time, so no [tokens, vocab] tensor is larger than a chunk)."""
    if window < 1 or max_tokens < window:
        raise ValueError(f"need 1 <= window <= max_tokens, got window {window}, max_tokens {max_tokens}")
    windows, owner = [], []
    for d, tokens in enumerate(documents):
        for pair in document_windows(tokens, eos, window, pad):
            windows.append(pair)
            owner.append(d)
    totals = torch.zeros(len(documents), dtype=torch.float64)
    for batch in _batches([len(w[0]) for w in windows], max_tokens):
        longest = max(len(windows[i][0]) for i in batch)
        src = torch.full((len(batch), longest), pad, dtype=torch.long)
        tgt = torch.full((len(batch), longest), pad, dtype=torch.long)
        for row, i in enumerate(batch):
            inp, out = windows[i]
            src[row, :len(inp)], tgt[row, :len(out)] = inp, out
        mask = tgt.ne(pad)
        rows_of = torch.tensor([owner[i] for i in batch])[:, None].expand_as(tgt)[mask]
        src, tgt, mask = src.to(device), tgt.to(device), mask.to(device)
        source = model.rows({"src_tokens": src, "src_lengths": mask.sum(1)}, mask, fused=True)
        logp = _target_log_probs(source, tgt[mask], chunk_size)
        totals.index_add_(0, rows_of, logp.double().cpu())
        if progress is not None:
            progress(len(batch))
    return totals


def scored_tokens(lengths: Tensor) -> Tensor:
    """|x| of documents of ``lengths`` tokens: all but the first (``document_windows``)."""
    return (lengths - 1).clamp(min=0)


def difference_scores(teacher_logp: Tensor, reference_logp: Tensor, lengths: Tensor,
                      score: str = "difference") -> Tensor:
    """r per document (float64); ``lengths``: the scored tokens |x| (``scored_tokens``). NaN (both
    models give the document probability 0, or it has no scored token) becomes -inf."""
    t, r = teacher_logp.double(), reference_logp.double()
    if score == "difference":
        out = (t - r) / lengths.double()
    elif score == "ratio":
        out = t / r.clamp(max=-torch.finfo(torch.float64).tiny)  # log p_ref = 0 only for a certain reference
    else:
        raise ValueError(f"unknown score {score!r}; choose from {', '.join(SCORES)}")
    return out.nan_to_num(nan=-math.inf, posinf=math.inf, neginf=-math.inf)


def kept_count(keep_fraction: float, n: int) -> int:
    """floor(keep_fraction * n), exact where the product is an integer up to float rounding
    (0.29 * 100 is 28.999999999999996 in binary floating point: 29 documents, not 28)."""
    x = keep_fraction * n
    return int(round(x)) if abs(x - round(x)) <= 1e-9 * max(1.0, x) else int(math.floor(x))


def select_top(scores: Tensor, keep_fraction: float) -> Tensor:
    """Indices (ascending) of the floor(keep_fraction * N) highest scores; ties keep the earlier document."""
    if not 0.0 < keep_fraction <= 1.0:
        raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
    k = kept_count(keep_fraction, len(scores))
    order = torch.sort(scores, descending=True, stable=True).indices
    return torch.sort(order[:k]).values
