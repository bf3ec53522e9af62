"""Scoring generated responses against instruction-data references (spec section 5).

Shared by ``distill-score``, ``distill-evaluate`` and ``--eval-rouge`` validation, so every number
comes from one code path: token pieces are decoded with the data directory's tokenizer, cut at the
first end-of-text marker and stripped (``clean_response``), then scored with ``rouge_l``: the
maximum Rouge-L F-measure x 100 over the row's references, averaged over examples. Over seeds we
report the mean and the population standard deviation (``numpy.std``, as ABKD's tables).
"""
import os
import statistics
from typing import Dict, List, Sequence, Tuple

from ..data.instruction_jsonl import references
from ..errors import DistillError
from .fairseq_output import read_hypotheses
from .rouge import clean_response, corpus_rouge_l


def response_text(tokenizer, pieces: Sequence[str]) -> str:
    """The response string of generated token pieces (detokenized, cut at EOS, stripped)."""
    return clean_response(tokenizer.decode(list(pieces)))


def token_pieces(dictionary, tokens) -> List[str]:
    """Token strings of a hypothesis tensor, without EOS/pad (as fairseq-generate's H- lines)."""
    return dictionary.string(tokens).split()


def score_responses(responses: Dict[int, str], rows: List[Dict], source: str = "generations") -> Tuple[float, int]:
    """Mean Rouge-L of ``{row index: response}`` against the rows' references; returns (score, n)."""
    beyond = [i for i in responses if i < 0 or i >= len(rows)]
    if beyond:
        raise DistillError(f"{source}: sample id {beyond[0]} is beyond the {len(rows)} reference rows")
    ids = sorted(responses)
    return corpus_rouge_l([responses[i] for i in ids], [references(rows[i]) for i in ids]), len(ids)


def check_coverage(path: str, ids, n_rows: int, reference: str, fix: str):
    """A generation file must answer each of the ``n_rows`` examples of ``reference``, no more, no less."""
    ids = set(ids)
    missing = sorted(set(range(n_rows)) - ids)
    extra = sorted(i for i in ids if not 0 <= i < n_rows)
    if missing or extra:
        problems = ([f"{len(missing)} missing (first: id {missing[0]})"] if missing else []) + \
                   ([f"{len(extra)} extra (first: id {extra[0]})"] if extra else [])
        raise DistillError(f"{path} has hypotheses for {len(ids) - len(extra)} of the {n_rows} examples of "
                           f"{reference}: {', '.join(problems)}; {fix}")


def score_generation_files(paths: Sequence[str], rows: List[Dict], tokenizer, reference: str,
                           fix: str) -> List[float]:
    """Rouge-L of each fairseq-generate output file (H- lines; one file per seed) against ``rows``.
    Every file is read and checked to cover ``rows`` exactly before any is scored, so seeds are
    averaged over the same examples; ``reference`` and ``fix`` word the error."""
    real = [os.path.realpath(p) for p in paths]
    for i, r in enumerate(real):
        if r in real[:i]:
            raise DistillError(f"generation file {paths[i]} is given twice; pass one file per seed")
    hyps = [read_hypotheses(path) for path in paths]
    for path, h in zip(paths, hyps):
        check_coverage(path, h, len(rows), reference, fix)
    return [score_responses({i: response_text(tokenizer, p) for i, p in h.items()}, rows, source=path)[0]
            for path, h in zip(paths, hyps)]


def seed_summary(scores: Sequence[float]) -> Dict[str, float]:
    """Mean and population standard deviation of per-seed scores."""
    if not scores:
        raise ValueError("no scores to summarize")
    return {
        "rouge_l": statistics.fmean(scores),
        "rouge_l_std": statistics.pstdev(scores) if len(scores) > 1 else 0.0,
    }
