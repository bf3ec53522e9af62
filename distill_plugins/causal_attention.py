"""Causal self-attention of fairseq's decoder layers through one ``scaled_dot_product_attention``
call: with ``is_causal`` (FlashAttention on CUDA) instead of an explicit [T, T] mask when there is
no padding.

fairseq 0.12.3's MultiheadAttention hands training and teacher forwards to torch's
``F.multi_head_attention_forward`` with the decoder's float future mask. Two costs follow:

- with a mask, SDPA cannot take the flash kernel (it computes all T x T blocks in the
  memory-efficient kernel, or the math path);
- with padding, ``multi_head_attention_forward`` adds the key-padding mask to the future mask as a
  dense [batch x heads, T, T] tensor in the activations' dtype, which the backward keeps: for
  GPT-2 base at 32 x 512 tokens, 192 MiB per layer.

Here the decoder layers' self-attention (marked when fairseq builds them) computes the same
function: no padding -> ``is_causal=True``; padding -> the future mask with the padded keys set to
-inf, broadcast over heads ([batch, 1, T, T]). Incremental decoding too (a prompt prefill and the
one-token steps, whose fairseq path materialises [batch x heads, T, S] fp32 weights), with the
key/value cache kept in fairseq's layout. A [T, T] mask given to a marked module is taken to be the
decoder's future mask: fairseq's decoder and prompt_prefill.py pass no other. Everything else
(attention weights asked for, encoder-decoder attention, xformers, other masks) goes to fairseq's
own forward.
Same values as fairseq's path (tests/test_causal_attention.py); ``benchmarks/attention.py`` times both.
"""
import torch
import torch.nn.functional as F

_MARK = "_distill_causal_self_attention"
fairseq_forward = None  # MultiheadAttention.forward as fairseq defines it, set by apply()


def apply():
    """Mark the self-attention of every fairseq decoder layer built from now on, and route the
    marked modules' forwards (full sequences, prefills, cached steps) through ``causal_self_attention``."""
    global fairseq_forward
    from fairseq.modules import multihead_attention, transformer_layer

    mha = multihead_attention.MultiheadAttention
    if fairseq_forward is None:
        fairseq_forward = mha.forward
        mha.forward = _forward
        layer = transformer_layer.TransformerDecoderLayerBase
        build = layer.build_self_attention

        def build_self_attention(self, *args, **kwargs):
            attention = build(self, *args, **kwargs)
            setattr(attention, _MARK, True)
            return attention

        layer.build_self_attention = build_self_attention


def _forward(self, query, key, value, key_padding_mask=None, incremental_state=None, need_weights=True,
             static_kv=False, attn_mask=None, before_softmax=False, need_head_weights=False):
    if _applies(self, query, key, value, incremental_state, need_weights, static_kv, attn_mask,
                before_softmax, need_head_weights):
        return causal_self_attention(self, query, key_padding_mask, attn_mask, incremental_state), None
    return fairseq_forward(self, query, key, value, key_padding_mask=key_padding_mask,
                           incremental_state=incremental_state, need_weights=need_weights, static_kv=static_kv,
                           attn_mask=attn_mask, before_softmax=before_softmax, need_head_weights=need_head_weights)


def _applies(self, query, key, value, incremental_state, need_weights, static_kv, attn_mask,
             before_softmax, need_head_weights) -> bool:
    # A decoder layer passes its decoder's future mask (buffered_future_mask) as attn_mask to its
    # self-attention for a full sequence, and so does a prompt prefill (prompt_prefill.py) with an
    # empty cache; one-token incremental steps pass none. Cross-self attention passes another key.
    if not (getattr(self, _MARK, False) and self.self_attention and key is query and value is query
            and not static_kv and not need_weights and not need_head_weights and not before_softmax
            and self.bias_k is None and self.bias_v is None and not self.add_zero_attn
            and not self.use_xformers and not self.onnx_trace and not self.skip_embed_dim_check
            and query.device.type != "xla"):
        return False
    if attn_mask is None:  # a cached step; a full sequence without the future mask is no decoder's
        return incremental_state is not None
    length = query.size(0)
    if attn_mask.shape != (length, length):
        return False
    return incremental_state is None or "prev_key" not in self._get_input_buffer(incremental_state)  # a prefill


def causal_self_attention(self, x, key_padding_mask, future_mask, incremental_state=None):
    """softmax(q k^T / sqrt(d_head) + mask) v for x [T, B, C]. ``future_mask``: the decoder's [T, T]
    mask (0 on and below the diagonal, -inf above) or None (a one-token step); ``key_padding_mask``
    [B, T] (True at pads) for the new tokens. With ``incremental_state``, keys and values are
    appended to its cache in fairseq's own layout, so that fairseq's code can read and reorder it."""
    length, batch, dim = x.shape
    heads = self.num_heads

    def split(t):  # [T, B, C] -> [B, H, T, C / H]
        return t.view(length, batch, heads, dim // heads).permute(1, 2, 0, 3)

    q = split(self.q_proj(x))
    k = split(self.k_proj(x))
    v = split(self.v_proj(x))
    if incremental_state is not None:
        k, v, key_padding_mask = _append_to_cache(self, incremental_state, k, v, key_padding_mask)
    dropout = self.dropout_module.p if (self.training or self.dropout_module.apply_during_inference) else 0.0
    if key_padding_mask is None:
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=future_mask is not None)
    else:
        pads = key_padding_mask.to(torch.bool)[:, None, None, :]
        mask = (future_mask.to(q.dtype)[None, None] if future_mask is not None
                else q.new_zeros(1, 1, 1, k.size(2)))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.masked_fill(pads, float("-inf")),
                                             dropout_p=dropout)
    return self.out_proj(out.permute(2, 0, 1, 3).reshape(length, batch, dim))


def _append_to_cache(self, incremental_state, k, v, key_padding_mask):
    """fairseq's incremental self-attention cache: prev_key / prev_value [B, H, S, C / H] and
    prev_key_padding_mask [B, S] (merged by fairseq's own rule), with the new keys appended."""
    saved = self._get_input_buffer(incremental_state)
    if "prev_key" in saved:
        k = torch.cat([saved["prev_key"], k], dim=2)
        v = torch.cat([saved["prev_value"], v], dim=2)
    else:
        k, v = k.contiguous(), v.contiguous()
    key_padding_mask = type(self)._append_prev_key_padding_mask(
        key_padding_mask=key_padding_mask, prev_key_padding_mask=saved.get("prev_key_padding_mask"),
        batch_size=k.size(0), src_len=k.size(2), static_kv=False)
    saved["prev_key"], saved["prev_value"], saved["prev_key_padding_mask"] = k, v, key_padding_mask
    self._set_input_buffer(incremental_state, saved)
    return k, v, key_padding_mask
