"""The decoder's self-attention per KD step: fairseq's own forward (torch's multi_head_attention_forward
with an explicit future mask, and with padding a dense [batch x heads, T, T] mask) against
causal_attention.py (SDPA with is_causal, or a [batch, 1, T, T] mask with padding), in one run.

    python benchmarks/attention.py --device cpu --preset cpu-small
    python benchmarks/attention.py --device cuda --preset gpt2-xl-base     # bf16, 32 x 512 tokens

Cases as the KD step runs them, each over all layers of the model (one attention module applied
layer after layer, so the student's backward keeps every layer's tensors): the teacher's forward
(no grad) and the student's forward + backward, each on full-length sequences and on padded ones
(lengths drawn uniformly from [T/4, T], as instruction data has). Reported: median time, tokens/s,
extra peak memory (``measure.py``) and ours/fairseq's ratios; and the largest output difference.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import measure  # noqa: E402

PRESETS = {
    # name: sequences, length, (teacher layers, dim, heads), (student layers, dim, heads), dtype
    "gpt2-xl-base": (32, 512, (48, 1600, 25), (12, 768, 12), "bf16"),
    "cpu-small": (8, 256, (4, 256, 4), (2, 128, 2), "fp32"),
    "cpu-tiny": (2, 32, (2, 32, 2), (1, 16, 2), "fp32"),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def main(argv=None):
    args = measure.arguments(__doc__, PRESETS).parse_args(argv)
    device = measure.device_of(args.device)
    import distill_plugins  # noqa: F401  (compat.apply: causal_attention installed)
    from fairseq.modules import MultiheadAttention

    from distill_plugins import causal_attention

    batch, length, teacher, student, dt = PRESETS[args.preset]
    dtype = DTYPES[dt]
    torch.manual_seed(0)
    future = torch.triu(torch.full((length, length), float("-inf"), device=device), 1).to(dtype)
    lengths = torch.randint(length // 4, length + 1, (batch,))
    lengths[0] = length
    paddings = {"full length": None,
                "padded": (torch.arange(length)[None, :] >= lengths[:, None]).to(device)}

    def module(dim, heads):
        m = MultiheadAttention(dim, heads, dropout=0.0, self_attention=True).to(device, dtype)
        setattr(m, causal_attention._MARK, True)  # as a decoder layer's build_self_attention does
        return m

    t_layers, t_dim, t_heads = teacher
    s_layers, s_dim, s_heads = student
    t_attn = module(t_dim, t_heads).eval()
    s_attn = module(s_dim, s_heads).train()  # dropout 0: the same function, for the difference
    x_t = torch.randn(length, batch, t_dim, device=device, dtype=dtype)
    x_s = torch.randn(length, batch, s_dim, device=device, dtype=dtype, requires_grad=True)

    def layers_forward(forward, attn, x, n, kpm):
        for _ in range(n):
            x = x + forward(attn, x, x, x, key_padding_mask=kpm, attn_mask=future, need_weights=False)[0]
        return x

    def teacher_forward(forward, kpm):
        with torch.no_grad():
            return layers_forward(forward, t_attn, x_t, t_layers, kpm)

    def student_step(forward, kpm):
        x_s.grad = None
        s_attn.zero_grad(set_to_none=True)
        out = layers_forward(forward, s_attn, x_s, s_layers, kpm)
        out.float().pow(2).mean().backward()
        return out

    impls = {"fairseq": causal_attention.fairseq_forward, "ours": causal_attention._forward}
    results, ratios, diffs = {}, {}, {}
    for part, run in (("teacher forward", teacher_forward), ("student forward+backward", student_step)):
        for pad_name, kpm in paddings.items():
            case = f"{part}, {pad_name}"
            outs = {}
            for name, forward in impls.items():
                wall, cpu = measure.time_call(lambda: run(forward, kpm), device, args.warmup, args.repeats)
                seconds = wall if device.type == "cuda" else cpu
                peak = measure.peak_extra_bytes(lambda: run(forward, kpm), device)
                outs[name] = run(forward, kpm).detach().float()
                results[f"{case}: {name}"] = {"case": case, "impl": name, "time_ms": seconds * 1e3,
                                              "tokens_per_s": batch * length / seconds,
                                              "peak_extra_mib": peak / measure.MiB}
            keep = torch.ones(length, batch, dtype=torch.bool, device=device) if kpm is None else ~kpm.t()
            diffs[case] = (outs["ours"] - outs["fairseq"])[keep].abs().max().item()
            ref, ours = results[f"{case}: fairseq"], results[f"{case}: ours"]
            ratios[f"{case}: tokens/s ours/fairseq"] = ours["tokens_per_s"] / ref["tokens_per_s"]
            ratios[f"{case}: memory ours/fairseq"] = (ours["peak_extra_mib"] / ref["peak_extra_mib"]
                                                      if ref["peak_extra_mib"] else None)
    print(f"decoder self-attention per KD step: {batch} x {length} tokens (padded: lengths {lengths.tolist()}), "
          f"teacher {t_layers} x {t_dim} ({t_heads} heads), student {s_layers} x {s_dim} ({s_heads} heads), {dt}, "
          f"on {device} ({'wall' if device.type == 'cuda' else 'process CPU'} time); "
          f"max |ours - fairseq| on non-pad rows {max(diffs.values()):.3g}\n")
    print(measure.markdown_table(list(results.values()), [
        ("case", "case", None), ("impl", "impl", None), ("time ms", "time_ms", "{:.2f}"),
        ("tokens/s", "tokens_per_s", "{:,.0f}"), ("extra peak MiB", "peak_extra_mib", "{:.1f}"),
    ]))
    print("\n" + "\n".join(f"{k}: {v:.3f}" for k, v in ratios.items() if v is not None))
    measure.write_json(args.json, {"benchmark": "attention", "preset": args.preset, "dtype": dt,
                                   "machine": measure.environment(device), "lengths": lengths.tolist(),
                                   "max_abs_difference": diffs, "results": results, "ratios": ratios})


if __name__ == "__main__":
    main()
