"""Our Rouge-L is rouge-score's (stemming, F-measure x 100, max over references), and the seed summary
is numpy's mean and population std."""
import numpy as np
import pytest
from rouge_score import rouge_scorer

from distill_plugins.evaluation.rouge import clean_response, corpus_rouge_l, rouge_l
from distill_plugins.evaluation.scoring import score_responses, seed_summary

PAIRS = [
    ("The cats are running quickly.", "a cat runs quick"),  # stemming and case
    ("Paris is the capital of France.", "The capital of France is Paris."),  # order matters for LCS
    ("", "something"),  # empty prediction
    ("no overlap at all", "completely different words"),
    ("1) Mix flour, 2) add eggs; bake!", "mix the flour and add eggs then bake"),  # punctuation, digits
]


def direct(pred, refs):
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return max(100 * scorer.score(r, pred)["rougeL"].fmeasure for r in refs)


@pytest.mark.parametrize("pred,ref", PAIRS)
def test_single_reference_equals_rouge_score(pred, ref):
    assert rouge_l(pred, [ref]) == pytest.approx(direct(pred, [ref]), abs=1e-12)


def test_stemming_is_on():
    # without stemming these share only "a"; with Porter stemming cat/cats and run/running match
    assert rouge_l("cats running", ["cat run"]) == pytest.approx(100.0)


def test_multiple_references_take_the_maximum():
    pred = "the quick brown fox jumps"
    refs = ["a slow green turtle", "the quick brown fox leaps", "fox"]
    scores = [direct(pred, [r]) for r in refs]
    assert rouge_l(pred, refs) == pytest.approx(max(scores), abs=1e-12)
    assert rouge_l(pred, refs) > scores[0] and rouge_l(pred, refs) > scores[2]


def test_corpus_score_is_the_mean_over_examples():
    preds = [p for p, _ in PAIRS]
    refs = [[r, "another reference"] for _, r in PAIRS]
    want = float(np.mean([direct(p, r) for p, r in zip(preds, refs)]))
    assert corpus_rouge_l(preds, refs) == pytest.approx(want, abs=1e-9)
    rows = [{"instruction": "x", "output": r} for r in refs]  # output as a list of references
    got, n = score_responses(dict(enumerate(preds)), rows)
    assert n == len(preds) and got == pytest.approx(want, abs=1e-9)


def test_responses_are_cut_at_end_of_text_and_stripped():
    assert clean_response("  an answer <|endoftext|> leftover") == "an answer"
    # spec 5 cuts at <|endoftext|> only: a real EOS never reaches the text, a literal </s> is text
    assert clean_response("uses the </s> tag ") == "uses the </s> tag"


def test_seed_summary_is_mean_and_population_std():
    scores = [23.1, 24.7, 22.9, 25.0, 23.8]
    s = seed_summary(scores)
    assert s["rouge_l"] == pytest.approx(np.mean(scores)) and s["rouge_l_std"] == pytest.approx(np.std(scores))
    assert seed_summary([5.0]) == {"rouge_l": 5.0, "rouge_l_std": 0.0}


def test_a_response_is_cut_at_the_first_end_of_text():
    assert clean_response("a <|endoftext|> b <|endoftext|> c") == "a"
