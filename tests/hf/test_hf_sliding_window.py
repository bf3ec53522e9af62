"""Mistral with a sliding attention window shorter than the sequences: the wrapped module applies it
in training (full sequences) and in incremental decoding (HF's sliding-window cache, reordered
for beam search): logits and greedy generation equal transformers'."""
import pytest

pytest.importorskip("transformers", reason="needs the hf extra (transformers)")

import torch  # noqa: E402

import hf_fixtures as F  # noqa: E402
from test_hf_models import TOL, build, check_greedy_generation, reference  # noqa: E402

WINDOW = (("sliding_window", 6),)


def test_sliding_window_logits_and_generation_equal_transformers():
    task, model, _ = build("mistral", overrides=WINDOW)
    model.eval()
    sample = F.batch(task)
    src = sample["net_input"]["src_tokens"]
    real = src.ne(task.dictionary.pad())
    assert int(real.sum(1).min()) > 3 * WINDOW[0][1]  # every sequence is several windows long
    with torch.no_grad():
        ours = model(**sample["net_input"])[0]
    vocab = model.hf_vocab
    theirs = F.hf_logits_on(reference("mistral", WINDOW), vocab, src)
    assert (F.in_hf_order(ours, vocab) - theirs)[real].abs().max().item() <= TOL
    # the window matters: without it the same weights give other logits
    full = F.hf_logits_on(reference("mistral"), vocab, src)
    assert (theirs - full)[real].abs().max().item() > 1e-2
    check_greedy_generation(task, model, "mistral", WINDOW)


def test_sliding_window_cache_reorder_equals_full_forward():
    """Beam search's use of the cache past the window: decode incrementally, reorder the beams
    (fairseq's ``reorder_incremental_state``) midway, decode on; every step's logits equal a full
    forward pass over the reordered sequences."""
    task, model, _ = build("mistral", overrides=WINDOW)
    model.eval()
    src = F.batch(task, n=2)["net_input"]["src_tokens"]
    n = int(src.ne(task.dictionary.pad()).sum(1).min())
    seqs, state, swap = src[:, :n].clone(), {}, n // 2
    order = torch.tensor([1, 1])  # both beams continue from sequence 1, as when beam 0 is dropped
    with torch.no_grad():
        for t in range(1, n + 1):
            if t == swap:
                model.decoder.reorder_incremental_state(state, order)
                seqs = torch.cat([seqs[order, :t - 1], seqs[:, t - 1:]], dim=1)
            step = model.decoder(seqs[:, :t], incremental_state=state)[0][:, -1]
            full = model.decoder(seqs[:, :t])[0][:, -1]
            assert (step - full).abs().max().item() <= TOL, t
    assert n - swap > WINDOW[0][1]


def test_sliding_window_beam_search_scores_equal_full_forward():
    """fairseq's beam search (cached, reordered) scores every hypothesis token with the log-probability
    a full forward pass over prompt + hypothesis gives."""
    from fairseq.dataclass.configs import GenerationConfig

    task, model, _ = build("mistral", overrides=WINDOW)
    model.eval()
    sample = F.batch(task, n=3)
    cfg = GenerationConfig(beam=2, max_len_a=0, max_len_b=int(sample["prompt_lengths"].max()) + 12)
    hypos = task.inference_step(task.build_generator([model], cfg), [model], sample)
    eos = task.dictionary.eos()
    for i, beams in enumerate(hypos):
        n = int(sample["prompt_lengths"][i])
        prompt = sample["net_input"]["src_tokens"][i, :n]
        for h in beams:
            tokens = h["tokens"]
            seq = torch.cat([torch.tensor([eos]), prompt, tokens])
            with torch.no_grad():
                lprobs = torch.log_softmax(model(seq[None, :-1])[0][0].float(), -1)[n:]
            full = lprobs[torch.arange(len(tokens)), tokens]
            assert (full - h["positional_scores"][-len(tokens):]).abs().max().item() <= 1e-4
