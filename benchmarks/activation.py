"""GPT-2's GELU in the MLP of every kd_gpt2 layer: fairseq's gelu_accurate (the reference, 8
elementwise ops) against the fused op that compat.py puts in its place, in one run.

    python benchmarks/activation.py --device cpu --preset cpu-small
    python benchmarks/activation.py --device cuda --preset gpt2-xl-base     # bf16, 16,384 tokens

Two cases per preset, as the KD step runs them: the teacher's MLP activation forward only (no grad,
[tokens, 4 d_teacher]) and the student's forward + backward ([tokens, 4 d_student]); each is
multiplied by the number of layers, so the times are per step. Reported: median time, extra peak
memory (``measure.py``), the bytes floor (the input read and the output written once, plus for the
backward the incoming gradient read and the input gradient written) and the ratios.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import measure  # noqa: E402

PRESETS = {
    # name: tokens, (teacher layers, dim), (student layers, dim), dtype
    "gpt2-xl-base": (16384, (48, 1600), (12, 768), "bf16"),
    "cpu-small": (2048, (4, 256), (2, 128), "fp32"),
    "cpu-tiny": (256, (2, 128), (1, 64), "fp32"),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def original_gelu_accurate():
    """fairseq's own function, whatever compat.py did to the module attribute."""
    import importlib.util

    import fairseq

    path = os.path.join(os.path.dirname(fairseq.__file__), "modules", "gelu.py")
    spec = importlib.util.spec_from_file_location("fairseq_gelu_original", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.gelu_accurate


def main(argv=None):
    args = measure.arguments(__doc__, PRESETS).parse_args(argv)
    device = measure.device_of(args.device)
    from distill_plugins.compat import gelu_tanh

    reference = original_gelu_accurate()
    tokens, (t_layers, t_dim), (s_layers, s_dim), dt = PRESETS[args.preset]
    dtype = DTYPES[dt]
    b = torch.finfo(dtype).bits // 8
    bandwidth = measure.copy_bandwidth(device, 1 << (31 if device.type == "cuda" else 28))
    torch.manual_seed(0)
    x_t = torch.randn(tokens, 4 * t_dim, device=device).to(dtype)
    x_s = torch.randn(tokens, 4 * s_dim, device=device).to(dtype).requires_grad_()
    g_s = torch.randn_like(x_s)

    def teacher_forward(fn):
        with torch.no_grad():
            for _ in range(t_layers):
                fn(x_t)

    def student_step(fn):
        for _ in range(s_layers):
            x_s.grad = None
            fn(x_s).backward(g_s)

    cases = {
        "teacher forward": (teacher_forward, t_layers * 2 * x_t.numel() * b),
        "student forward+backward": (student_step, s_layers * 4 * x_s.numel() * b),
    }
    results, ratios = {}, {}
    for case, (run, floor_bytes) in cases.items():
        for name, fn in (("reference", reference), ("fused", gelu_tanh)):
            wall, cpu = measure.time_call(lambda: run(fn), device, args.warmup, args.repeats)
            seconds = wall if device.type == "cuda" else cpu
            peak = measure.peak_extra_bytes(lambda: run(fn), device)
            results[f"{case}: {name}"] = {"case": case, "impl": name, "time_ms": seconds * 1e3,
                                          "peak_extra_mib": peak / measure.MiB,
                                          "floor_ms": floor_bytes / bandwidth * 1e3,
                                          "x_floor": wall / (floor_bytes / bandwidth)}  # the floor is wall time
        ref, ours = results[f"{case}: reference"], results[f"{case}: fused"]
        ratios[f"{case}: time fused/reference"] = ours["time_ms"] / ref["time_ms"]
        ratios[f"{case}: memory fused/reference"] = (ours["peak_extra_mib"] / ref["peak_extra_mib"]
                                                     if ref["peak_extra_mib"] else None)
    with torch.no_grad():
        diff = (gelu_tanh(x_t).float() - reference(x_t).float()).abs().max().item()
    print(f"GPT-2 GELU per KD step: {tokens} tokens, teacher {t_layers} x 4*{t_dim}, student {s_layers} x 4*{s_dim}, "
          f"{dt}, on {device} ({'wall' if device.type == 'cuda' else 'process CPU'} time; x floor: wall time over the "
          f"bytes at the copy bandwidth "
          f"{bandwidth / 1e9:.1f} GB/s); max |fused - reference| {diff:.3g}\n")
    print(measure.markdown_table(list(results.values()), [
        ("case", "case", None), ("impl", "impl", None), ("time ms", "time_ms", "{:.2f}"),
        ("extra peak MiB", "peak_extra_mib", "{:.1f}"), ("floor ms", "floor_ms", "{:.3f}"), ("x floor", "x_floor", "{:.1f}"),
    ]))
    print("\n" + "\n".join(f"{k}: {v:.3f}" for k, v in ratios.items() if v is not None))
    measure.write_json(args.json, {"benchmark": "activation", "preset": args.preset, "dtype": dt,
                                   "machine": {**measure.environment(device), "copy_bandwidth_gb_s": bandwidth / 1e9},
                                   "max_abs_difference": diff, "results": results, "ratios": ratios})


if __name__ == "__main__":
    main()
