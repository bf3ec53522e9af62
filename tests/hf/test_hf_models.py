"""Tiny random GPT-2 / OPT / LLaMA / Mistral / Qwen2 checkpoints: fairseq-side logits and greedy generation
equal transformers'; export then reload gives the same logits; LoRA merges exactly."""
import os

import pytest

transformers = pytest.importorskip("transformers", reason="needs the hf extra (transformers)")

import torch  # noqa: E402

import hf_fixtures as F  # noqa: E402
from distill_plugins.hf.vocab import ABSENT_LOGIT  # noqa: E402

# (family, extra flags): GPT-2 runs native by default; also through the wrapper
CASES = [("gpt2", []), ("gpt2", ["--hf-backend", "wrapped"]), ("opt", []), ("llama", []), ("mistral", []),
         ("qwen2", [])]
IDS = ["gpt2-native", "gpt2-wrapped", "opt", "llama", "mistral", "qwen2"]
TOL = 1e-4


def build(family, *extra, overrides=()):
    return F.build(F.prepared(family), "--arch", "hf_causal_lm", "--hf-model-dir",
                   F.hf_dir(family, overrides=overrides), *extra)


def reference(family, overrides=()):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(F.hf_dir(family, overrides=overrides)).eval()


@pytest.mark.parametrize("family,extra", CASES, ids=IDS)
def test_logits_and_greedy_generation_equal_transformers(family, extra):
    task, model, _ = build(family, *extra)
    assert model.backend == ("wrapped" if extra or family != "gpt2" else "native")
    model.eval()
    sample = F.batch(task)
    src = sample["net_input"]["src_tokens"]
    with torch.no_grad():
        ours = model(**sample["net_input"])[0]
    vocab = model.hf_vocab
    theirs = F.hf_logits_on(reference(family), vocab, src)
    real = src.ne(task.dictionary.pad())
    diff = (F.in_hf_order(ours, vocab) - theirs)[real].abs().max().item()
    assert diff <= TOL, f"max |fairseq - transformers| = {diff}"
    # rows no HF token maps to can never be predicted
    if vocab.absent_rows():
        assert torch.all(ours[..., vocab.absent_rows()] == ABSENT_LOGIT)
    assert ours.size(-1) == len(task.dictionary)
    check_greedy_generation(task, model, family)


def check_greedy_generation(task, model, family, overrides=()):
    """fairseq's generator (through the task, incremental decoding) vs transformers' generate."""
    from fairseq.dataclass.configs import GenerationConfig

    sample = F.batch(task, n=3)
    budget = 10
    prompts_len = int(sample["prompt_lengths"].max())
    gen = task.build_generator([model], GenerationConfig(beam=1, max_len_a=0, max_len_b=prompts_len + budget))
    hypos = task.inference_step(gen, [model], sample)
    vocab, ref = model.hf_vocab, reference(family, overrides)
    eos_hf = vocab.specials["eos"]
    # embedding rows past the tokenizer (Qwen2 pads its table) have no token: not in the dictionary
    suppress = list(range(vocab.size, ref.config.vocab_size)) or None
    for i, beams in enumerate(hypos):
        n = int(sample["prompt_lengths"][i])
        prompt = sample["net_input"]["src_tokens"][i, :n].tolist()
        ours = [vocab.fairseq_to_hf[t] for t in beams[0]["tokens"].tolist()]
        ids = torch.tensor([[vocab.fairseq_to_hf[t] for t in prompt]])  # no BOS, as the references
        with torch.no_grad():
            out = ref.generate(ids, max_new_tokens=prompts_len + budget - n, do_sample=False,
                               eos_token_id=eos_hf, pad_token_id=eos_hf, suppress_tokens=suppress)
        theirs = out[0, ids.size(1):].tolist()
        k = len(ours) - 1 if ours[-1] == eos_hf else len(ours)  # fairseq forces EOS at max length
        assert k >= 1 and ours[:k] == theirs[:k], (ours, theirs)
        if k < len(theirs) and ours[-1] == eos_hf and len(ours) - 1 < prompts_len + budget - n:
            assert theirs[k] == eos_hf


@pytest.mark.parametrize("family,extra", CASES, ids=IDS)
def test_export_then_reload_gives_same_logits(family, extra, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill_plugins.cli import export_hf

    task, model, cfg = build(family, *extra)
    torch.manual_seed(1)
    with torch.no_grad():  # as if trained: export must carry these weights, not the original ones
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.eval()
    sample = F.batch(task)
    with torch.no_grad():
        ours = model(**sample["net_input"])[0]
    ckpt = F.save_checkpoint(tmp_path / "checkpoint.pt", model, cfg, task)
    export_hf.main([ckpt, str(tmp_path / "hf"), "--data", F.prepared(family)])
    assert os.path.isfile(tmp_path / "hf" / "model.safetensors")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
    assert reloaded.config.model_type == family
    vocab = model.hf_vocab
    assert reloaded.get_input_embeddings().weight.size(0) == vocab.size
    theirs = F.hf_logits_on(reloaded, vocab, sample["net_input"]["src_tokens"])
    real = sample["net_input"]["src_tokens"].ne(task.dictionary.pad())
    assert (F.in_hf_order(ours, vocab) - theirs)[real].abs().max().item() <= TOL
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf", local_files_only=True)
    assert tok.eos_token_id == vocab.specials["eos"] and len(tok) == vocab.size


@pytest.mark.parametrize("family,extra", [("gpt2", []), ("llama", [])], ids=["gpt2-native", "llama"])
def test_lora_trains_adapters_only_and_merges_exactly(family, extra, tmp_path):
    from transformers import AutoModelForCausalLM

    from distill_plugins.cli import export_hf

    task, model, cfg = build(family, "--lora-rank", "4", "--lora-alpha", "8", "--lora-targets", "q,k,v,o,up", *extra)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    # exactly the base model before training (B = 0)
    _, base, _ = build(family, *extra)
    base.eval(), model.eval()
    sample = F.batch(task)
    with torch.no_grad():
        assert torch.equal(model(**sample["net_input"])[0], base(**sample["net_input"])[0])
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.5)
        adapted = model(**sample["net_input"])[0]
    assert (adapted - base(**sample["net_input"])[0]).abs().max() > 1e-3
    ckpt = F.save_checkpoint(tmp_path / "checkpoint.pt", model, cfg, task)
    export_hf.main([ckpt, str(tmp_path / "hf"), "--data", F.prepared(family)])
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
    theirs = F.hf_logits_on(merged, model.hf_vocab, sample["net_input"]["src_tokens"])
    real = sample["net_input"]["src_tokens"].ne(task.dictionary.pad())
    assert (F.in_hf_order(adapted, model.hf_vocab) - theirs)[real].abs().max().item() <= TOL


def test_half_precision_keeps_rope_frequencies_fp32():
    """fairseq casts the whole model for --bf16/--fp16 (and the teacher to --teacher-dtype); HF
    computes RoPE in fp32, so its inverse frequencies must not be rounded to bf16."""
    task, model, _ = build("llama")
    model.eval()
    sample = F.batch(task)
    with torch.no_grad():
        fp32 = model(**sample["net_input"])[0]
        model.to(torch.bfloat16)
        freqs = [b for n, b in model.named_buffers() if "inv_freq" in n]
        assert freqs and all(b.dtype == torch.float32 for b in freqs)
        bf16 = model(**sample["net_input"])[0]
    real = sample["net_input"]["src_tokens"].ne(task.dictionary.pad())
    assert bf16.dtype == torch.bfloat16 and torch.isfinite(bf16).all()
    present = [f for f, h in enumerate(model.hf_vocab.fairseq_to_hf) if h >= 0]
    assert (bf16.float() - fp32)[real][:, present].abs().max() < 0.25  # bf16 rounding only


def test_export_kd_gpt2_student_trained_from_scratch(tmp_path):
    """A native kd_gpt2_* student on HF-tokenized data exports as GPT-2 with the same logits."""
    from transformers import AutoModelForCausalLM

    from distill_plugins.cli import export_hf
    from distill_plugins.hf.vocab import HFVocab
    from distill_plugins.data.tokenizers import load_tokenizer_meta

    data = F.prepared("gpt2")
    task, model, cfg = F.build(data, "--arch", "kd_gpt2_tiny", "--decoder-layers", "1", "--decoder-embed-dim", "32",
                               "--decoder-ffn-embed-dim", "64", "--decoder-attention-heads", "2")
    model.eval()
    sample = F.batch(task)
    with torch.no_grad():
        ours = model(**sample["net_input"])[0]
    ckpt = F.save_checkpoint(tmp_path / "checkpoint.pt", model, cfg, task)
    export_hf.main([ckpt, str(tmp_path / "hf"), "--data", data])
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
    vocab = HFVocab.from_meta(load_tokenizer_meta(data))
    theirs = F.hf_logits_on(reloaded, vocab, sample["net_input"]["src_tokens"], bos=True)  # trained here: BOS
    real = sample["net_input"]["src_tokens"].ne(task.dictionary.pad())
    assert reloaded.config.model_type == "gpt2" and reloaded.config.n_layer == 1
    assert (F.in_hf_order(ours, vocab) - theirs)[real].abs().max().item() <= TOL


def test_wrapped_model_is_float32_whatever_the_config_dtype():
    """Real checkpoints say dtype bfloat16 in config.json; transformers' from_config follows it, which
    trained a student in bf16 without --bf16 (updates lost) and loaded fp32 weights rounded."""
    _, model, _ = build("llama", overrides=(("torch_dtype", "bfloat16"),))
    assert {p.dtype for p in model.parameters()} == {torch.float32}


@pytest.mark.parametrize("family,extra", [("gpt2", []), ("llama", [])], ids=["gpt2-native", "llama"])
def test_lm_blocks_are_scored_as_transformers_scores_them(family, extra):
    """--lm-data blocks (DistiLLM's LM term, MiniLLM's L_pt): transformers on input block[:-1],
    labels block[1:] (no BOS), as the references; was one token of context short."""
    import torch.nn.functional as fn

    from distill_plugins.data.lm_corpus import LMBlocks
    from distill_plugins.data.prompt_response_dataset import collate_examples

    task, model, _ = build(family, *extra)
    model.eval()
    d, vocab = task.dictionary, model.hf_vocab
    g = torch.Generator().manual_seed(0)
    present = torch.tensor([f for f, h in enumerate(vocab.fairseq_to_hf) if h >= 0 and f >= d.nspecial])
    blocks = [present[torch.randint(len(present), (12,), generator=g)] for _ in range(3)]
    lm = collate_examples([LMBlocks(blocks, d.eos(), d.pad())[i] for i in range(3)], d.pad())
    mask = lm["target"].ne(d.pad())
    with torch.no_grad():
        ours = fn.cross_entropy(model(**lm["net_input"])[0][mask], lm["target"][mask])
        ids = torch.tensor(vocab.fairseq_to_hf)[torch.stack(blocks)]
        logits = reference(family)(input_ids=ids[:, :-1]).logits[..., : vocab.size]
        theirs = fn.cross_entropy(logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1))
    assert int(mask.sum()) == 3 * 11 and abs(ours.item() - theirs.item()) <= TOL
