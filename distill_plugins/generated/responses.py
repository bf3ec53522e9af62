"""Sample responses for a batch's prompts and turn them into correctly labelled training examples.

Generation is ``sampling.generate_responses`` (the task's generator: one prompt prefill,
incremental decoding, top-p and temperature), with a budget of
``max_new_tokens`` per row like Hugging Face's ``max_new_tokens``: the batch decodes up to the
longest prompt + budget (and at most ``max_total`` tokens, a row of --tokens-per-sample), then each
response is cut to ``max_new_tokens`` tokens (a response that stopped in time keeps its EOS; a cut
one has none, as in DistiLLM/MiniLLM).

Labels come from ``join_prompt_response``: src = [EOS] + prompt + response[:-1], target = pads over
the prompt then the response, so the label of position t is token t + 1 (DistiLLM's sampler labels
each position with its own token, spec section 3 (obs); that is not copied).
"""
from typing import Dict, List

import torch

from ..data.prompt_response_dataset import join_prompt_response, prompt_batch
from ..sampling import generate_responses


def sample_responses(task, model, sample, max_new_tokens: int, top_p: float = 1.0, temperature: float = 1.0,
                     max_total: int = 512) -> List[torch.Tensor]:
    """One sampled response per prompt of ``sample``, at most ``max_new_tokens`` tokens each."""
    longest_prompt = int(sample["prompt_lengths"].max())
    budget = min(longest_prompt + max_new_tokens, max_total)  # prompt + response (a sampled EOS included)
    responses = generate_responses(task, model, sample, top_p=top_p, temperature=temperature, max_len=budget)
    return [r[:max_new_tokens] for r in responses]


def examples_from_responses(sample, responses: List[torch.Tensor], pad: int, eos: int, max_len: int) -> List[Dict]:
    """``join_prompt_response`` examples pairing each prompt of ``sample`` with its response."""
    prompts, lengths = prompt_batch(sample, pad)
    return [
        join_prompt_response(prompts[i, : int(lengths[i])].cpu(), responses[i].cpu(), pad, eos, max_len,
                             int(sample["id"][i]))
        for i in range(len(responses))
    ]
