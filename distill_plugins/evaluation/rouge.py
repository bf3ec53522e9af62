"""Rouge-L as MiniLLM/DistiLLM/DSKD compute it (spec section 5).

``rouge_score`` with stemming and its default tokenizer (lowercase, split on non-alphanumerics),
F-measure, the maximum over references, x 100, averaged over examples. Responses are cut at the
first end-of-text marker and stripped.
"""
import logging
from typing import List, Sequence

_SCORER = None


def _scorer():
    global _SCORER
    if _SCORER is None:
        # imported here: rouge_score pulls in nltk (0.6 s), which every fairseq-train with this task
        # would pay at start-up even without --eval-rouge
        from rouge_score import rouge_scorer

        absl = logging.getLogger("absl")  # no "INFO:absl:Using default tokenizer." on stderr
        level = absl.level
        absl.setLevel(logging.WARNING)
        try:
            _SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
        finally:
            absl.setLevel(level)
    return _SCORER


def clean_response(text: str, eos_markers: Sequence[str] = ("<|endoftext|>",)) -> str:
    """Cut at the first end-of-text marker, as the reference code (decoded with skip_special_tokens,
    so a real EOS, ``</s>`` included, is already gone; a literal ``</s>`` in the text is text) and strip."""
    for marker in eos_markers:
        cut = text.find(marker)
        if cut >= 0:
            text = text[:cut]
    return text.strip()


def rouge_l(prediction: str, references: Sequence[str]) -> float:
    """Max Rouge-L F-measure x 100 of one prediction over its references."""
    scorer = _scorer()
    return 100.0 * max(scorer.score(ref, prediction)["rougeL"].fmeasure for ref in references)


def corpus_rouge_l(predictions: Sequence[str], references: Sequence[List[str]]) -> float:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        raise ValueError("no predictions to score")
    return sum(rouge_l(p, r) for p, r in zip(predictions, references)) / len(predictions)
