"""GPT-2-shaped decoder-only LMs on fairseq's ``transformer_lm``, from CPU-test size to GPT-2 XL.

GPT-2's choices: pre-LayerNorm blocks with a final LayerNorm, learned positions (1024), tanh-GELU
(fairseq's ``gelu_accurate`` = HF ``gelu_new``), unscaled embeddings tied with the output layer,
dropout 0.1. Each ``--arch kd_gpt2_<size>`` only sets defaults; any ``--decoder-*`` flag overrides.

| arch            | layers | dim  | heads | ffn  | params (50k vocab)     |
|-----------------|--------|------|-------|------|------------------------|
| kd_gpt2_tiny    | 2      | 128  | 2     | 512  | CPU tests              |
| kd_gpt2_mini    | 4      | 256  | 4     | 1024 | CPU examples           |
| kd_gpt2_base    | 12     | 768  | 12    | 3072 | 124M (GPT-2)           |
| kd_gpt2_medium  | 24     | 1024 | 16    | 4096 | 355M (GPT-2 medium)    |
| kd_gpt2_large   | 36     | 1280 | 20    | 5120 | 774M (GPT-2 large)     |
| kd_gpt2_xl      | 48     | 1600 | 25    | 6400 | 1.56B (GPT-2 XL)       |
"""
from fairseq.models import register_model_architecture
from fairseq.models.transformer_lm import base_lm_architecture
from fairseq.utils import safe_getattr

GPT2_SHAPES = {
    # name: (layers, dim, heads)
    "tiny": (2, 128, 2),
    "mini": (4, 256, 4),
    "base": (12, 768, 12),
    "medium": (24, 1024, 16),
    "large": (36, 1280, 20),
    "xl": (48, 1600, 25),
}


def gpt2_defaults(args, layers: int, dim: int, heads: int):
    args.decoder_layers = safe_getattr(args, "decoder_layers", layers)
    args.decoder_embed_dim = safe_getattr(args, "decoder_embed_dim", dim)
    args.decoder_attention_heads = safe_getattr(args, "decoder_attention_heads", heads)
    args.decoder_ffn_embed_dim = safe_getattr(args, "decoder_ffn_embed_dim", 4 * dim)
    args.decoder_learned_pos = safe_getattr(args, "decoder_learned_pos", True)
    args.decoder_normalize_before = safe_getattr(args, "decoder_normalize_before", True)
    args.no_scale_embedding = safe_getattr(args, "no_scale_embedding", True)
    args.share_decoder_input_output_embed = safe_getattr(
        args, "share_decoder_input_output_embed", True
    )
    args.activation_fn = safe_getattr(args, "activation_fn", "gelu_accurate")
    args.dropout = safe_getattr(args, "dropout", 0.1)
    args.attention_dropout = safe_getattr(args, "attention_dropout", 0.1)
    args.activation_dropout = safe_getattr(args, "activation_dropout", 0.0)
    if safe_getattr(args, "max_target_positions", None) is None:
        args.max_target_positions = 1024
    base_lm_architecture(args)


def _register(size: str, shape):
    @register_model_architecture("transformer_lm", f"kd_gpt2_{size}")
    def arch(args):
        gpt2_defaults(args, *shape)

    arch.__name__ = f"kd_gpt2_{size}"
    return arch


for _size, _shape in GPT2_SHAPES.items():
    _register(_size, _shape)
