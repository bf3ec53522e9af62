"""sampling.py: the mixture LM is the weighted mixture, and generated batches are shifted right."""
import math

import pytest
import torch
from fairseq import checkpoint_utils

import distill_plugins  # noqa: F401
from distill_plugins.sampling import MixtureLM, batch_from_responses, generate_responses


def load(ckpt, data):
    models, _, task = checkpoint_utils.load_model_ensemble_and_task([ckpt], arg_overrides={"data": data})
    return models[0].eval(), task


def test_mixture_lm_is_the_weighted_mixture(teacher_ckpt, data_bin):
    m, task = load(teacher_ckpt, data_bin)
    other, _ = load(teacher_ckpt, data_bin)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.5 * torch.randn_like(p))
    task.load_dataset("valid")
    ds = task.dataset("valid")
    x = ds.collater([ds[i] for i in range(3)])["net_input"]["src_tokens"]
    a = 0.2
    mix = MixtureLM([m, other], [1 - a, a]).eval()
    with torch.no_grad():
        ref = torch.log((1 - a) * torch.softmax(m(x)[0].double(), -1) + a * torch.softmax(other(x)[0].double(), -1))
        got = mix.decoder(x)[0].double()
    assert torch.allclose(got, ref, atol=1e-5)
    assert torch.allclose(got.exp().sum(-1), torch.ones_like(got[..., 0]), atol=1e-5)


def test_generated_batch_labels_are_next_tokens(teacher_ckpt, data_bin):
    m, task = load(teacher_ckpt, data_bin)
    task.load_dataset("valid")
    ds = task.dataset("valid")
    sample = ds.collater([ds[i] for i in range(4)])
    torch.manual_seed(0)
    responses = generate_responses(task, m, sample, max_len=300)
    torch.manual_seed(0)
    again = generate_responses(task, m, sample, max_len=300)
    assert all(torch.equal(a, b) for a, b in zip(responses, again))  # same seed, same samples
    pad, eos = task.dictionary.pad(), task.dictionary.eos()
    batch = batch_from_responses(sample, responses, pad, eos, max_len=512)
    for i, resp in enumerate(responses):
        n = int(sample["prompt_lengths"][i])
        src, tgt = batch["net_input"]["src_tokens"][i], batch["target"][i]
        prompt = sample["net_input"]["src_tokens"][i, 1 : 1 + n]
        assert src[0] == eos and torch.equal(src[1 : 1 + n], prompt)
        labels = tgt[tgt.ne(pad)]
        assert torch.equal(labels, resp)  # exactly the response (and its EOS) are labels
        # label at position t is the input token at t + 1
        L = n + len(resp)
        assert torch.equal(tgt[n : L - 1], src[n + 1 : L])
        assert tgt[:n].eq(pad).all()
    assert batch["ntokens"] == sum(len(r) for r in responses)
    assert math.isfinite(float(batch["ntokens"]))


def _with_eos_logit(model, eos, value):
    """``model`` whose output layer gives EOS the logit ``value`` (never / always sampled)."""
    layer = model.decoder.output_layer

    def output_layer(x):
        y = layer(x)
        y[..., eos] = value
        return y

    model.decoder.output_layer = output_layer
    return model.eval()


@pytest.mark.parametrize("prefill", [True, False])
def test_the_eos_forced_at_the_length_limit_is_not_a_response_token(prefill):
    """fairseq's generators force EOS when prompt + response reach max_len; it was never sampled, so the
    response ends without it (MiniLLM would score it as an action; SeqKD would teach it as a stop)."""
    from conftest import in_memory_kd_task
    from distill_plugins.data.prompt_response_dataset import collate_examples, join_prompt_response

    task, student = in_memory_kd_task(tokens_per_sample=16)
    task.cfg.no_prompt_prefill = not prefill
    d = task.dictionary
    pad, eos = d.pad(), d.eos()
    prompts = [[d.index(f"w{i}") for i in range(n)] for n in (5, 3, 9)]
    sample = collate_examples([join_prompt_response(torch.tensor(p), torch.tensor([eos]), pad, eos, 16, k)
                               for k, p in enumerate(prompts)], pad)
    torch.manual_seed(0)
    never = _with_eos_logit(student, eos, -30.0)
    responses = generate_responses(task, never, sample, max_len=16)
    for p, r in zip(prompts, responses):
        assert eos not in r.tolist()
        assert len(p) + len(r) == 16  # generation_args(max_len=16): EOS forced at step 16, removed
    # the forced EOS is chosen even where its probability underflows (EOS 120 nats down at T = 0.25)
    for p, r in zip(prompts, generate_responses(task, never, sample, max_len=16, temperature=0.25)):
        assert len(p) + len(r) == 16 and eos not in r.tolist()
    always = _with_eos_logit(in_memory_kd_task(tokens_per_sample=16)[1], eos, 30.0)
    assert all(r.tolist() == [eos] for r in generate_responses(task, always, sample, max_len=16))


def test_underflow_safe_sampling_keeps_distribution_and_scores():
    """A row whose only finite log-probability underflows exp() (fairseq's forced EOS at a low
    temperature) is sampled, with its true score; ordinary rows sample and score bit for bit as
    fairseq's Sampling."""
    import math

    from fairseq import search
    from fairseq.data import Dictionary

    from distill_plugins.generation import underflow_safe_sampling

    d = Dictionary()
    for i in range(20):
        d.add_symbol(f"w{i}")
    plain, safe = search.Sampling(d), underflow_safe_sampling(search.Sampling(d))
    lprobs = torch.log_softmax(torch.randn(3, 1, len(d)), -1)
    lprobs[1] = -math.inf
    lprobs[1, 0, d.eos()] = -200.0  # exp(-200) == 0 in fp32
    with pytest.raises(RuntimeError, match="multinomial"):
        plain.step(0, lprobs.clone(), None)
    torch.manual_seed(3)
    scores, tokens, _ = safe.step(0, lprobs.clone(), None)
    assert tokens[1, 0] == d.eos() and scores[1, 0] == pytest.approx(-200.0)
    ordinary = lprobs[[0, 2]]
    torch.manual_seed(3)
    a = plain.step(0, ordinary.clone(), None)
    torch.manual_seed(3)
    b = safe.step(0, ordinary.clone(), None)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
