"""Read the hypotheses of a ``fairseq-generate`` output file."""
from typing import Dict, List

from ..errors import DistillError, not_utf8


def read_hypotheses(path: str) -> Dict[int, List[str]]:
    """``{sample id: hypothesis tokens}`` from the ``H-<id>\\t<score>\\t<tokens>`` lines (first
    hypothesis per id, i.e. the best of ``--nbest``). A cut-off H- line is an error."""
    hyps: Dict[int, List[str]] = {}
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.startswith("H-"):
                    continue
                fields = line.rstrip("\n").split("\t", 2)
                if not line.endswith("\n") or len(fields) != 3 or not fields[0][2:].isdigit():
                    raise DistillError(f"{path}:{lineno} is not a complete H-<id><tab><score><tab><tokens> line; "
                                       "rerun fairseq-generate to completion")
                hyps.setdefault(int(fields[0][2:]), fields[2].split())
    except OSError as e:
        raise DistillError(f"cannot read generation file {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise not_utf8(f"generation file {path}") from None
    if not hyps:
        raise DistillError(f"{path} has no H- lines; is it fairseq-generate output?")
    return hyps
