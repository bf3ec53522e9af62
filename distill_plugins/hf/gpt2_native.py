"""GPT-2 <-> fairseq ``transformer_lm``: an exact conversion, both ways.

GPT-2 is fairseq's pre-LayerNorm decoder with a final LayerNorm, learned positions, tanh-GELU
(HF ``gelu_new`` = fairseq ``gelu_accurate``), 1/sqrt(d_head) attention scaling, biases everywhere
and the output layer tied to unscaled token embeddings (``kd_gpt2_*`` in ``models/gpt2_family.py``).
Differences are only in layout:

* HF ``Conv1D`` stores ``W`` as [in, out] (y = x W + b); fairseq ``nn.Linear`` stores [out, in];
  ``c_attn`` is q, k and v concatenated along ``out``.
* fairseq's learned positions are offset by ``padding_idx + 1 = 2`` (rows 0-1 unused), so HF
  position t is fairseq row t + 2 and the table has ``n_positions + 2`` rows.
* token rows are permuted between HF ids and the fairseq dictionary (``hf/vocab.py``).
"""
import argparse
from typing import Dict, Optional

import torch

from ..errors import DistillError
from .vocab import HFVocab

POS_OFFSET = 2  # fairseq LearnedPositionalEmbedding: padding_idx (1) + 1
ACTIVATIONS = {"gelu_new": "gelu_accurate", "gelu_pytorch_tanh": "gelu_accurate", "gelu": "gelu", "relu": "relu"}


def native_incompatibility(config) -> Optional[str]:
    """Why a GPT-2 config cannot run as fairseq transformer_lm, or None if it can exactly."""
    if config.model_type != "gpt2":
        return f"model_type {config.model_type} is not gpt2"
    checks = [
        (config.activation_function in ACTIVATIONS, f"activation {config.activation_function}"),
        (abs(config.layer_norm_epsilon - 1e-5) < 1e-12, f"layer_norm_epsilon {config.layer_norm_epsilon}"),
        (config.scale_attn_weights, "scale_attn_weights=False"),
        (not config.scale_attn_by_inverse_layer_idx, "scale_attn_by_inverse_layer_idx"),
        (getattr(config, "tie_word_embeddings", True), "untied embeddings"),
        (not getattr(config, "add_cross_attention", False), "cross attention"),
    ]
    bad = [msg for ok, msg in checks if not ok]
    return ", ".join(bad) if bad else None


def fairseq_args(config) -> argparse.Namespace:
    """transformer_lm arguments of a GPT-2 config (``gpt2_defaults`` fills the rest)."""
    from ..models.gpt2_family import gpt2_defaults

    args = argparse.Namespace(
        decoder_ffn_embed_dim=config.n_inner or 4 * config.n_embd,
        max_target_positions=config.n_positions,
        activation_fn=ACTIVATIONS[config.activation_function],
        dropout=config.resid_pdrop,
        attention_dropout=config.attn_pdrop,
        activation_dropout=0.0,
    )
    gpt2_defaults(args, config.n_layer, config.n_embd, config.n_head)
    return args


def _strip(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """GPT2LMHeadModel keys ``transformer.h.0...`` and GPT2Model keys ``h.0...`` alike."""
    return {k[len("transformer."):] if k.startswith("transformer.") else k: v for k, v in state.items()}


class _Reads:
    """A state dict whose tensors are read once each: a missing one, or one left unread, is a one-line
    error (in an import, a config with fewer layers than the weights would otherwise truncate them)."""

    def __init__(self, state: Dict[str, torch.Tensor], needs: str, fix: str):
        self.s, self.used, self.needs, self.fix = state, set(), needs, fix

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.s:
            raise DistillError(f"the weights have no {key}, which {self.needs} needs; {self.fix}")
        self.used.add(key)
        return self.s[key]

    def check_all_used(self, unused_ok):
        extra = sorted(k for k in set(self.s) - self.used if not unused_ok(k))
        if extra:
            more = f" and {len(extra) - 3} more" if len(extra) > 3 else ""
            raise DistillError(f"the weights hold tensors that {self.needs} does not use: {', '.join(extra[:3])}{more}; "
                               f"{self.fix}")


def hf_to_fairseq(state: Dict[str, torch.Tensor], config, vocab: HFVocab) -> Dict[str, torch.Tensor]:
    """GPT-2 weights -> fairseq TransformerLanguageModel state dict (``decoder.*``); every tensor of
    ``state`` must be used (transformers' ignorable buffers and a tied ``lm_head`` aside)."""
    from .checkpoint_dir import ignored_extra_keys

    s = _Reads(_strip(state), f"config.json's GPT-2 (n_layer {config.n_layer})", "config.json and the weights disagree")
    d = config.n_embd
    out = {}
    emb_hf = s["wte.weight"]
    emb = vocab.to_fairseq_rows(emb_hf)
    out["decoder.embed_tokens.weight"] = emb
    out["decoder.output_projection.weight"] = emb
    wpe = s["wpe.weight"]
    pos = torch.zeros(wpe.size(0) + POS_OFFSET, d, dtype=wpe.dtype)
    pos[POS_OFFSET:] = wpe
    out["decoder.embed_positions.weight"] = pos
    for i in range(config.n_layer):
        h, f = f"h.{i}.", f"decoder.layers.{i}."
        w, b = s[h + "attn.c_attn.weight"].t(), s[h + "attn.c_attn.bias"]
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            out[f + f"self_attn.{name}.weight"] = w[j * d:(j + 1) * d].contiguous()
            out[f + f"self_attn.{name}.bias"] = b[j * d:(j + 1) * d].clone()
        pairs = [("attn.c_proj", "self_attn.out_proj"), ("mlp.c_fc", "fc1"), ("mlp.c_proj", "fc2")]
        for hf_name, fs_name in pairs:
            out[f + fs_name + ".weight"] = s[h + hf_name + ".weight"].t().contiguous()
            out[f + fs_name + ".bias"] = s[h + hf_name + ".bias"].clone()
        for hf_name, fs_name in (("ln_1", "self_attn_layer_norm"), ("ln_2", "final_layer_norm")):
            out[f + fs_name + ".weight"] = s[h + hf_name + ".weight"].clone()
            out[f + fs_name + ".bias"] = s[h + hf_name + ".bias"].clone()
    out["decoder.layer_norm.weight"] = s["ln_f.weight"].clone()
    out["decoder.layer_norm.bias"] = s["ln_f.bias"].clone()
    ignored = ignored_extra_keys()
    s.check_all_used(lambda k: bool(ignored.search(k)) or (k == "lm_head.weight" and torch.equal(s.s[k], emb_hf)))
    # Without it fairseq's upgrade_state_dict takes the weights for a pre-2019 checkpoint and
    # silently drops the final LayerNorm.
    out["decoder.version"] = torch.Tensor([3])
    return out


def fairseq_to_hf(state: Dict[str, torch.Tensor], n_layer: int, vocab: HFVocab) -> Dict[str, torch.Tensor]:
    """fairseq transformer_lm state dict (LoRA merged) -> GPT2LMHeadModel weights (HF vocabulary)."""
    s = _Reads(state, "GPT-2", "this transformer_lm is not GPT-2-shaped; export supports the kd_gpt2_* architectures "
               "and hf_causal_lm models")
    out = {}
    wte = vocab.to_hf_rows(s["decoder.embed_tokens.weight"])
    out["transformer.wte.weight"] = wte
    out["lm_head.weight"] = wte
    out["transformer.wpe.weight"] = s["decoder.embed_positions.weight"][POS_OFFSET:].clone()
    for i in range(n_layer):
        h, f = f"transformer.h.{i}.", f"decoder.layers.{i}."
        qkv = [s[f + f"self_attn.{n}_proj.weight"] for n in "qkv"]
        out[h + "attn.c_attn.weight"] = torch.cat(qkv, 0).t().contiguous()
        out[h + "attn.c_attn.bias"] = torch.cat([s[f + f"self_attn.{n}_proj.bias"] for n in "qkv"], 0)
        pairs = [("attn.c_proj", "self_attn.out_proj"), ("mlp.c_fc", "fc1"), ("mlp.c_proj", "fc2")]
        for hf_name, fs_name in pairs:
            out[h + hf_name + ".weight"] = s[f + fs_name + ".weight"].t().contiguous()
            out[h + hf_name + ".bias"] = s[f + fs_name + ".bias"].clone()
        for hf_name, fs_name in (("ln_1", "self_attn_layer_norm"), ("ln_2", "final_layer_norm")):
            out[h + hf_name + ".weight"] = s[f + fs_name + ".weight"].clone()
            out[h + hf_name + ".bias"] = s[f + fs_name + ".bias"].clone()
    out["transformer.ln_f.weight"] = s["decoder.layer_norm.weight"].clone()
    out["transformer.ln_f.bias"] = s["decoder.layer_norm.bias"].clone()
    tied = s["decoder.embed_tokens.weight"]
    s.check_all_used(lambda k: k == "decoder.version" or (k == "decoder.output_projection.weight"
                                                          and torch.equal(state[k], tied)))
    return out


def gpt2_config_for(args, vocab: HFVocab, base=None):
    """The GPT2Config of a fairseq transformer_lm (``base``: the config it was imported from)."""
    from transformers import GPT2Config

    inverse = {"gelu_accurate": "gelu_new", "gelu": "gelu", "relu": "relu"}
    problems = [
        (getattr(args, "decoder_learned_pos", False) and not getattr(args, "no_token_positional_embeddings", False),
         "learned positions"),
        (getattr(args, "decoder_normalize_before", False), "pre-LayerNorm"),
        (getattr(args, "no_scale_embedding", False), "unscaled embeddings"),
        (getattr(args, "share_decoder_input_output_embed", False), "tied output layer"),
        (not getattr(args, "layernorm_embedding", False), "no embedding LayerNorm"),
        (not getattr(args, "no_decoder_final_norm", False), "a final LayerNorm"),
        (getattr(args, "activation_fn", "relu") in inverse, "a gelu/relu activation"),
        (not getattr(args, "adaptive_softmax_cutoff", None), "no adaptive softmax"),
    ]
    missing = [m for ok, m in problems if not ok]
    if missing:
        from ..errors import DistillError

        raise DistillError(
            "this transformer_lm is not GPT-2-shaped (needs " + ", ".join(missing) + "); export supports the "
            "kd_gpt2_* architectures and hf_causal_lm models"
        )
    params = base.to_dict() if base is not None else {}
    params.update(
        vocab_size=vocab.size, n_positions=args.max_target_positions, n_embd=args.decoder_embed_dim,
        n_layer=args.decoder_layers, n_head=args.decoder_attention_heads, n_inner=args.decoder_ffn_embed_dim,
        activation_function=inverse[args.activation_fn],
    )
    for key in ("model_type", "architectures", "transformers_version"):
        params.pop(key, None)
    return GPT2Config(**params)
