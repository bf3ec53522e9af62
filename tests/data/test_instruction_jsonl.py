"""The prompt templates are MiniLLM's/DistiLLM's (spec 5) to the byte: distill-prepare and
distill-evaluate share render_prompt, so a drift would stay self-consistent and unseen elsewhere."""
from distill_plugins.data.instruction_jsonl import render_prompt

NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
            "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
              "Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
              "### Input:\n{input}\n\n### Response:\n")


def test_templates_match_the_references_exactly():
    assert render_prompt({"instruction": "Name a fruit.", "input": ""}) == NO_INPUT.format(instruction="Name a fruit.")
    assert render_prompt({"instruction": "Summarise.", "input": "A text."}) == WITH_INPUT.format(
        instruction="Summarise.", input="A text.")
