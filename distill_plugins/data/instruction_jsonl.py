"""Instruction data in MiniLLM's jsonl form, and its prompt template (spec section 5 and 9).

Each line is a JSON object with ``instruction``, ``input`` (may be empty or absent), ``output`` (a
string, or a list of reference strings) and optionally ``prompt`` (the already-rendered template,
which then wins over ``instruction``/``input``).
"""
import json
from typing import Dict, List

from ..errors import DistillError, not_utf8

PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


def render_prompt(row: Dict) -> str:
    """The MiniLLM/DistiLLM prompt of a row: its ``prompt`` field, else the Alpaca template."""
    if row.get("prompt"):
        return row["prompt"]
    if row.get("input"):
        return PROMPT_WITH_INPUT.format(instruction=row["instruction"], input=row["input"])
    return PROMPT_NO_INPUT.format(instruction=row["instruction"])


def references(row: Dict) -> List[str]:
    """The row's reference responses as a list (``output`` may be a string or a list)."""
    out = row["output"]
    return [out] if isinstance(out, str) else list(out)


def read_instruction_jsonl(path: str, require_output: bool = True) -> List[Dict]:
    """Read and validate a jsonl file; every problem is a one-line ``DistillError`` naming the line."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DistillError(f"cannot read {path}: {e.strerror}") from None
    lines = []
    for lineno, line in enumerate(raw.splitlines(keepends=True), 1):
        try:
            lines.append(line.decode("utf-8"))
        except UnicodeDecodeError:
            raise not_utf8(f"{path}:{lineno}") from None
    rows = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DistillError(f"{path}:{lineno}: not valid JSON ({e.msg}); each line must be one JSON object") from None
        if not isinstance(row, dict):
            raise DistillError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        if not row.get("prompt") and not isinstance(row.get("instruction"), str):
            raise DistillError(f"{path}:{lineno}: missing field 'instruction' (or a rendered 'prompt')")
        if "input" in row and row["input"] is not None and not isinstance(row["input"], str):
            raise DistillError(f"{path}:{lineno}: field 'input' must be a string")
        if require_output:
            out = row.get("output")
            ok = isinstance(out, str) or (
                isinstance(out, list) and len(out) > 0 and all(isinstance(o, str) for o in out)
            )
            if not ok:
                raise DistillError(
                    f"{path}:{lineno}: missing field 'output' (a string or a non-empty list of strings)"
                )
        rows.append(row)
    if not rows:
        raise DistillError(f"{path}: no examples (the file is empty)")
    return rows
