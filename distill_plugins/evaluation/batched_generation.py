"""Batched prompt -> response generation for evaluation, through the task's own generator.

Prompts are tokenized with the data directory's tokenizer and cut to their first
``max_prompt_tokens`` tokens (DistiLLM's evaluation, spec section 5). They go through the task's
dataset and batching (``PromptResponseDataset`` with an empty response, length-sorted batches), then
``task.inference_step``: for beam 1 ``PrefillGenerator`` (all prompts in one left-padded pass, then
incremental decoding), for beam search fairseq's SequenceGenerator (prompt forced token by token);
only the response tokens are returned.
"""
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from fairseq import utils
from fairseq.data import ListDataset

from ..data.instruction_jsonl import render_prompt
from ..data.prompt_response_dataset import PromptResponseDataset


def encode_prompts(rows, tokenizer, dictionary, max_prompt_tokens: int) -> Tuple[List[torch.Tensor], int]:
    """Token ids of each row's rendered prompt, cut to ``max_prompt_tokens``; and how many were cut."""
    prompts, truncated = [], 0
    for row in rows:
        pieces = tokenizer.encode(render_prompt(row))
        if len(pieces) > max_prompt_tokens:
            pieces = pieces[:max_prompt_tokens]
            truncated += 1
        prompts.append(dictionary.encode_line(" ".join(pieces), add_if_not_exist=False, append_eos=False).long())
    return prompts, truncated


def prompt_dataset(prompts: List[torch.Tensor], dictionary) -> PromptResponseDataset:
    """The task's dataset over prompts with empty responses (no shuffling: deterministic batches)."""
    eos = torch.LongTensor([dictionary.eos()])
    with_eos = [torch.cat([p, eos]) for p in prompts]  # the dataset drops the binarized prompt EOS
    sizes = [len(p) for p in with_eos]
    longest = max(sizes) + 1
    return PromptResponseDataset(
        ListDataset(with_eos, sizes), ListDataset([eos.clone() for _ in prompts], [1] * len(prompts)),
        dictionary, max_len=longest, shuffle=False,
    )


@dataclass
class GenerationRun:
    """Responses of one pass over a dataset: ``{row index: response token ids}`` and its speed."""
    responses: Dict[int, torch.Tensor] = field(default_factory=dict)
    seconds: float = 0.0
    generated_tokens: int = 0  # response tokens + EOS, as sampled

    @property
    def responses_per_s(self) -> float:
        return len(self.responses) / self.seconds if self.seconds > 0 else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds > 0 else 0.0


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def generate_dataset(task, model, generator, dataset, seed: int, batch_size: int,
                     max_tokens: Optional[int] = None, progress=None) -> GenerationRun:
    """Sample one response per prompt, with the torch RNG seeded by ``seed`` first."""
    device = next(model.parameters()).device
    batches = task.get_batch_iterator(
        dataset, max_tokens=max_tokens, max_sentences=batch_size, seed=seed,
    ).next_epoch_itr(shuffle=False)
    run = GenerationRun()
    utils.set_torch_seed(seed)
    for sample in batches:
        if not sample:
            continue
        if device.type == "cuda":
            sample = utils.move_to_cuda(sample, device=device)
        _sync(device)
        start = time.perf_counter()
        hypos = task.inference_step(generator, [model], sample)
        _sync(device)
        run.seconds += time.perf_counter() - start
        for idx, beams in zip(sample["id"].tolist(), hypos):
            tokens = beams[0]["tokens"].cpu()
            run.responses[idx] = tokens
            run.generated_tokens += len(tokens)
        if progress is not None:
            progress.update(len(hypos))
    return run
