"""MiniPLM's difference sampling (distill_plugins/difference_sampling.py) against float64 references."""
import math

import pytest
import torch

from distill_plugins.difference_sampling import (document_log_likelihoods, document_windows, difference_scores,
                                                 kept_count, select_top)

from conftest import in_memory_kd_task


@pytest.fixture(scope="module")
def setup():
    task, _student = in_memory_kd_task(tokens_per_sample=64)
    teacher = task.teachers[0]
    d = task.dictionary
    g = torch.Generator().manual_seed(0)
    words = torch.arange(d.nspecial, len(d))
    docs = []
    for n in (1, 2, 5, 9, 17, 4, 12, 1, 30):  # tokens before the EOS; "1" is EOS alone after n-1 words
        body = words[torch.randint(len(words), (n - 1,), generator=g)]
        docs.append(torch.cat([body, torch.tensor([d.eos()])]))
    return task, teacher, docs


def reference_log_likelihoods(model, docs, eos, window):
    """Every window on its own, batch of one, in float64: sum of log softmax at the targets. The
    first window predicts tokens 0..w-1 from the preceding EOS on, token 0 not counted (as MiniPLM's
    shifted labels); each later one predicts the next max(w - 1, 1) tokens from [EOS, context token,
    ...] (the EOS a BOS column without a target)."""
    model = model.double()
    out = []
    for doc in docs:
        x = doc.tolist()
        total, start = 0.0, 0
        while start < len(x):
            first = start == 0
            count = min(window if first else max(window - 1, 1), len(x) - start)
            context = [eos] if first else [eos, x[start - 1]]
            inp = torch.tensor([context + x[start:start + count - 1]])
            logits = model(inp)[0][0].double()[len(context) - 1:]  # the positions predicting x[start:]
            tgt = torch.tensor(x[start:start + count])
            picked = torch.log_softmax(logits, -1).gather(-1, tgt[:, None]).squeeze(-1)
            total += (picked[1:] if first else picked).sum().item()
            start += count
        out.append(total)
    model.float()
    return torch.tensor(out, dtype=torch.float64)


def test_windows_cover_every_token_once():
    doc = torch.tensor([5, 6, 7, 8, 9, 2])
    pad = 1
    for window in (1, 2, 4, 6, 100):
        pairs = document_windows(doc, eos=2, window=window, pad=pad)
        targets = torch.cat([t for _, t in pairs])
        assert torch.equal(targets[targets.ne(pad)], doc[1:])  # all but the first token (not scored)
        assert all(len(i) == len(t) <= max(window, 2) for i, t in pairs)
        assert pairs[0][0][0] == 2 and pairs[0][1][0] == pad  # the first window starts from the preceding EOS
        for inp, tgt in pairs[1:]:  # later ones: a BOS (EOS) without target, then the context token
            assert inp[0] == 2 and tgt[0] == pad
            assert torch.equal(inp[2:], tgt[1:-1])
        covered = len(pairs[0][1])
        for inp, tgt in pairs[1:]:
            assert inp[1] == doc[covered - 1]  # the context token: the last token of the window before
            covered += len(tgt) - 1


@pytest.mark.parametrize("window,max_tokens", [(64, 64), (64, 4096), (4, 8), (7, 64), (1, 3)])
def test_log_likelihoods_match_float64_reference(setup, window, max_tokens):
    task, teacher, docs = setup
    d = task.dictionary
    got = document_log_likelihoods(teacher, docs, d.pad(), d.eos(), window, max_tokens=max_tokens, chunk_size=5)
    want = reference_log_likelihoods(teacher.model, docs, d.eos(), window)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    lone = torch.tensor([len(x) == 1 for x in docs])  # EOS alone: nothing scored
    assert (got[~lone] < 0).all() and (got[lone] == 0).all()


def test_dense_logits_path_equals_fused(setup, monkeypatch):
    """A model whose output layer cannot be fused (full logits rows) gives the same likelihoods."""
    task, teacher, docs = setup
    d = task.dictionary
    fused = document_log_likelihoods(teacher, docs, d.pad(), d.eos(), 8)
    monkeypatch.setattr(teacher, "projected_logits", lambda *a, **k: None)
    dense = document_log_likelihoods(teacher, docs, d.pad(), d.eos(), 8)
    torch.testing.assert_close(dense, fused, rtol=1e-6, atol=1e-5)


def test_bad_window_is_refused(setup):
    task, teacher, docs = setup
    with pytest.raises(ValueError, match="window"):
        document_log_likelihoods(teacher, docs, task.dictionary.pad(), task.dictionary.eos(), 8, max_tokens=4)


def test_scores_match_float64_formulas():
    inf = math.inf
    t = torch.tensor([-10.0, -30.0, -5.0, -inf, -inf, -2.0], dtype=torch.float32)
    r = torch.tensor([-20.0, -15.0, -5.0, -8.0, -inf, -inf])
    n = torch.tensor([5, 10, 1, 4, 3, 2])
    diff = difference_scores(t, r, n, "difference")
    want = [(-10 + 20) / 5, (-30 + 15) / 10, 0.0, -inf, -inf, inf]  # both -inf: NaN -> -inf (never kept first)
    assert diff.dtype == torch.float64 and diff.tolist() == want
    ratio = difference_scores(t, r, n, "ratio")
    assert ratio[:3].tolist() == [0.5, 2.0, 1.0] and ratio[3] == inf and ratio[4] == -inf
    # a certain reference (log p_ref = 0): the limit of log p / log p_ref from below, +inf in effect
    assert difference_scores(torch.tensor([-1.0]), torch.tensor([0.0]), torch.tensor([1]), "ratio")[0] > 1e300
    with pytest.raises(ValueError, match="unknown score"):
        difference_scores(t, r, n, "kl")


def test_kept_count_is_the_floor_up_to_float_rounding():
    """0.29 * 100 = 28.999999999999996 and 0.57 * 100 = 56.99999999999999 in binary: 29 and 57 kept."""
    assert 0.29 * 100 < 29 and kept_count(0.29, 100) == 29 and kept_count(0.57, 100) == 57
    assert kept_count(0.99, 6) == 5 and kept_count(0.5, 7) == 3 and kept_count(1.0, 0) == 0
    assert kept_count(0.3, 10**9) == 3 * 10**8 and kept_count(1 / 3, 10**9) == 333333333
    assert len(select_top(torch.zeros(100, dtype=torch.float64), 0.29)) == 29


def test_select_top_keeps_the_highest_in_corpus_order_and_breaks_ties_by_index():
    s = torch.tensor([1.0, 3.0, 3.0, 2.0, -math.inf, 0.5], dtype=torch.float64)
    assert select_top(s, 1 / 3).tolist() == [1, 2]
    assert select_top(s, 0.5).tolist() == [1, 2, 3]
    assert select_top(s, 0.99).tolist() == [0, 1, 2, 3, 5]  # floor(0.99 * 6) = 5: the -inf one goes
    assert select_top(s, 1.0).tolist() == [0, 1, 2, 3, 4, 5]
    assert select_top(torch.zeros(5, dtype=torch.float64), 0.4).tolist() == [0, 1]  # all tied: the first ones
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="keep_fraction"):
            select_top(s, bad)
