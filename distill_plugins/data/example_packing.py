"""Prompt + response examples packed into flat tensors for a checkpoint (replay buffer, rollout store).

A ``join_prompt_response`` example (source = [EOS] + x[:-1], target = pads over the prompt P + x[P:])
is stored once as x' = source + target[-1:] (its L + 1 tokens) with its id and P; ``unpack_examples``
rebuilds source = x'[:-1], target = x'[1:] with the first P labels padded. Per-token float fields
(one value per label, e.g. a rollout's log q_old) are concatenated in float32. Plain tensors, ints
and lists only, so that fairseq's ``weights_only`` checkpoint loading accepts them; tokens are int32,
not int16: resuming on several workers, fairseq broadcasts the checkpoint's tensors from rank 0, and
neither gloo nor NCCL broadcasts int16 ("Invalid scalar type"). About (L + 1) * 4 bytes a sequence.
"""
from typing import Dict, List, Sequence

import torch


def pack_examples(examples: Sequence[Dict], pad: int, float_fields: Sequence[str] = ()) -> dict:
    seqs = [torch.cat([ex["source"], ex["target"][-1:]]) for ex in examples]
    flat = torch.cat(seqs) if seqs else torch.zeros(0, dtype=torch.long)
    state = {
        "tokens": flat.to(torch.int32),
        "lengths": torch.tensor([len(s) for s in seqs], dtype=torch.long),
        "ids": torch.tensor([int(ex["id"]) for ex in examples], dtype=torch.long),
        "prompt_lengths": torch.tensor([int(ex["prompt_length"]) for ex in examples], dtype=torch.long),
        "pad": int(pad),
    }
    for name in float_fields:
        values = [ex[name].float() for ex in examples]
        state[name] = torch.cat(values) if values else torch.zeros(0)
        state[name + "_lengths"] = torch.tensor([len(v) for v in values], dtype=torch.long)
    return state


def unpack_examples(state: dict, float_fields: Sequence[str] = ()) -> List[Dict]:
    pad = int(state["pad"])
    flat = state["tokens"].long()
    out = []
    for seq, i, n_prompt in zip(torch.split(flat, state["lengths"].tolist()), state["ids"].tolist(),
                                state["prompt_lengths"].tolist()):
        target = seq[1:].clone()
        target[:n_prompt] = pad
        out.append({"id": i, "source": seq[:-1].clone(), "target": target, "prompt_length": n_prompt})
    for name in float_fields:
        for ex, values in zip(out, torch.split(state[name], state[name + "_lengths"].tolist())):
            ex[name] = values.clone()
    return out
