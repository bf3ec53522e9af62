"""Sampling and greedy decoding of prompt-conditioned LMs with a one-pass prompt prefill.

fairseq's ``SequenceGenerator`` forces a prompt of n tokens in n decoder calls; here the prompts
are left-padded and the whole batch is encoded in one call (``prompt_prefill.decoder_step``), then
one token per call, and finished rows leave the batch. The per-token decisions are fairseq's own:
log-softmax of logits / temperature, pad never chosen, EOS blocked before ``min_len`` and forced at
``max_len`` (steps counted as fairseq does, over prompt + response) or after ``max_new_tokens``
response tokens (per row: the protocol's response cap), no-repeat n-gram blocking
(``NGramBlocker``, Hugging Face semantics; the prompt counts as history) and ``fairseq.search.Sampling``
(top-k / top-p) or argmax. ``InstructionDistillationTask.build_generator`` picks it for beam 1 and a
single supported model; beam search and ``--no-prompt-prefill`` keep ``PromptSequenceGenerator``.

Hypotheses follow fairseq's format (tokens = prompt + response ending with EOS); the prompt is not
scored (its ``positional_scores`` are 0) and ``score`` is the mean log-probability of the response.
"""
import math
from typing import Dict, List

import torch
from fairseq import search

from .generation import underflow_safe_sampling
from .ngram_blocking import NGramBlocker
from .prompt_prefill import decoder_step, supports_prefill


def prefill_applicable(models, args) -> bool:
    """Whether ``PrefillGenerator`` can serve ``task.build_generator(models, args)``."""
    plain = (getattr(args, "beam", 5) == 1 and getattr(args, "nbest", 1) == 1
             and getattr(args, "constraints", None) is None
             and getattr(args, "prefix_allowed_tokens_fn", None) is None
             and getattr(args, "diverse_beam_groups", -1) <= 0 and getattr(args, "diversity_rate", -1) <= 0
             and not getattr(args, "match_source_len", False) and not getattr(args, "score_reference", False)
             and getattr(args, "lm_path", None) is None)
    return plain and len(models) == 1 and supports_prefill(models[0].decoder)


class PrefillGenerator:
    def __init__(self, model, tgt_dict, args):
        self.model = model
        self.pad, self.eos, self.unk = tgt_dict.pad(), tgt_dict.eos(), tgt_dict.unk()
        self.sampling = bool(getattr(args, "sampling", False))
        self.search = underflow_safe_sampling(
            search.Sampling(tgt_dict, getattr(args, "sampling_topk", -1), getattr(args, "sampling_topp", -1.0)))
        self.temperature = float(getattr(args, "temperature", 1.0))
        assert self.temperature > 0, "--temperature must be greater than 0"
        self.max_len_a = getattr(args, "max_len_a", 0)
        self.max_len_b = getattr(args, "max_len_b", 200)
        self.min_len = getattr(args, "min_len", 1)
        self.unk_penalty = getattr(args, "unkpen", 0)
        ngram = getattr(args, "no_repeat_ngram_size", 0)
        self.blocker = NGramBlocker(ngram) if ngram > 0 else None
        self.max_positions = model.max_decoder_positions()
        self.max_new_tokens = getattr(args, "max_new_tokens", None) or None  # per row; also set by build_generator

    def cuda(self):
        self.model.cuda()
        return self

    @torch.no_grad()
    def generate(self, models, sample, prefix_tokens=None, bos_token=None, **kwargs) -> List[List[Dict]]:
        """One hypothesis per row of ``prefix_tokens`` (right-padded prompts)."""
        assert prefix_tokens is not None, "PrefillGenerator generates continuations of prompts (prefix_tokens)"
        bos = self.eos if bos_token is None else bos_token
        prompts = prefix_tokens
        bsz, src_len = sample["net_input"]["src_tokens"].size()[:2]
        max_len = min(int(self.max_len_a * src_len + self.max_len_b), self.max_positions - 1)
        prompt_lengths = prompts.ne(self.pad).long().sum(1)

        # [B, S]: left-padded [BOS] + prompt; fairseq's step k predicts the token at column k + 1
        lengths = prompt_lengths + 1
        width = int(lengths.max())
        rows = torch.cat([prompts.new_full((bsz, 1), bos), prompts], 1)
        source = torch.arange(width, device=prompts.device).unsqueeze(0) - (width - lengths).unsqueeze(1)
        padding = source < 0
        tokens = rows.gather(1, source.clamp(min=0)).masked_fill(padding, self.pad)
        positions = ((~padding).long().cumsum(1) - 1).clamp(min=0)
        # n-gram history (only with blocking): NGramBlocker reads tokens[:, 1:], and the BOS is no history
        history = tokens.masked_fill(tokens.eq(bos) & (source == 0), self.pad) if self.blocker else None
        if history is not None:
            history = torch.cat([history.new_full((bsz, 1), self.pad), history], 1)

        responses: List[List[int]] = [[] for _ in range(bsz)]
        scores: List[List[float]] = [[] for _ in range(bsz)]
        step = prompt_lengths.clone()  # fairseq's step index of each row's next token
        # EOS is forced at step row_max: max_len, or after max_new_tokens response tokens
        row_max = torch.full_like(step, max_len)
        if self.max_new_tokens:
            row_max = torch.minimum(row_max, prompt_lengths + int(self.max_new_tokens))
        alive = torch.arange(bsz, device=prompts.device)
        done = step > max_len  # prompt already past max_len: nothing to generate (as fairseq)
        state: Dict = {}
        logits = decoder_step(self.model.decoder, tokens, padding, positions, state)[:, -1]
        next_position = positions[:, -1] + 1
        while True:
            if bool(done.any()):
                keep = (~done).nonzero().squeeze(1)
                if keep.numel() == 0:
                    break
                alive, step, logits, padding = alive[keep], step[keep], logits[keep], padding[keep]
                row_max = row_max[keep]
                next_position = next_position[keep]
                history = history[keep] if history is not None else None
                self.model.decoder.reorder_incremental_state_scripting(state, keep)
            token, token_score = self._choose(logits, step, row_max, history)
            for r, t, s in zip(alive.tolist(), token.tolist(), token_score.tolist()):
                responses[r].append(t)
                scores[r].append(s)
            done = token.eq(self.eos) | (step >= row_max)
            step = step + 1
            if bool(done.all()):
                break
            if history is not None:
                history = torch.cat([history, token.unsqueeze(1)], 1)
            padding = torch.cat([padding, padding.new_zeros(padding.size(0), 1)], 1)
            logits = decoder_step(self.model.decoder, token.unsqueeze(1), padding, next_position.unsqueeze(1),
                                  state)[:, -1]
            next_position = next_position + 1
        return [[self._hypothesis(prompts[i, : int(prompt_lengths[i])], responses[i], scores[i])]
                for i in range(bsz)]

    def _choose(self, logits, step, row_max, history):
        lprobs = torch.log_softmax(logits.float() / self.temperature, dim=-1)
        lprobs[lprobs != lprobs] = -math.inf
        lprobs[:, self.pad] = -math.inf
        lprobs[:, self.unk] -= self.unk_penalty
        at_max = step >= row_max
        if bool(at_max.any()):  # fairseq forces EOS at max_len (here also after max_new_tokens)
            eos_lprob = lprobs[at_max, self.eos].clone()
            lprobs[at_max] = -math.inf
            lprobs[at_max, self.eos] = eos_lprob
        lprobs[step < self.min_len, self.eos] = -math.inf
        if self.blocker is not None:
            lprobs = self.blocker(history, lprobs, lprobs.size(0), 1, history.size(1) - 1)
        if self.sampling:
            _, token, _ = self.search.step(0, lprobs.unsqueeze(1).clone(), None)
            token = token.view(-1)
        else:
            token = lprobs.argmax(-1)
        return token, lprobs.gather(1, token.unsqueeze(1)).squeeze(1)

    def _hypothesis(self, prompt, response: List[int], scores: List[float]) -> Dict:
        tokens = torch.cat([prompt, prompt.new_tensor(response)])
        positional = torch.cat([torch.zeros(prompt.numel()), torch.tensor(scores, dtype=torch.float)])
        score = float(sum(scores) / max(len(scores), 1))
        return {"tokens": tokens, "score": torch.tensor(score), "attention": None, "alignment": None,
                "positional_scores": positional.to(prompt.device)}
