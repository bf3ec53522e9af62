"""Tiny Hugging Face checkpoints made locally (no hub): tokenizers trained on the toy instructions,
random GPT-2 / OPT / LLaMA / Mistral / Qwen2 models saved with ``save_pretrained`` (safetensors)."""
import functools
import os
import tempfile

from conftest import make_rows

from distill_plugins.data.instruction_jsonl import references, render_prompt

ROOT = tempfile.mkdtemp(prefix="hf-fixtures-")
FAMILIES = ("gpt2", "opt", "llama", "mistral", "qwen2")


def corpus():
    rows = make_rows(240, 0)
    return [t for r in rows for t in (render_prompt(r), references(r)[0])]


def byte_bpe(specials, vocab_size=400):
    """GPT-2-style byte-level BPE; ``specials`` are its first ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    return tok


def sentencepiece_bpe(vocab_size=300):
    """LLaMA-style: <unk>=0, <s>=1, </s>=2, metaspace BPE with byte fallback."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()])
    bytes_ = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size + 256, special_tokens=["<unk>", "<s>", "</s>"] + bytes_,
                                  show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    return tok


@functools.lru_cache(maxsize=None)
def tokenizer(style):
    from transformers import PreTrainedTokenizerFast

    if style == "gpt2":  # one special token: bos = eos = unk, no pad (3 absent fairseq rows)
        t = byte_bpe(["<|endoftext|>"])
        return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                       unk_token="<|endoftext|>")
    if style == "opt":  # fairseq's own specials at 0-3: the identity permutation
        t = byte_bpe(["<s>", "<pad>", "</s>", "<unk>"])
        return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", pad_token="<pad>", eos_token="</s>",
                                       unk_token="<unk>")
    if style == "llama":  # unk 0, bos 1, eos 2, no pad
        t = sentencepiece_bpe()
        return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    if style == "qwen2":  # eos = pad, no bos/unk
        t = byte_bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
        return PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    raise ValueError(style)


def model_config(family, tok, small=False, **kw):
    """A tiny random config of ``family`` for ``tok``; ``small``: a narrower student."""
    from transformers import GPT2Config, LlamaConfig, MistralConfig, OPTConfig, Qwen2Config

    d = 16 if small else 32
    V = len(tok)
    common = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if family == "gpt2":
        c = GPT2Config(vocab_size=V, n_positions=128, n_embd=d, n_layer=2, n_head=2, initializer_range=0.2, **common)
    elif family == "opt":  # word_embed_proj_dim != hidden: OPT-350m's project_in/out
        c = OPTConfig(vocab_size=V, hidden_size=d, num_hidden_layers=2, ffn_dim=2 * d, num_attention_heads=2,
                      max_position_embeddings=128, word_embed_proj_dim=d // 2, init_std=0.2, **common)
    elif family == "llama":
        c = LlamaConfig(vocab_size=V, hidden_size=d, intermediate_size=2 * d, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                        initializer_range=0.2, tie_word_embeddings=False, **common)
    elif family == "mistral":  # tied, no sliding window unless asked (``sliding_window=``)
        c = MistralConfig(vocab_size=V, hidden_size=d, intermediate_size=2 * d, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                          initializer_range=0.2, tie_word_embeddings=True, sliding_window=None, **common)
    elif family == "qwen2":  # embedding rows past the tokenizer, like Qwen2's 151936 > 151646
        c = Qwen2Config(vocab_size=V + 13, hidden_size=d, intermediate_size=2 * d, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                        initializer_range=0.2, tie_word_embeddings=True, **common)
    else:
        raise ValueError(family)
    for k, v in kw.items():
        setattr(c, k, v)
    return c


# Each family has its own tokenizer: transformers 5 picks the tokenizer class from config.json's
# model_type (Qwen2Tokenizer adds NFC and its own pre-tokenizer), so the same files next to
# another family's config tokenize differently, and the fingerprint check rightly refuses them.
TOKENIZER_OF = {"gpt2": "gpt2", "opt": "opt", "llama": "llama", "mistral": "llama", "qwen2": "qwen2"}


@functools.lru_cache(maxsize=None)
def hf_dir(family, tokenizer_style=None, small=False, seed=0, pickle=False, overrides=()):
    """A saved tiny checkpoint directory (config.json, model.safetensors, tokenizer files);
    ``overrides``: (name, value) pairs set on the config."""
    import torch
    from transformers import AutoModelForCausalLM

    style = tokenizer_style or TOKENIZER_OF[family]
    tok = tokenizer(style)
    extra = "".join(f"-{k}{v}" for k, v in overrides)
    path = os.path.join(ROOT, f"{family}-{style}-{'s' if small else 'l'}-{seed}-{'pkl' if pickle else 'st'}{extra}")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(model_config(family, tok, small=small, **dict(overrides)))
    model.save_pretrained(path, safe_serialization=not pickle)
    if pickle and os.path.isfile(os.path.join(path, "model.safetensors")):
        torch.save(model.state_dict(), os.path.join(path, "pytorch_model.bin"))
        os.remove(os.path.join(path, "model.safetensors"))
    tok.save_pretrained(path)
    return path


@functools.lru_cache(maxsize=None)
def jsonl_files():
    from conftest import write_jsonl

    d = os.path.join(ROOT, "jsonl")
    os.makedirs(d, exist_ok=True)
    return {s: write_jsonl(os.path.join(d, f"{s}.jsonl"), make_rows(n, seed))
            for s, n, seed in (("train", 48, 0), ("valid", 8, 1), ("test", 6, 2))}


def prepared(family, cli=False):
    """Data prepared with the tokenizer of ``hf_dir(family)`` (one directory per tokenizer)."""
    return _prepared(TOKENIZER_OF[family], cli)


@functools.lru_cache(maxsize=None)
def _prepared(style, cli):
    """distill-prepare: the real CLI in a subprocess (cli=True) or its main() in-process (faster)."""
    from conftest import cli as cli_path, run

    from distill_plugins.cli import prepare

    family = style  # the family whose checkpoint directory holds this tokenizer
    files = jsonl_files()
    dest = os.path.join(ROOT, f"data-{style}{'-cli' if cli else ''}")
    argv = ["--train", files["train"], "--valid", files["valid"], "--test", files["test"], "--destdir", dest,
            "--tokenizer", "hf", "--hf-tokenizer", hf_dir(family), "--max-total-tokens", "96",
            "--max-prompt-tokens", "64", "--overwrite"]
    if cli:
        run([cli_path("distill-prepare"), *argv])
    else:
        prepare.main(argv)
    return dest


def build(data, *extra):
    """(task, model, cfg) built in-process exactly as fairseq-train builds them."""
    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    from conftest import USER_DIR

    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, [data, "--user-dir", USER_DIR, "--task", "instruction_distillation",
                                                "--cpu", *extra])
    cfg = convert_namespace_to_omegaconf(args)
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    return task, model, cfg


def save_checkpoint(path, model, cfg, task):
    """A fairseq checkpoint of an in-process model, in the layout fairseq-train writes."""
    import torch
    from omegaconf import OmegaConf

    state = {
        "args": None, "cfg": OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
        "model": model.state_dict(), "criterion": None, "last_optimizer_state": None,
        "optimizer_history": [{"criterion_name": "CrossEntropyCriterion", "optimizer_name": "Adam",
                               "lr_scheduler_state": {"best": None}, "num_updates": 0, "best_loss": None}],
        "task_state": task.state_dict(), "extra_state": {"train_iterator": {"epoch": 1}},
    }
    torch.save(state, path)
    return str(path)


def batch(task, split="test", n=4):
    task.load_dataset(split)
    ds = task.datasets[split]
    return ds.collater([ds[i] for i in range(min(n, len(ds)))])


def hf_logits_on(hf_model, vocab, src_tokens, bos=False):
    """transformers' logits on fairseq-id tokens, as [B, T, V_hf] (tokenizer rows only). HF-backed
    models have no BOS (spec 5): transformers reads columns 1.., and column 0 is their constant
    start row (zero logits); ``bos``: a model trained here from scratch, which reads column 0 too."""
    import torch

    f2h = torch.tensor(vocab.fairseq_to_hf)
    ids = f2h[src_tokens].clamp_min(0)  # right padding (absent pad row) never affects earlier positions
    with torch.no_grad():
        if bos:
            return hf_model(input_ids=ids).logits[..., : vocab.size]
        logits = hf_model(input_ids=ids[:, 1:]).logits[..., : vocab.size]
        return torch.cat([logits.new_zeros(logits.size(0), 1, logits.size(2)), logits], 1)


def in_hf_order(logits, vocab):
    import torch

    return logits[..., torch.tensor(vocab.hf_to_fairseq)]
