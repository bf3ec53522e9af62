"""No-repeat n-gram blocking with Hugging Face ``generate`` semantics, which fairseq 0.12.3 lacks on CPU.

fairseq's ``NGramRepeatBlock`` CPU path compares the last n-1 entries of the whole token buffer
(padding beyond the current step) instead of the last n-1 generated tokens, so it never blocks
anything (fairseq issues #4709, #5206); its CUDA kernel needs an extension the wheels do not ship.

Here, at each step, the history is ``tokens[:, 1 : step + 1]`` (prompt and response so far, without
the leading EOS that fairseq uses as BOS, as Hugging Face sees a GPT-2 input): every token that
would complete an n-gram already present in the history gets log-probability -inf.
"""
import math

from torch import nn


class NGramBlocker(nn.Module):
    def __init__(self, ngram_size: int):
        super().__init__()
        assert ngram_size > 0
        self.n = ngram_size

    def forward(self, tokens, lprobs, bsz: int, beam_size: int, step: int):
        n = self.n
        history = tokens[:, 1 : step + 1]
        if history.size(1) < n:  # no complete n-gram in the history yet
            return lprobs
        windows = history.unfold(1, n, 1)  # [rows, L - n + 1, n]: every n-gram of the history
        prefix = history[:, history.size(1) - (n - 1):]  # the last n - 1 tokens (none for n = 1)
        match = (windows[:, :, : n - 1] == prefix.unsqueeze(1)).all(-1)  # all() of nothing is True
        rows, cols = match.nonzero(as_tuple=True)
        if rows.numel():
            lprobs[rows, windows[rows, cols, n - 1]] = -math.inf
        return lprobs
