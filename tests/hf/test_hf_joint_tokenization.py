"""distill-prepare tokenises the response jointly with the prompt and splits at the prompt's length
(MiniLLM/DistiLLM process_data_dolly.py; spec 5). With a Metaspace (LLaMA-style) tokenizer the
response tokenised alone would start with a word-start piece that the joint text, where it follows
the prompt's newline, does not have (before: every response was tokenised alone)."""
import json
import os

import pytest

pytest.importorskip("transformers", reason="needs the hf extra (transformers)")

import hf_fixtures as F  # noqa: E402
from distill_plugins.data.instruction_jsonl import references, render_prompt  # noqa: E402
from distill_plugins.tasks.instruction_distillation import (  # noqa: E402
    InstructionDistillationConfig, InstructionDistillationTask)


def test_responses_are_tokenised_with_their_prompt():
    from transformers import AutoTokenizer

    data = F.prepared("llama")
    hf = AutoTokenizer.from_pretrained(F.hf_dir("llama"))
    task = InstructionDistillationTask.setup_task(InstructionDistillationConfig(data=data))
    task.load_dataset("train")
    ds, d = task.datasets["train"], task.dictionary
    rows = [json.loads(line) for line in open(os.path.join(data, "train.jsonl"))]
    differs = 0
    for i, row in enumerate(rows):
        prompt = render_prompt(row)
        p = hf.encode(prompt, add_special_tokens=False)
        joint = hf.encode(prompt + references(row)[0], add_special_tokens=False)[len(p):]
        alone = hf.encode(references(row)[0], add_special_tokens=False)
        differs += joint != alone
        ex = ds[i]
        # the data dictionary's symbols are the HF ids (its EOS row is fairseq's own)
        labels = [int(d[t]) if t != d.eos() else "eos" for t in ex["target"][ex["target"].ne(d.pad())].tolist()]
        want = (joint + ["eos"])[: len(ex["source"]) - ex["prompt_length"]]
        assert labels == want, i
    assert differs > len(rows) // 2  # the case that matters: most responses here start differently alone
