"""No-repeat n-gram blocking really blocks.

fairseq 0.12.3's CPU blocker never blocks (it compares the buffer's padded tail); ours is checked
against Hugging Face's ``NoRepeatNGramLogitsProcessor`` (the papers' generate) and, end to end, on a
crafted model that always wants to repeat one token: distill-evaluate with the default
--no-repeat-ngram-size 6 never completes a 6-gram twice, without it the response is one token
repeated, and prompts that themselves repeat 6-grams are still forced token by token.
"""
import json
import math
import os

import pytest
import torch
from fairseq.sequence_generator import SequenceGenerator

from conftest import write_jsonl
from distill_plugins.cli import evaluate
from distill_plugins.evaluation.generation_settings import SamplingSettings
from distill_plugins.ngram_blocking import NGramBlocker

FAVOURITE = "▁apple"  # the crafted model's token; when it is blocked, one of these:
RUNNERS_UP = ("▁banana", "▁cherry", "▁dog", "▁eagle")


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


@pytest.mark.parametrize("n", [1, 2, 3, 6])
def test_blocker_matches_hugging_face(n):
    transformers = pytest.importorskip("transformers")
    hf = transformers.generation.logits_process.NoRepeatNGramLogitsProcessor(n)
    g = torch.Generator().manual_seed(n)
    history = torch.randint(4, 9, (6, 20), generator=g)
    history[3:] = torch.randint(4, 6, (3, 20), generator=g)  # two symbols: long n-grams repeat too
    tokens = torch.cat([torch.full((6, 1), 2), history, torch.full((6, 5), 1)], dim=1)  # BOS, ..., pad
    vocab, blocked = 12, 0
    for step in range(0, 21):
        lprobs = torch.zeros(6, vocab)
        ours = NGramBlocker(n)(tokens, lprobs.clone(), 6, 1, step)
        theirs = hf(history[:, :step], lprobs.clone()) if step > 0 else lprobs.clone()
        assert torch.equal(torch.isinf(ours), torch.isinf(theirs)), (n, step)
        blocked += int(torch.isinf(ours).sum())
    assert blocked > 0  # the comparison is not vacuous


def ngram_repeats(pieces, start, n=6):
    """Positions >= start (indices into pieces) whose n-gram already occurred earlier."""
    seen, repeats = set(), []
    for end in range(n, len(pieces) + 1):
        gram = tuple(pieces[end - n:end])
        if gram in seen and end - 1 >= start:
            repeats.append(end - 1)
        seen.add(gram)
    return repeats


@pytest.fixture(scope="module")
def crafted_ckpt(teacher_ckpt, data_bin, tmp_path_factory):
    """The teacher with its output replaced: logits 20 for FAVOURITE, 10 for RUNNERS_UP, -20 for the
    rest (EOS included), whatever the input (final LayerNorm weight 0, bias on one dimension)."""
    from fairseq.data import Dictionary

    d = Dictionary.load(os.path.join(data_bin, "dict.src.txt"))
    ids = {p: d.index(p) for p in (FAVOURITE, *RUNNERS_UP)}
    assert d.unk() not in ids.values()
    state = torch.load(teacher_ckpt, map_location="cpu", weights_only=False)
    m = state["model"]
    emb = torch.zeros_like(m["decoder.embed_tokens.weight"])
    emb[:, 0] = -1.0
    emb[ids[FAVOURITE], 0] = 1.0
    for p in RUNNERS_UP:
        emb[ids[p], 0] = 0.5
    m["decoder.embed_tokens.weight"], m["decoder.output_projection.weight"] = emb, emb.clone()
    m["decoder.layer_norm.weight"] = torch.zeros_like(m["decoder.layer_norm.weight"])
    m["decoder.layer_norm.bias"] = torch.zeros_like(m["decoder.layer_norm.bias"])
    m["decoder.layer_norm.bias"][0] = 20.0
    path = tmp_path_factory.mktemp("crafted") / "repeater.pt"
    torch.save(state, path)
    return str(path), ids


def evaluate_responses(ckpt, data_bin, eval_file, tmp_path, *extra):
    """distill-evaluate's main in this process (the CLI itself runs in tests/cli/test_evaluate.py)."""
    out = tmp_path / "responses.jsonl"
    evaluate.main([ckpt, "--data", data_bin, "--eval-files", eval_file, "--seeds", "10", "--max-length", "48",
                   "--max-prompt-tokens", "16", "--cpu", "--no-progress", "--responses", str(out), "--overwrite", *extra])
    return [json.loads(line) for line in open(out)]


def test_blocking_blocks_and_forced_prompts_survive(crafted_ckpt, data_bin, tmp_path):
    ckpt, _ = crafted_ckpt
    # prompt 1 repeats the favourite 8 times (6-grams repeated inside the prompt); prompt 2 is plain
    rows = [{"prompt": "apple " * 8, "output": "x"}, {"prompt": "river sun tree", "output": "x"}]
    eval_file = write_jsonl(tmp_path / "repeat.jsonl", rows)
    from distill_plugins.data.tokenizers import load_tokenizer

    tok = load_tokenizer(data_bin)
    prompts = [tok.encode(r["prompt"]) for r in rows]
    assert prompts[0] == [FAVOURITE] * 8

    unblocked = evaluate_responses(ckpt, data_bin, eval_file, tmp_path, "--no-repeat-ngram-size", "0")
    blocked = evaluate_responses(ckpt, data_bin, eval_file, tmp_path)  # default: 6
    cap = 48 - 16  # at most --max-length - --max-prompt-tokens response tokens (the protocol's 512 - 256)
    for r in unblocked:  # the model's wish: the favourite to the response cap
        assert r["tokens"] == [FAVOURITE] * min(48 - len(prompts[r["id"]]), cap)
        assert ngram_repeats(prompts[r["id"]] + r["tokens"], len(prompts[r["id"]]))
    for r in blocked:
        full = prompts[r["id"]] + r["tokens"]
        assert len(r["tokens"]) == min(48 - len(prompts[r["id"]]), cap)  # nothing broke: full length, no EOS
        assert ngram_repeats(full, len(prompts[r["id"]])) == []  # no generated token repeats a 6-gram
        assert r["tokens"].count(FAVOURITE) > len(r["tokens"]) // 2  # still the favourite where allowed
    # the prompt's own 6-grams count as history: the first response token cannot be a 7th apple
    assert blocked[0]["tokens"][0] != FAVOURITE


def test_repeating_prompt_is_forced_token_by_token(crafted_ckpt, data_bin):
    """At library level: the generator keeps the forced prompt (with its repeated 6-grams) intact;
    stock fairseq's generator, on CPU, does not block at all."""
    from fairseq import checkpoint_utils

    ckpt, ids = crafted_ckpt
    models, _, task = checkpoint_utils.load_model_ensemble_and_task([ckpt], arg_overrides={"data": data_bin})
    model = models[0].eval()
    x = ids[FAVOURITE]
    prompt = torch.LongTensor([[x] * 8 + [ids["▁dog"]] + [x] * 7, [ids["▁dog"]] + [1] * 15])  # row 2 shorter (pad)
    sample = {"net_input": {"src_tokens": prompt, "src_lengths": torch.LongTensor([16, 1])}}
    args = SamplingSettings(no_repeat_ngram_size=6, max_length=30).generator_args()
    for cls, blocks in ((None, True), (SequenceGenerator, False)):
        generator = task.build_generator([model], args, seq_gen_cls=cls)
        torch.manual_seed(0)
        hypos = generator.generate([model], sample, prefix_tokens=prompt, bos_token=task.dictionary.eos())
        for row, n in ((0, 16), (1, 1)):
            tokens = hypos[row][0]["tokens"].tolist()
            assert tokens[:n] == prompt[row, :n].tolist()
            assert math.isfinite(float(hypos[row][0]["score"]))
            assert bool(ngram_repeats(tokens[:-1], n)) is not blocks, (cls, row, tokens)
