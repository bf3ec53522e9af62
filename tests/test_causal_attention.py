"""causal_attention.py: the decoder's self-attention through SDPA with is_causal (no padding) or a
[B, 1, T, T] mask (padding) computes what fairseq's own forward computes, in values and gradients
(float64), in the models, with dropout statistics, without a graph break, and without keeping the
dense [B x H, T, T] mask for the backward; incremental decoding (prefill, steps, beam reorder) keeps
fairseq's cache."""
import pytest
import torch
import torch.nn.functional as F

from conftest import in_memory_kd_task, tiny_model
from distill_plugins import causal_attention


def attention(heads=4, dim=32, dropout=0.0, seed=0):
    from fairseq.modules import MultiheadAttention

    torch.manual_seed(seed)
    module = MultiheadAttention(dim, heads, dropout=dropout, self_attention=True).double()
    setattr(module, causal_attention._MARK, True)  # what a decoder layer's build_self_attention does
    return module


def future_mask(length, dtype=torch.float64):
    return torch.triu(torch.full((length, length), float("-inf"), dtype=dtype), 1)


def padding(lengths, length):
    return torch.arange(length)[None, :] >= torch.tensor(lengths)[:, None]


def both(module, x, **kwargs):
    """(ours, fairseq's) outputs and input/parameter gradients for the same call."""
    results = []
    for forward in (causal_attention._forward, causal_attention.fairseq_forward):
        module.zero_grad()
        xi = x.detach().clone().requires_grad_()
        out, weights = forward(module, xi, xi, xi, need_weights=False, **kwargs)
        assert weights is None
        g = torch.randn_like(out, generator=torch.Generator().manual_seed(1))
        (out * g).sum().backward()
        results.append((out.detach(), xi.grad, [p.grad.clone() for p in module.parameters()]))
    return results


@pytest.mark.parametrize("lengths", [None, [9, 9, 9], [9, 4, 1], [9, 0, 6]], ids=["none", "full", "right", "empty"])
def test_same_values_and_gradients_as_fairseq_right_padded(lengths):
    module, length = attention(), 9
    x = torch.randn(length, 3, 32, dtype=torch.float64)
    kpm = None if lengths is None else padding(lengths, length)
    (out, gx, gp), (ref, rgx, rgp) = both(module, x, key_padding_mask=kpm, attn_mask=future_mask(length))
    rows = torch.ones(length, 3, dtype=torch.bool) if kpm is None else ~kpm.t()
    rows[0] = True  # position 0 is never a pad in a right-padded batch ([EOS] first) unless the row is empty
    finite = torch.isfinite(ref).all(-1)
    assert finite[rows].all()
    assert torch.allclose(out[finite], ref[finite], rtol=1e-12, atol=1e-12)
    assert torch.allclose(gx[finite], rgx[finite], rtol=1e-10, atol=1e-12)
    if finite.all():
        for a, b in zip(gp, rgp):
            assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_left_padding_and_other_masks_are_exact_too():
    module, length = attention(), 7
    x = torch.randn(length, 2, 32, dtype=torch.float64)
    kpm = torch.tensor([[True, True, False, False, False, False, False], [False] * 7])
    # a mask that is not causal (finite bias too): the padded path takes any [T, T] additive mask
    mask = torch.randn(length, length, dtype=torch.float64).masked_fill(torch.eye(length, dtype=torch.bool).roll(1, 1), float("-inf"))
    (out, gx, _), (ref, rgx, _) = both(module, x, key_padding_mask=kpm, attn_mask=mask)
    assert torch.allclose(out, ref, rtol=1e-12, atol=1e-12)
    assert torch.allclose(gx, rgx, rtol=1e-10, atol=1e-12)


def test_calls_that_do_not_apply_go_to_fairseq(monkeypatch):
    module, length = attention(), 5
    x = torch.randn(length, 2, 32, dtype=torch.float64)
    mask = future_mask(length)
    taken = []
    monkeypatch.setattr(causal_attention, "causal_self_attention", lambda *a: taken.append(1))
    unmarked = attention()
    delattr(unmarked, causal_attention._MARK)
    for module_, kwargs in [
        (module, dict(need_weights=True, attn_mask=mask)),         # attention weights asked for
        (module, dict(need_weights=False, attn_mask=None)),        # no future mask
        (unmarked, dict(need_weights=False, attn_mask=mask)),      # an encoder's or another model's
    ]:
        out, _ = module_(x, x, x, **kwargs)
        assert out.shape == x.shape
    y = torch.randn(length, 2, 32, dtype=torch.float64)
    module(x, y, y, need_weights=False, attn_mask=mask)            # key is not the query
    cached = {}
    causal_attention.fairseq_forward(module, x, x, x, incremental_state=cached, need_weights=False, attn_mask=mask)
    with pytest.raises(RuntimeError):  # several new tokens after a cache with a [T, T] mask: fairseq's error
        module(x, x, x, need_weights=False, attn_mask=mask, incremental_state=cached)
    assert taken == []
    module(x, x, x, need_weights=False, attn_mask=mask)
    assert taken == [1]


def test_dropout_keeps_the_expectation():
    """Attention dropout (GPT-2's 0.1) inside SDPA: the mean over many draws is the no-dropout output."""
    torch.manual_seed(0)
    module, length = attention(heads=2, dim=8, dropout=0.5), 6
    x = torch.randn(length, 1, 8, dtype=torch.float64)
    module.eval()
    expected, _ = module(x, x, x, need_weights=False, attn_mask=future_mask(length))
    module.train()
    draws = torch.stack([module(x, x, x, need_weights=False, attn_mask=future_mask(length))[0] for _ in range(4000)])
    assert not torch.allclose(draws[0], expected)
    assert torch.allclose(draws.mean(0), expected, atol=0.05)


def test_models_take_it_with_the_same_logits_and_compile_without_breaks():
    task, _ = in_memory_kd_task(tokens_per_sample=32)
    student = tiny_model(task, seed=1, decoder_layers=2, decoder_attention_heads=2).eval()
    assert all(getattr(layer.self_attn, causal_attention._MARK, False) for layer in student.decoder.layers)
    pad = task.dictionary.pad()
    tokens = torch.randint(4, len(task.dictionary), (3, 12))
    tokens[1, 8:] = pad
    tokens[2, 3:] = pad
    calls = []
    real = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(kwargs.get("is_causal", False) or kwargs.get("attn_mask") is not None)
        return real(*args, **kwargs)

    with torch.no_grad():
        torch.nn.functional.scaled_dot_product_attention = spy
        try:
            ours = student(tokens)[0]
            unpadded = student(tokens[:1])[0]
        finally:
            torch.nn.functional.scaled_dot_product_attention = real
        assert calls == [True] * 4  # both layers, both batches, from causal_self_attention
        mha = type(student.decoder.layers[0].self_attn)
        mha.forward = causal_attention.fairseq_forward
        try:
            ref = student(tokens)[0]
            ref_unpadded = student(tokens[:1])[0]
        finally:
            mha.forward = causal_attention._forward
    keep = tokens.ne(pad)
    assert torch.allclose(ours[keep], ref[keep], rtol=1e-5, atol=1e-6)
    assert torch.allclose(ours, ref, rtol=1e-5, atol=1e-6, equal_nan=True)
    assert torch.allclose(unpadded, ref_unpadded, rtol=1e-5, atol=1e-6)
    dynamo = pytest.importorskip("torch._dynamo")
    with torch.no_grad():
        explained = dynamo.explain(student)(tokens, features_only=True)
    # fairseq's own data-dependent check for padding is the one break (as without padding)
    assert explained.graph_break_count <= 1, [str(b.reason)[:200] for b in explained.break_reasons]


def saved_bytes(fn):
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def test_padded_backward_keeps_no_dense_mask():
    module, length, batch, heads = attention(heads=4, dim=32), 64, 4, 4
    module.float()
    x = torch.randn(length, batch, 32, requires_grad=True)
    kpm = padding([64, 40, 20, 10], length)
    mask = future_mask(length, torch.float32)
    ours = saved_bytes(lambda: causal_attention._forward(module, x, x, x, key_padding_mask=kpm, attn_mask=mask, need_weights=False))
    ref = saved_bytes(lambda: causal_attention.fairseq_forward(module, x, x, x, key_padding_mask=kpm, attn_mask=mask, need_weights=False))
    dense = batch * heads * length * length * 4
    assert ref - ours >= dense * 3 // 4, (ref, ours, dense)


@pytest.mark.parametrize("left_padded", [False, True])
def test_incremental_prefill_steps_and_reorder_match_fairseq(left_padded):
    """A prompt prefill (left-padded rows, future mask), one-token steps with and without a padding
    mask, and a beam reorder midway: every output and the whole cache equal fairseq's."""
    module, length = attention(), 6
    module.eval()
    torch.manual_seed(3)
    prompt = torch.randn(length, 3, 32, dtype=torch.float64)
    kpm = padding([6, 6, 6], length) if not left_padded else torch.arange(length)[None, :] < torch.tensor([[0], [2], [4]])
    caches, outs = [{}, {}], [[], []]
    steps = [torch.randn(1, 3, 32, dtype=torch.float64) for _ in range(4)]
    for i, forward in enumerate((causal_attention._forward, causal_attention.fairseq_forward)):
        with torch.no_grad():
            out, _ = forward(module, prompt, prompt, prompt, key_padding_mask=kpm if left_padded else None,
                             incremental_state=caches[i], need_weights=False, attn_mask=future_mask(length))
            rows = ~kpm.t() if left_padded else torch.ones(length, 3, dtype=torch.bool)
            outs[i].append(out[rows])
            for j, x in enumerate(steps):
                if j == 2:  # beam search drops / repeats rows
                    module.reorder_incremental_state(caches[i], torch.tensor([2, 0, 0]))
                step_kpm = torch.zeros(3, 1, dtype=torch.bool) if j == 1 else None
                out, _ = forward(module, x, x, x, key_padding_mask=step_kpm, incremental_state=caches[i],
                                 need_weights=False)
                outs[i].append(out)
    # fairseq's incremental path takes its softmax in fp32 whatever the input (utils.softmax)
    for i, (a, b) in enumerate(zip(*outs)):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-6), (i, (a - b).abs().max())
    ours, ref = (module._get_input_buffer(c) for c in caches)
    assert set(ours) == set(ref) == {"prev_key", "prev_value", "prev_key_padding_mask"}
    for name in ours:
        if ref[name] is None:
            assert ours[name] is None
        else:
            assert ours[name].shape == ref[name].shape and ours[name].dtype == ref[name].dtype
            assert torch.allclose(ours[name], ref[name], rtol=1e-12, atol=1e-12), name
