"""sampling.py: the mixture LM is the weighted mixture, and generated batches are shifted right."""
import math

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
