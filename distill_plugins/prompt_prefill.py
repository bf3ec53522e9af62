"""One decoder step over left-padded rows: a whole prompt at once (prefill), then a token per step.

fairseq's incremental decoding feeds one token per call (``TransformerDecoder`` slices its input to
the last token and gives every row the same position), so a prompt must be forced token by token.
``decoder_step`` instead takes ``[B, T]`` new tokens of left-padded rows with explicit per-row
positions and the padding mask of everything seen so far, and keeps the key/value cache in the
usual fairseq ``incremental_state`` (so fairseq's ``reorder_incremental_state_scripting`` drops
finished rows). Supported: fairseq's ``TransformerDecoder`` (``transformer_lm``, ``kd_gpt2_*``,
converted GPT-2) with learned or sinusoidal positions, ``hf_causal_lm`` and ``MixtureLM``'s decoder
(each member's step, then the log-mixture); anything else keeps fairseq's forcing generator.

Left padding: a padded query sees no key at all, which gives NaN rows inside attention; they are
zeroed after every layer, so the cached keys/values of padded positions stay finite and are then
masked for every real query (0 x NaN would otherwise poison the real rows).
"""
from typing import Dict, Optional

import torch
from fairseq.models.transformer import TransformerDecoderBase
from fairseq.modules import LearnedPositionalEmbedding, SinusoidalPositionalEmbedding


def supports_prefill(decoder) -> bool:
    if hasattr(decoder, "prefill_step"):
        return decoder.supports_prefill()
    if not isinstance(decoder, TransformerDecoderBase):
        return False
    plain = (decoder.adaptive_softmax is None and decoder.quant_noise is None and not decoder.cross_self_attention)
    positions = decoder.embed_positions
    return plain and (positions is None or isinstance(positions, (LearnedPositionalEmbedding,
                                                                  SinusoidalPositionalEmbedding)))


def decoder_step(decoder, tokens: torch.Tensor, padding: torch.Tensor, positions: torch.Tensor,
                 incremental_state: Dict, last_only: bool = True) -> torch.Tensor:
    """Logits ``[B, T or 1, V]`` for ``tokens`` ``[B, T]`` appended to the cached rows.

    ``padding``: ``[B, S]`` bool, True at padded positions of all S tokens so far (the new ones
    last); ``positions``: ``[B, T]`` 0-based index of each new token among its row's real tokens.
    With ``T > 1`` the cache must be empty (a prefill). ``last_only``: logits of the last position.
    """
    if hasattr(decoder, "prefill_step"):
        return decoder.prefill_step(tokens, padding, positions, incremental_state, last_only)
    return fairseq_decoder_step(decoder, tokens, padding, positions, incremental_state, last_only)


def _position_embeddings(module, positions: torch.Tensor, padded: torch.Tensor) -> torch.Tensor:
    # fairseq numbers positions from padding_idx + 1; padded slots get padding_idx (as make_positions)
    index = (positions + module.padding_idx + 1).masked_fill(padded, module.padding_idx)
    if isinstance(module, LearnedPositionalEmbedding):
        return torch.nn.functional.embedding(index, module.weight, module.padding_idx)
    needed = int(index.max()) + 1
    weights = module.weights
    if needed > weights.size(0):  # as fairseq: computed on the fly past the precomputed table
        weights = SinusoidalPositionalEmbedding.get_embedding(needed, module.embedding_dim,
                                                              module.padding_idx).to(weights)
    return weights.index_select(0, index.reshape(-1)).view(*index.shape, -1).detach()


def fairseq_decoder_step(decoder: TransformerDecoderBase, tokens, padding, positions, incremental_state,
                          last_only: bool):
    new_padding = padding[:, -tokens.size(1):]
    x = decoder.embed_scale * decoder.embed_tokens(tokens)
    if decoder.project_in_dim is not None:
        x = decoder.project_in_dim(x)
    if decoder.embed_positions is not None:
        x = x + _position_embeddings(decoder.embed_positions, positions, new_padding).to(x)
    if decoder.layernorm_embedding is not None:
        x = decoder.layernorm_embedding(x)
    x = decoder.dropout_module(x).transpose(0, 1)  # T x B x C
    causal = decoder.buffered_future_mask(x) if tokens.size(1) > 1 else None
    key_padding: Optional[torch.Tensor] = new_padding if bool(new_padding.any()) else None
    for layer in decoder.layers:
        x, _, _ = layer(x, None, None, incremental_state, self_attn_mask=causal,
                        self_attn_padding_mask=key_padding)
        if key_padding is not None:
            x = x.masked_fill(key_padding.t().unsqueeze(-1), 0.0)
    if last_only:
        x = x[-1:]
    if decoder.layer_norm is not None:
        x = decoder.layer_norm(x)
    x = x.transpose(0, 1)
    if decoder.project_out_dim is not None:
        x = decoder.project_out_dim(x)
    return decoder.output_layer(x)
