"""distill-prepare's length limits as the references apply them (spec 5): a response cut at
--max-total-tokens has no EOS label, as (prompt + response + [EOS])[:max_length] gives (MiniLLM
lm_datasets.py, DSKD distill_datasets.py; before, the cut response was one token shorter and taught
EOS), and --long-prompts drop drops train/valid rows only: test prompts are cut to their first
tokens, as MiniLLM's evaluation (prompt_datasets.py) does (before, test rows were dropped too)."""
import json
import os

from distill_plugins.cli import prepare
from distill_plugins.tasks.instruction_distillation import InstructionDistillationConfig, InstructionDistillationTask

from conftest import write_jsonl

ROWS = [
    {"instruction": "Repeat: sun", "input": "", "output": "sun"},
    {"instruction": "Repeat the words.", "input": "river " * 80, "output": "river"},  # a prompt over the limit
    {"instruction": "Repeat: apple", "input": "", "output": "apple " * 80},  # a response over the limit
]
MAX_PROMPT, MAX_TOTAL = 64, 80


def prepared(data_bin, tmp_path, long_prompts):
    files = {split: write_jsonl(tmp_path / f"{split}.jsonl", ROWS) for split in ("train", "valid", "test")}
    dest = tmp_path / f"bin-{long_prompts}"
    prepare.main(["--train", files["train"], "--valid", files["valid"], "--test", files["test"], "--destdir",
                  str(dest), "--spm-model", os.path.join(data_bin, "spm.model"), "--max-prompt-tokens",
                  str(MAX_PROMPT), "--max-total-tokens", str(MAX_TOTAL), "--long-prompts", long_prompts])
    return str(dest)


def test_a_cut_response_has_no_eos_label(data_bin, tmp_path):
    data = prepared(data_bin, tmp_path, "truncate")
    task = InstructionDistillationTask.setup_task(InstructionDistillationConfig(data=data))  # tokens-per-sample 512
    task.load_dataset("train")
    ds, eos, pad = task.datasets["train"], task.dictionary.eos(), task.dictionary.pad()
    examples = [ds[i] for i in range(len(ds))]
    short, _long_prompt, long_response = examples
    assert short["target"][-1] == eos and len(short["target"]) < MAX_TOTAL  # an answer that ended
    labels = long_response["target"][long_response["target"].ne(pad)]
    assert len(long_response["source"]) == MAX_TOTAL  # prompt + response fill --max-total-tokens exactly
    assert eos not in labels.tolist()  # and the cut response is not taught to stop
    assert len(labels) == MAX_TOTAL - long_response["prompt_length"]
    report = json.load(open(os.path.join(data, "prepare_report.json")))
    assert report["splits"]["train"]["responses_truncated"] == 1


def test_drop_keeps_every_test_row(data_bin, tmp_path):
    data = prepared(data_bin, tmp_path, "drop")
    splits = json.load(open(os.path.join(data, "prepare_report.json")))["splits"]
    for split in ("train", "valid"):
        assert splits[split]["prompts_dropped"] == 1 and splits[split]["kept"] == 2
    assert splits["test"]["prompts_dropped"] == 0 and splits["test"]["prompts_truncated"] == 1
    assert splits["test"]["kept"] == 3
    assert len(open(os.path.join(data, "test.jsonl")).readlines()) == 3  # scored against every row
