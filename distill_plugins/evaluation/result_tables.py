"""Result files of ``distill-evaluate`` / ``distill-score`` as runs, and their markdown tables.

A result holds ``runs``; each run has ``files`` (one entry per evaluation set) with the Rouge-L mean
and standard deviation over seeds and the generation speed. ``distill-score`` output (one split,
no runs) is read as one run with one file, so both can be compared.
"""
import json
from typing import Dict, List, Optional

from ..errors import DistillError


def load_runs(path: str, name: Optional[str] = None) -> List[Dict]:
    """Runs of a result JSON; ``name`` relabels them (``name`` or ``name/run`` for several)."""
    try:
        with open(path, encoding="utf-8") as f:
            result = json.load(f)
    except OSError as e:
        raise DistillError(f"cannot read results {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise DistillError(f"{path} is not a results JSON ({e.msg}); pass files written by distill-evaluate --json") from None
    except UnicodeDecodeError:
        raise DistillError(f"{path} is not a results JSON (not UTF-8 text); pass files written by distill-evaluate "
                           "--json") from None
    if isinstance(result, dict) and isinstance(result.get("runs"), list) and result["runs"]:
        runs = [dict(r) for r in result["runs"]]
    elif isinstance(result, dict) and "rouge_l" in result and "split" in result:  # distill-score
        runs = [{"name": result.get("name") or path, "files": [{
            "name": result["split"], "examples": result.get("examples"), "seeds": result.get("seeds"),
            "rouge_l": result["rouge_l"], "rouge_l_std": result.get("rouge_l_std", 0.0)}]}]
    else:
        raise DistillError(f"{path} has no runs; pass files written by distill-evaluate --json or distill-score --json")
    for run in runs:
        if not isinstance(run.get("files"), list) or not all("rouge_l" in f and "name" in f for f in run["files"]):
            raise DistillError(f"{path}: run {run.get('name')!r} has no per-file Rouge-L")
    if name is not None:
        for run in runs:
            run["name"] = name if len(runs) == 1 else f"{name}/{run['name']}"
    return runs


def _cell(entry: Optional[Dict], best: bool) -> str:
    if entry is None:
        return "-"
    text = f"{entry['rouge_l']:.2f} ± {entry.get('rouge_l_std', 0.0):.2f}"
    return f"**{text}**" if best else text


def eval_set_names(runs: List[Dict]) -> List[str]:
    names: List[str] = []
    for run in runs:
        for f in run["files"]:
            if f["name"] not in names:
                names.append(f["name"])
    return names


def rouge_table(runs: List[Dict]) -> str:
    """Markdown: one row per run, one column per evaluation set, mean ± std (best in bold)."""
    sets = eval_set_names(runs)
    best = {}
    for s in sets:
        scored = [f["rouge_l"] for r in runs for f in r["files"] if f["name"] == s]
        best[s] = max(scored)
    lines = ["| run | " + " | ".join(sets) + " |", "|---|" + "---:|" * len(sets)]
    for run in runs:
        by_set = {f["name"]: f for f in run["files"]}
        cells = [_cell(by_set.get(s), len(runs) > 1 and s in by_set and by_set[s]["rouge_l"] == best[s]) for s in sets]
        lines.append(f"| {run['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def speed_table(runs: List[Dict]) -> str:
    """Markdown: examples, truncated prompts and generation speed per run and evaluation set."""
    lines = ["| run | eval set | examples | seeds | prompts truncated | responses/s | tokens/s |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for run in runs:
        for f in run["files"]:
            def num(key, fmt):
                v = f.get(key)
                return "-" if v is None else format(v, fmt)
            lines.append(f"| {run['name']} | {f['name']} | {num('examples', 'd')} | {num('seeds', 'd')} | "
                         f"{num('prompts_truncated', 'd')} | {num('responses_per_s', '.2f')} | {num('tokens_per_s', '.1f')} |")
    return "\n".join(lines) + "\n"
