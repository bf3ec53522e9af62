"""Read the hypotheses of a ``fairseq-generate`` output file."""
from typing import Dict, List

from ..errors import DistillError


def read_hypotheses(path: str) -> Dict[int, List[str]]:
    """``{sample id: hypothesis tokens}`` from the ``H-<id>\\t<score>\\t<tokens>`` lines (first
    hypothesis per id, i.e. the best of ``--nbest``)."""
    hyps: Dict[int, List[str]] = {}
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if not line.startswith("H-"):
                    continue
                head, _score, *rest = line.rstrip("\n").split("\t")
                idx = int(head[2:])
                if idx not in hyps:
                    hyps[idx] = rest[0].split() if rest else []
    except OSError as e:
        raise DistillError(f"cannot read generation file {path}: {e.strerror}") from None
    if not hyps:
        raise DistillError(f"{path} has no H- lines; is it fairseq-generate output?")
    return hyps
