"""Prompt-conditioned generation with fairseq's SequenceGenerator (beam search, --no-prompt-prefill;
beam 1 otherwise uses ``prefill_generator.PrefillGenerator``).

A decoder-only LM is given its prompt as forced prefix tokens (fairseq's ``language_modeling``
does the same), with incremental decoding. One fix: fairseq applies ``--no-repeat-ngram-size``
blocking after forcing the prefix, so a prompt that itself repeats an n-gram gets its forced token
blocked and the row breaks (all -inf). Here blocking applies only to tokens the model chooses; the
prompt still counts as history for later n-grams, as in Hugging Face ``generate``. The blocker
itself is ``ngram_blocking.NGramBlocker``: fairseq's CPU one never blocks anything.

Sampling (``underflow_safe_sampling``, also used by ``PrefillGenerator``): fairseq samples from
``exp(lprobs)``; at the length limit it keeps only EOS's log-probability, and where that is below
about -104 (an unlikely EOS, a low temperature) exp() underflows to 0 in fp32 and
``torch.multinomial`` fails ("invalid multinomial distribution"). Such rows are sampled from their
log-probabilities shifted by the row's maximum, and the shift is added back to the scores: the
same distribution and scores, without the underflow.
"""
import torch
from torch import nn
from fairseq import search
from fairseq.sequence_generator import SequenceGenerator

from .ngram_blocking import NGramBlocker


class _BlockFreeRowsOnly(nn.Module):
    def __init__(self, blocker, forced_rows: dict):
        super().__init__()
        self.blocker = blocker
        self.forced_rows = forced_rows  # step -> bool [bsz * beam], shared with the generator

    def forward(self, tokens, lprobs, bsz: int, beam_size: int, step: int):
        forced = self.forced_rows.get(step)
        if forced is None or not bool(forced.any()):
            return self.blocker(tokens, lprobs, bsz, beam_size, step)
        kept = lprobs[forced].clone()
        lprobs = self.blocker(tokens, lprobs, bsz, beam_size, step)
        lprobs[forced] = kept
        return lprobs


UNDERFLOW_BELOW = -50.0  # a row's largest log-probability; a normalised row's is >= -log(vocab size)


def underflow_safe_sampling(searcher):
    """``searcher`` (a ``fairseq.search.Sampling``; others are returned as they are) with a ``step``
    that samples rows whose every log-probability is below UNDERFLOW_BELOW from the row shifted by
    its maximum, and adds the shift back to the returned scores."""
    if not isinstance(searcher, search.Sampling):
        return searcher
    step = searcher.step

    def safe_step(step_num, lprobs, scores, *args, **kwargs):
        top = lprobs.max(dim=-1, keepdim=True).values
        shift = torch.where(torch.isfinite(top) & (top < UNDERFLOW_BELOW), top, torch.zeros_like(top))
        if not bool(shift.any()):
            return step(step_num, lprobs, scores, *args, **kwargs)
        scores_buf, indices_buf, beams_buf = step(step_num, lprobs - shift, scores, *args, **kwargs)
        return scores_buf + shift.view(scores_buf.shape), indices_buf, beams_buf

    searcher.step = safe_step
    return searcher


class PromptSequenceGenerator(SequenceGenerator):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.search = underflow_safe_sampling(self.search)
        self.forced_rows = {}
        if self.repeat_ngram_blocker is not None:
            # fairseq's own CPU blocker never blocks (ngram_blocking.py): use a correct one
            blocker = NGramBlocker(self.repeat_ngram_blocker.no_repeat_ngram_size)
            self.repeat_ngram_blocker = _BlockFreeRowsOnly(blocker, self.forced_rows)

    def _generate(self, *args, **kwargs):
        self.forced_rows.clear()
        return super()._generate(*args, **kwargs)

    def _prefix_tokens(self, step, lprobs, scores, tokens, prefix_tokens, beam_size):
        toks = prefix_tokens[:, step].unsqueeze(-1).repeat(1, beam_size).view(-1)
        self.forced_rows.clear()
        self.forced_rows[step] = toks.ne(self.pad)
        return super()._prefix_tokens(step, lprobs, scores, tokens, prefix_tokens, beam_size)
