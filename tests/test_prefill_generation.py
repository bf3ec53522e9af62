"""prompt_prefill.py / prefill_generator.py: a left-padded prompt prefill then cached single steps
give the logits of a full forward pass over each unpadded row; generation with it equals fairseq's
token-by-token prompt forcing (greedy, n-gram blocking, max/min length) and samples as fairseq does."""
import pytest
import torch
from conftest import tiny_model
from fairseq import checkpoint_utils

import distill_plugins  # noqa: F401
from distill_plugins.generation import PromptSequenceGenerator
from distill_plugins.prefill_generator import PrefillGenerator
from distill_plugins.prompt_prefill import decoder_step, supports_prefill
from distill_plugins.sampling import MixtureLM, generation_args

TOL = 1e-5


def load(ckpt, data):
    models, _, task = checkpoint_utils.load_model_ensemble_and_task([ckpt], arg_overrides={"data": data})
    task.load_dataset("valid")
    return models[0].eval(), task


def valid_batch(task, n):
    ds = task.dataset("valid")
    return ds.collater([ds[i] for i in range(n)])


def sinusoidal_copy(task):
    """A random 2-layer kd_gpt2_tiny with sinusoidal positions (fairseq's transformer_lm default)."""
    return tiny_model(task, seed=3, decoder_learned_pos=False, decoder_layers=2).eval()


def left_padded(rows, pad):
    width = max(len(r) for r in rows)
    tokens = torch.full((len(rows), width), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, width - len(r):] = r
    padding = tokens.eq(pad)
    positions = ((~padding).long().cumsum(1) - 1).clamp(min=0)
    return tokens, padding, positions


def check_steps_equal_full_forward(model, rows, pad, vocab, steps=6, drop_after=3, tol=TOL):
    """Prefill the rows, then feed random tokens one at a time, dropping row 0 after ``drop_after``
    steps (the cache reorder the generator does when a row ends); compare with full forwards."""
    gen = torch.Generator().manual_seed(0)
    tokens, padding, positions = left_padded(rows, pad)
    state = {}
    rows = [r.clone() for r in rows]
    alive = list(range(len(rows)))
    with torch.no_grad():
        logits = decoder_step(model.decoder, tokens, padding, positions, state, last_only=False)
        for k, i in enumerate(alive):  # every real prompt position, not only the last
            n = len(rows[i])
            full = model(rows[i].unsqueeze(0))[0][0]
            assert (logits[k, -n:] - full).abs().max().item() <= tol
        nxt = positions[:, -1] + 1
        for t in range(steps):
            if t == drop_after:
                keep = torch.arange(1, len(alive))
                model.decoder.reorder_incremental_state_scripting(state, keep)
                alive, padding, nxt = alive[1:], padding[keep], nxt[keep]
            new = torch.randint(4, vocab, (len(alive),), generator=gen)
            padding = torch.cat([padding, padding.new_zeros(len(alive), 1)], 1)
            step = decoder_step(model.decoder, new.unsqueeze(1), padding, nxt.unsqueeze(1), state)[:, -1]
            nxt = nxt + 1
            for k, i in enumerate(alive):
                rows[i] = torch.cat([rows[i], new[k : k + 1]])
                full = model(rows[i].unsqueeze(0))[0][0, -1]
                assert (step[k] - full).abs().max().item() <= tol, (t, i)


@pytest.mark.parametrize("positions", ["learned", "sinusoidal"])
def test_prefill_and_steps_equal_full_forward(teacher_ckpt, data_bin, positions):
    model, task = load(teacher_ckpt, data_bin)
    if positions == "sinusoidal":
        model = sinusoidal_copy(task)
    assert supports_prefill(model.decoder)
    d = task.dictionary
    sample = valid_batch(task, 4)
    rows = [r[r.ne(d.pad())] for r in sample["net_input"]["src_tokens"]]
    rows[1] = rows[1][:3]  # very different lengths: lots of left padding
    check_steps_equal_full_forward(model, rows, d.pad(), len(d))


def test_mixture_prefill_equals_mixture_forward(teacher_ckpt, data_bin):
    model, task = load(teacher_ckpt, data_bin)
    other = sinusoidal_copy(task)
    mix = MixtureLM([model, other], [0.8, 0.2]).eval()
    assert supports_prefill(mix.decoder)
    d = task.dictionary
    rows = [r[r.ne(d.pad())] for r in valid_batch(task, 3)["net_input"]["src_tokens"]]
    check_steps_equal_full_forward(mix, rows, d.pad(), len(d), steps=3, drop_after=1)


def generate(task, model, sample, prefill: bool, min_len=1, **kw):
    args = generation_args(**kw)
    args.min_len = min_len
    gen = task.build_generator([model], args) if prefill else \
        task.build_generator([model], args, seq_gen_cls=PromptSequenceGenerator)
    assert isinstance(gen, PrefillGenerator) == prefill
    return [b[0] for b in task.inference_step(gen, [model], dict(sample))]


def single_rows(sample):
    for i in range(len(sample["id"])):
        n = int(sample["net_input"]["src_lengths"][i])
        yield {"id": sample["id"][i : i + 1], "prompt_lengths": sample["prompt_lengths"][i : i + 1],
               "net_input": {"src_tokens": sample["net_input"]["src_tokens"][i : i + 1, :n],
                             "src_lengths": sample["net_input"]["src_lengths"][i : i + 1]}}


@pytest.mark.parametrize("model_kind,kw", [
    ("trained", dict(max_len=140, min_len=110)),  # stops with EOS once min_len allows (rows differ)
    ("random", dict(max_len=140)),  # never stops: cut at max_len
    ("random", dict(max_len=140, no_repeat_ngram_size=2)),
    ("random", dict(max_len=112)),  # the longest prompts get EOS at once
])
def test_greedy_equals_fairseq_prompt_forcing(teacher_ckpt, data_bin, model_kind, kw):
    model, task = load(teacher_ckpt, data_bin)
    if model_kind == "random":
        model = tiny_model(task, seed=4, decoder_layers=2).eval()
    sample = valid_batch(task, 8)
    ours = generate(task, model, sample, True, sampling=False, **kw)
    if kw.get("min_len", 1) > 1:
        # fairseq skips min_len while any row of the batch is still forcing its prompt, so its
        # result depends on the batch; one row at a time it is the per-row rule we apply
        ref = [generate(task, model, row, False, sampling=False, **kw)[0] for row in single_rows(sample)]
    else:
        ref = generate(task, model, sample, False, sampling=False, **kw)
    lengths = [len(h["tokens"]) for h in ref]
    assert len(set(lengths)) > 1  # rows end at different steps
    for a, b in zip(ours, ref):
        assert torch.equal(a["tokens"], b["tokens"])
        n = len(b["tokens"])
        assert torch.allclose(a["positional_scores"][-n:], b["positional_scores"][-n:], atol=1e-4)


def test_prompt_longer_than_max_len_as_fairseq(teacher_ckpt, data_bin):
    _, task = load(teacher_ckpt, data_bin)
    model = tiny_model(task, seed=4, decoder_layers=2).eval()  # does not stop by itself
    sample = valid_batch(task, 6)
    n = sorted(int(x) for x in sample["prompt_lengths"])
    max_len = n[2]  # some prompts longer than max_len, one exactly max_len, some shorter
    ours = generate(task, model, sample, True, sampling=False, max_len=max_len + 1)
    ref = generate(task, model, sample, False, sampling=False, max_len=max_len + 1)
    assert [h["tokens"].tolist() for h in ours] == [h["tokens"].tolist() for h in ref]
    assert any(len(h["tokens"]) == 0 for h in ref) and any(len(h["tokens"]) > 1 for h in ref)


def test_sampling_is_seeded_and_uses_fairseq_top_p(teacher_ckpt, data_bin):
    model, task = load(teacher_ckpt, data_bin)
    sample = valid_batch(task, 6)
    torch.manual_seed(5)
    a = generate(task, model, sample, True, max_len=140)
    torch.manual_seed(5)
    b = generate(task, model, sample, True, max_len=140)
    torch.manual_seed(6)
    c = generate(task, model, sample, True, max_len=140)
    assert all(torch.equal(x["tokens"], y["tokens"]) for x, y in zip(a, b))
    assert any(not torch.equal(x["tokens"], y["tokens"]) for x, y in zip(a, c))
    # a nucleus this small holds only the most likely token: sampling becomes greedy
    greedy = generate(task, model, sample, True, sampling=False, max_len=140)
    nucleus = generate(task, model, sample, True, top_p=1e-6, max_len=140)
    assert all(torch.equal(x["tokens"], y["tokens"]) for x, y in zip(greedy, nucleus))


def test_first_token_follows_the_model_distribution(teacher_ckpt, data_bin):
    """One prompt repeated 4,000 times: the first sampled tokens' frequencies match softmax(logits / T)
    (every token within 5 standard errors; pad never drawn)."""
    _, task = load(teacher_ckpt, data_bin)
    model = tiny_model(task, seed=4, decoder_layers=2).eval()
    one = valid_batch(task, 1)
    n, temperature = 4000, 1.5
    sample = {"id": torch.arange(n), "prompt_lengths": one["prompt_lengths"].repeat(n),
              "net_input": {"src_tokens": one["net_input"]["src_tokens"].repeat(n, 1),
                            "src_lengths": one["net_input"]["src_lengths"].repeat(n)}}
    prompt_len = int(one["prompt_lengths"][0])
    with torch.no_grad():
        x = one["net_input"]["src_tokens"][:, : prompt_len + 1]
        logits = model(x)[0][0, -1].double() / temperature
    logits[task.dictionary.pad()] = -float("inf")
    probs = torch.softmax(logits, -1)
    torch.manual_seed(0)
    hyps = generate(task, model, sample, True, temperature=temperature, max_len=prompt_len + 2)
    first = torch.tensor([int(h["tokens"][0]) for h in hyps])
    freq = torch.bincount(first, minlength=probs.numel()).double() / n
    assert freq[task.dictionary.pad()] == 0
    stderr = (probs * (1 - probs) / n).sqrt().clamp(min=1e-12)
    z = ((freq - probs).abs() / stderr)[probs > 0]
    assert z.max().item() < 5, z.max().item()
    assert probs.max().item() < 0.5  # the test has a spread distribution to check


def test_the_response_cap_holds_per_row():
    """max_new_tokens counts from each row's own prompt, not from the batch's longest: with EOS all but
    impossible, a 2-token and a 9-token prompt both get 4 sampled tokens and the forced EOS."""
    from conftest import in_memory_kd_task
    from distill_plugins.data.prompt_response_dataset import collate_examples, join_prompt_response
    from test_sampling import _with_eos_logit

    task, student = in_memory_kd_task(tokens_per_sample=64)
    d = task.dictionary
    pad, eos = d.pad(), d.eos()
    prompts = [[d.index(f"w{i}") for i in range(n)] for n in (2, 9)]
    sample = collate_examples([join_prompt_response(torch.tensor(p), torch.tensor([eos]), pad, eos, 64, k)
                               for k, p in enumerate(prompts)], pad)
    never = _with_eos_logit(student, eos, -30.0).eval()
    gen = task.build_generator([never], generation_args(max_len=60))
    gen.max_new_tokens = 4
    assert isinstance(gen, PrefillGenerator)
    prefix = sample["net_input"]["src_tokens"][:, 1:10].clone()
    for i, p in enumerate(prompts):
        prefix[i, len(p):] = pad
    hyps = gen.generate([never], {"net_input": {"src_tokens": prefix, "src_lengths": torch.tensor([2, 9])}},
                        prefix_tokens=prefix)
    for p, h in zip(prompts, hyps):
        assert len(h[0]["tokens"]) - len(p) == 4 + 1
