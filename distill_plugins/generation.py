"""Prompt-conditioned generation with fairseq's SequenceGenerator (beam search, --no-prompt-prefill;
beam 1 otherwise uses ``prefill_generator.PrefillGenerator``).

A decoder-only LM is given its prompt as forced prefix tokens (fairseq's ``language_modeling``
does the same), with incremental decoding. One fix: fairseq applies ``--no-repeat-ngram-size``
blocking after forcing the prefix, so a prompt that itself repeats an n-gram gets its forced token
blocked and the row breaks (all -inf). Here blocking applies only to tokens the model chooses; the
prompt still counts as history for later n-grams, as in Hugging Face ``generate``. The blocker
itself is ``ngram_blocking.NGramBlocker``: fairseq's CPU one never blocks anything.
"""
from torch import nn
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


class PromptSequenceGenerator(SequenceGenerator):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
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
