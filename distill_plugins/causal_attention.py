"""Causal self-attention of fairseq's decoder layers through one ``scaled_dot_product_attention``
call with ``is_causal`` (FlashAttention on CUDA) instead of an explicit [T, T] mask.

fairseq 0.12.3's MultiheadAttention hands training and teacher forwards to torch's
``F.multi_head_attention_forward`` with the decoder's float future mask. Two costs follow:

- with a mask, SDPA cannot take the flash kernel (it computes all T x T blocks in the
  memory-efficient kernel, or the math path);
- with padding, ``multi_head_attention_forward`` adds the key-padding mask to the future mask as a
  dense [batch x heads, T, T] tensor in the activations' dtype, which the backward keeps: for
  GPT-2 base at 32 x 512 tokens, 192 MiB per layer.

Here the decoder layers' self-attention (marked when fairseq builds them) computes the same
function: no padding -> ``is_causal=True``; padding -> the future mask with the padded keys set to
-inf, broadcast over heads ([batch, 1, T, T]). Everything else (incremental decoding, attention
weights asked for, encoder-decoder attention, xformers, other masks) goes to fairseq's own forward.
Same values as fairseq's path (tests/test_causal_attention.py); ``benchmarks/attention.py`` times both.
"""
import torch
import torch.nn.functional as F

_MARK = "_distill_causal_self_attention"
fairseq_forward = None  # MultiheadAttention.forward as fairseq defines it, set by apply()


def apply():
    """Mark the self-attention of every fairseq decoder layer built from now on, and route the
    marked modules' full-sequence forwards through ``causal_self_attention``."""
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
        return causal_self_attention(self, query, key_padding_mask, attn_mask), None
    return fairseq_forward(self, query, key, value, key_padding_mask=key_padding_mask,
                           incremental_state=incremental_state, need_weights=need_weights, static_kv=static_kv,
                           attn_mask=attn_mask, before_softmax=before_softmax, need_head_weights=need_head_weights)


def _applies(self, query, key, value, incremental_state, need_weights, static_kv, attn_mask,
             before_softmax, need_head_weights) -> bool:
    # A decoder layer passes its decoder's future mask (buffered_future_mask) as attn_mask to its
    # self-attention whenever incremental_state is None; cross-self attention passes another key.
    return (getattr(self, _MARK, False) and self.self_attention and key is query and value is query
            and incremental_state is None and not static_kv and not need_weights and not need_head_weights
            and not before_softmax and attn_mask is not None and attn_mask.dim() == 2
            and attn_mask.shape == (query.size(0), query.size(0))
            and self.bias_k is None and self.bias_v is None and not self.add_zero_attn
            and not self.use_xformers and not self.onnx_trace and not self.skip_embed_dim_check
            and query.device.type != "xla")


def causal_self_attention(self, x, key_padding_mask, future_mask):
    """softmax(q k^T / sqrt(d_head) + mask) v for x [T, B, C]; ``future_mask`` is the decoder's [T, T]
    mask (0 on and below the diagonal, -inf above), ``key_padding_mask`` [B, T] is True at pads."""
    length, batch, dim = x.shape
    heads = self.num_heads

    def split(t):  # [T, B, C] -> [B, H, T, C / H]
        return t.view(length, batch, heads, dim // heads).permute(1, 2, 0, 3)

    q = split(self.q_proj(x))
    k = split(self.k_proj(x))
    v = split(self.v_proj(x))
    dropout = self.dropout_module.p if (self.training or self.dropout_module.apply_during_inference) else 0.0
    if key_padding_mask is None:
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
    else:
        pads = key_padding_mask.to(torch.bool)[:, None, None, :]
        mask = future_mask.to(q.dtype)[None, None].masked_fill(pads, float("-inf"))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
    return self.out_proj(out.permute(2, 0, 1, 3).reshape(length, batch, dim))
