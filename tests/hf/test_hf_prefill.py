"""Prompt prefill of wrapped HF models (``HFDecoder.prefill_step``: attention mask over the cache,
explicit position ids): left-padded prefill, cached steps and dropped rows give the logits of a full
forward over each unpadded row, for every family (Mistral also with a window shorter than the rows).
Greedy generation through the prefill equals transformers' generate in test_hf_models.py."""
import pytest

pytest.importorskip("transformers", reason="needs the hf extra (transformers)")

import hf_fixtures as F  # noqa: E402
from test_hf_models import CASES, IDS, TOL, build  # noqa: E402
from test_prefill_generation import check_steps_equal_full_forward  # noqa: E402

from distill_plugins.prompt_prefill import supports_prefill  # noqa: E402

WINDOW = (("sliding_window", 6),)


@pytest.mark.parametrize("family,extra,overrides", [(f, e, ()) for f, e in CASES] + [("mistral", [], WINDOW)],
                         ids=IDS + ["mistral-window"])
def test_left_padded_prefill_equals_full_forward(family, extra, overrides):
    task, model, _ = build(family, *extra, overrides=overrides)
    model.eval()
    assert supports_prefill(model.decoder)
    d = task.dictionary
    rows = [r[r.ne(d.pad())] for r in F.batch(task, n=3)["net_input"]["src_tokens"]]
    rows[1] = rows[1][:4]  # left padding longer than the window
    check_steps_equal_full_forward(model, rows, d.pad(), len(d), steps=8, drop_after=2, tol=TOL)
