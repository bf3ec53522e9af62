"""Sampling responses inside the training loop (ImitKD, GKD, DistiLLM, MiniLLM rollouts).

Uses the task's generator (``PrefillGenerator`` for beam 1: one prompt prefill, incremental
decoding, fairseq's top-p and temperature), so training-time generation and evaluation share one
code path.
``MixtureLM`` samples from (1 - a) q_student + a p_teacher per step: MiniLLM's teacher-mixed
sampling (spec section 2), without a patched ``generate``.

Generated responses are turned into training batches with ``join_prompt_response``: the label of
position t is token t + 1 (a proper next-token shift, unlike DistiLLM's sampler, which labels each
position with its own input token; spec section 3 (obs)).
"""
import math
from argparse import Namespace
from typing import List, Optional, Sequence

import torch
from fairseq.models import FairseqIncrementalDecoder, FairseqLanguageModel

from .data.prompt_response_dataset import collate_examples, join_prompt_response, prompt_batch
from .prompt_prefill import decoder_step, supports_prefill


class MixtureDecoder(FairseqIncrementalDecoder):
    """Decoder whose 'logits' are log sum_i w_i softmax(decoder_i): a normalized log-mixture."""

    def __init__(self, dictionary, decoders: Sequence, weights: Sequence[float]):
        super().__init__(dictionary)
        self.members = torch.nn.ModuleList(decoders)
        self.register_buffer("log_w", torch.tensor([math.log(w) if w > 0 else -math.inf for w in weights]))

    def _log_mixture(self, member_logits) -> torch.Tensor:
        parts = [torch.log_softmax(x.float(), dim=-1) + lw for x, lw in zip(member_logits, self.log_w)]
        return torch.logsumexp(torch.stack(parts), dim=0)

    def forward(self, prev_output_tokens, encoder_out=None, incremental_state=None, **kwargs):
        # Each member keys its cache by its own module ids, so one incremental_state dict serves all
        # (and fairseq's reorder_incremental_state_scripting already walks the members' modules).
        logits = [d(prev_output_tokens, incremental_state=incremental_state)[0] for d in self.members]
        return self._log_mixture(logits), {"attn": [None]}

    def supports_prefill(self) -> bool:
        return all(supports_prefill(d) for d in self.members)

    def prefill_step(self, tokens, padding, positions, incremental_state, last_only: bool = True):
        return self._log_mixture([decoder_step(d, tokens, padding, positions, incremental_state, last_only)
                                  for d in self.members])

    def max_positions(self):
        return min(d.max_positions() for d in self.members)


class MixtureLM(FairseqLanguageModel):
    """Language model sampling from the weighted mixture of several LMs with one dictionary."""

    def __init__(self, models: Sequence, weights: Sequence[float]):
        assert len(models) == len(weights) and abs(sum(weights) - 1.0) < 1e-6, "weights must sum to 1"
        super().__init__(MixtureDecoder(models[0].decoder.dictionary, [m.decoder for m in models], weights))


def generation_args(top_p: float = 1.0, temperature: float = 1.0, max_len: int = 512, top_k: int = 0,
                    no_repeat_ngram_size: int = 0, beam: int = 1, sampling: bool = True) -> Namespace:
    """Arguments for ``task.build_generator``; top_k 0 / top_p 1.0 mean 'off' (fairseq uses -1).
    ``max_len``: prompt + response hold at most this many tokens, a sampled EOS included, as Hugging
    Face's ``generate(max_length=...)``; the generator forces EOS at step ``max_len``, a token
    ``generate_responses`` removes."""
    return Namespace(
        beam=beam, sampling=sampling, sampling_topk=top_k if top_k > 0 else -1,
        sampling_topp=top_p if top_p < 1.0 else -1.0, temperature=temperature,
        max_len_a=0, max_len_b=max_len, min_len=1, no_repeat_ngram_size=no_repeat_ngram_size,
        lenpen=1, unkpen=0, match_source_len=False, diverse_beam_groups=-1, diverse_beam_strength=0.5,
        diversity_rate=-1, constraints=None, prefix_allowed_tokens_fn=None, print_alignment=None,
        iter_decode_max_iter=10, iter_decode_eos_penalty=0.0, iter_decode_force_max_iter=False,
        iter_decode_with_beam=1, iter_decode_with_external_reranker=False, retain_iter_history=False,
        retain_dropout=False, score_reference=False, unnormalized=False, no_early_stop=False,
        nbest=1, eos_token=None,
    )


def length_limit(generator, src_len: int) -> Optional[int]:
    """The generator's max_len for prompts ``src_len`` wide: the step at which it forces EOS (fairseq's
    SequenceGenerator and ``PrefillGenerator`` compute it the same way); None for a generator with no
    such limit."""
    positions = getattr(generator, "max_positions", None) or getattr(generator, "max_len", None)
    if positions is None or not hasattr(generator, "max_len_b"):
        return None
    return min(int(getattr(generator, "max_len_a", 0) * src_len + generator.max_len_b), positions - 1)


@torch.no_grad()
def generate_responses(task, model, sample, generator=None, **gen_kwargs) -> List[torch.Tensor]:
    """Sample one response per prompt of ``sample`` (a batch of the task's dataset).

    Returns response token tensors, ending with EOS when the model stopped. fairseq's generators
    force EOS once prompt + response reach their length limit; that token was never sampled, so it
    is removed (a cut response has no EOS, as Hugging Face ``generate(max_length=...)`` gives): it
    would otherwise be scored as a policy action (MiniLLM rollouts) or taught as a stop (SeqKD and
    student-generated data). ``model`` is put in eval mode for sampling (no dropout) and restored.
    """
    was_training = model.training
    model.eval()
    try:
        if generator is None:
            generator = task.build_generator([model], generation_args(**gen_kwargs))
        request = dict(sample)  # inference_step replaces its net_input with the prompts
        hypos = task.inference_step(generator, [model], request)
    finally:
        model.train(was_training)
    prompts = request["net_input"]["src_tokens"]
    limit = length_limit(generator, prompts.size(1))
    eos = task.target_dictionary.eos()
    responses = []
    for n, beams in zip(request["net_input"]["src_lengths"].tolist(), hypos):
        tokens = beams[0]["tokens"]
        forced = limit is not None and tokens.numel() > 0 and int(tokens[-1]) == eos and n + tokens.numel() > limit
        responses.append(tokens[:-1] if forced else tokens)
    return responses


def batch_from_responses(sample, responses: List[torch.Tensor], pad: int, eos: int, max_len: int,
                         ids: Optional[torch.Tensor] = None):
    """A training batch pairing the prompts of ``sample`` with generated ``responses``."""
    prompts, lengths = prompt_batch(sample, pad)
    ids = sample["id"] if ids is None else ids
    examples = [
        join_prompt_response(prompts[i, : int(lengths[i])].cpu(), responses[i].cpu(), pad, eos, max_len, int(ids[i]))
        for i in range(len(responses))
    ]
    return collate_examples(examples, pad)
