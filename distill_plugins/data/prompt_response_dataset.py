"""Prompt and response joined into one decoder-only LM example, trained on the response only.

For prompt tokens p_1..p_P and response tokens r_1..r_R (binarized with a trailing EOS each):

    src_tokens = [EOS, p_1, ..., p_P, r_1, ..., r_R]          (fairseq LMs start with EOS as BOS)
    target     = [pad, ..., pad, r_1, ..., r_R, EOS]          (P pads: the prompt is never a label)

so position P predicts the first response token and the last position predicts EOS, the same
labels as MiniLLM/DistiLLM (spec section 5). An empty response trains only EOS. Sequences longer
than ``max_len`` keep their first ``max_len`` tokens (the prompt was already limited when the data
was prepared).
"""
import numpy as np
import torch
from fairseq.data import FairseqDataset, data_utils


def join_prompt_response(prompt, response, pad: int, eos: int, max_len: int, index: int = 0):
    """One example: ``prompt`` without EOS, ``response`` with its EOS (if it ended)."""
    tokens = torch.cat([prompt, response])[:max_len]
    n_prompt = min(len(prompt), max_len)
    source = torch.cat([tokens.new_tensor([eos]), tokens[:-1]])
    target = tokens.clone()
    target[:n_prompt] = pad
    return {"id": index, "source": source, "target": target, "prompt_length": n_prompt}


def collate_examples(samples, pad: int):
    """Right-padded batch of ``join_prompt_response`` examples, in fairseq's sample format."""
    src = data_utils.collate_tokens([s["source"] for s in samples], pad, left_pad=False)
    tgt = data_utils.collate_tokens([s["target"] for s in samples], pad, left_pad=False)
    return {
        "id": torch.LongTensor([s["id"] for s in samples]),
        "nsentences": len(samples),
        "ntokens": int(tgt.ne(pad).sum()),  # response tokens + EOS: the loss's tokens
        "net_input": {
            "src_tokens": src,
            "src_lengths": torch.LongTensor([len(s["source"]) for s in samples]),
        },
        "target": tgt,
        "prompt_lengths": torch.LongTensor([s["prompt_length"] for s in samples]),
    }


class SizeOrderedDataset(FairseqDataset):
    """Examples of ``self.sizes`` tokens, batched in size order (shuffled first when ``self.shuffle``)."""

    def num_tokens(self, index):
        return int(self.sizes[index])

    def size(self, index):
        return int(self.sizes[index])

    def ordered_indices(self):
        order = np.random.permutation(len(self)) if self.shuffle else np.arange(len(self))
        return order[np.argsort(self.sizes[order], kind="mergesort")]

    @property
    def supports_prefetch(self):
        return False


class PromptResponseDataset(SizeOrderedDataset):
    def __init__(self, prompts, responses, dictionary, max_len: int = 512, shuffle: bool = True):
        assert len(prompts) == len(responses), "prompt and response datasets differ in length"
        self.prompts, self.responses = prompts, responses
        self.dictionary = dictionary
        self.pad, self.eos = dictionary.pad(), dictionary.eos()
        self.max_len = max_len
        self.shuffle = shuffle
        # sizes without the binarized EOS of the prompt: P + R + 1 (response EOS)
        p_sizes = np.asarray(prompts.sizes) - 1
        self.prompt_sizes = np.minimum(p_sizes, max_len)
        self.sizes = np.minimum(p_sizes + np.asarray(responses.sizes), max_len)

    def __len__(self):
        return len(self.prompts)

    def label_counts(self) -> np.ndarray:
        """Each example's response labels within ``max_len`` (0: its prompt fills the window)."""
        return self.sizes - self.prompt_sizes

    def __getitem__(self, index):
        prompt = self.prompts[index][:-1]  # drop the EOS that binarization appended
        response = self.responses[index]  # keeps its EOS
        return join_prompt_response(prompt, response, self.pad, self.eos, self.max_len, index)

    def collater(self, samples):
        if len(samples) == 0:
            return {}
        return collate_examples(samples, self.pad)



def prompt_batch(sample, pad: int):
    """Right-padded prompt tokens [B, P_max] (without the leading EOS) and their lengths."""
    src = sample["net_input"]["src_tokens"]
    lengths = sample["prompt_lengths"].to(src.device)
    width = max(int(lengths.max()), 1)
    prompts = src[:, 1 : 1 + width].clone()
    if prompts.size(1) < width:  # every row is all prompt (cannot happen: a response has an EOS)
        prompts = torch.nn.functional.pad(prompts, (0, width - prompts.size(1)), value=pad)
    positions = torch.arange(width, device=src.device).unsqueeze(0)
    prompts[positions >= lengths.unsqueeze(1)] = pad
    return prompts, lengths
