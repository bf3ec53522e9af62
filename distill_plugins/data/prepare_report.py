"""``prepare_report.json``: what distill-prepare made a data directory with (tokenizer, length limits,
long-prompt mode, per-split counts). Written by ``cli/prepare.py``; read by the task (examples are cut
to its ``max_total_tokens``) and by distill-seqkd (the new data-bin is prepared with the same limits)."""
import json
import os
from typing import Optional

REPORT = "prepare_report.json"


def read_prepare_report(data: str) -> Optional[dict]:
    """The report of data directory ``data``, or None if it has none (not made by distill-prepare)."""
    path = os.path.join(data, REPORT)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)
