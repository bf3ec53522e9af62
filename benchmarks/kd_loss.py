"""Loss-only micro-benchmark: forward + backward of the KD loss on N x V logits, per implementation.

    python benchmarks/kd_loss.py --device cpu --preset cpu-2k-8k --json loss.json
    python benchmarks/kd_loss.py --device cuda --preset gpt2-16k --json loss.json   # 16384 x 50257 bf16

Implementations (same inputs, ``--kd-ratio`` r, loss = (1 - r) CE + r D summed over the N tokens):
* ``reference``: the plain approach of the reference code (DistiLLM's forward KL): fp32 softmax of
  the teacher and log_softmax of the student over the full [N, V], masked product, sum. Forward KL
  only (it ignores ``--divergence``).
* ``plain``: our criterion's ``--kd-impl plain`` (``chunked_divergences.plain_kd_loss``).
* ``chunked``: ``--kd-impl chunked`` on the same logits.
* ``fused``: ``--kd-impl fused``: hidden [N, d] and output weight [V, d] in, logits made per chunk;
  it also does the output projection's 3 matmuls (6 N V d FLOPs) that the others leave out.
* ``triton`` (CUDA): the Triton kernel (``triton_kd``) that --kd-impl chunked/fused run per chunk on
  a GPU, here on the whole [N, V] at once; ``triton_tile``: the same with ``tile_max`` (one running
  maximum per row in pass 1; benchmarks/triton_sass.py counts its instructions).

Reported: median time, extra peak memory (see ``measure.py``), the bytes floor (student logits read +
their gradient written + teacher logits read, in their dtype; for ``fused`` hidden, weight and their
gradients instead of the student logits, and the matmul FLOPs at the peak rate if that is longer)
at the measured copy bandwidth, and time / floor.
"""
import argparse
import functools
import inspect
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import measure  # noqa: E402
from distill_plugins.chunked_divergences import (  # noqa: E402
    DEFAULT_CHUNK_SIZE, chunked_kd_loss, forward_kl_loss_and_grad, fused_kd_loss, plain_kd_loss,
    reverse_kl_loss_and_grad,
)
from distill_plugins import triton_kd  # noqa: E402
from distill_plugins.divergences import DIVERGENCES  # noqa: E402

PRESETS = {
    # name: tokens, vocab, hidden dim, dtype
    "cpu-tiny": (256, 1024, 64, "fp32"),
    "cpu-2k-8k": (2048, 8192, 256, "fp32"),
    "gpt2-16k": (16384, 50257, 768, "bf16"),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
IMPLS = ("reference", "plain", "chunked", "fused", "triton", "triton_tile")
GPU_IMPLS = ("triton", "triton_tile")


def reference_loss(student, teacher, labels, kd_ratio):
    """Forward KL as the reference code computes it: -sum p log q with fp32 softmaxes of the full
    logits, inf entries of the student zeroed, plus the CE term when kd_ratio < 1."""
    p = torch.softmax(teacher, dim=-1, dtype=torch.float32)
    log_q = torch.log_softmax(student, dim=-1, dtype=torch.float32)
    kd = -(p * log_q).masked_fill(torch.isinf(student), 0.0).sum()
    if kd_ratio == 1.0:
        return kd
    ce = F.cross_entropy(student.float(), labels, reduction="sum")
    return (1.0 - kd_ratio) * ce + kd_ratio * kd


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu-tiny")
    ap.add_argument("--tokens", type=int, help="N (overrides the preset)")
    ap.add_argument("--vocab", type=int, help="V (overrides the preset)")
    ap.add_argument("--hidden", type=int, help="d of the fused form (overrides the preset)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), help="logits dtype (overrides the preset)")
    ap.add_argument("--divergence", choices=sorted(DIVERGENCES), default="forward_kl")
    ap.add_argument("--kd-ratio", type=float, default=1.0, help="r; 1.0 = KD term only, as the anchor")
    ap.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE)
    ap.add_argument("--no-analytic", action="store_true",
                    help="forward and reverse KL by autograd per chunk too (as the other divergences)")
    ap.add_argument("--compile", action="store_true", help="chunked/fused: the torch.compile'd forward-KL kernel")
    ap.add_argument("--impls", help="comma-separated subset of " + ",".join(IMPLS) + " (default: all; "
                                    + ", ".join(GPU_IMPLS) + " only on cuda)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--peak-flops", type=float, help="FLOP/s for the fused matmul floor (default: 790e12 "
                                                     "on cuda, a measured fp32 matmul rate on cpu)")
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    n, v, d, dt = PRESETS[args.preset]
    args.tokens, args.vocab, args.hidden = args.tokens or n, args.vocab or v, args.hidden or d
    args.dtype = args.dtype or dt
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"  # the kernel on CPU tensors (tests; not a timing)
    kernel = ((args.device == "cuda" or interpreted) and triton_kd.triton is not None
              and args.divergence in triton_kd.DIVERGENCE_IDS)
    if args.impls is None:
        impls = [s for s in IMPLS if (kernel and args.device == "cuda") or s not in GPU_IMPLS]
    else:
        impls = [s.strip() for s in args.impls.split(",") if s.strip()]
    bad = [s for s in impls if s not in IMPLS]
    if bad:
        ap.error(f"--impls: unknown {', '.join(bad)}; choose from {', '.join(IMPLS)}")
    if not kernel and any(s in GPU_IMPLS for s in impls):
        ap.error(f"--impls {', '.join(GPU_IMPLS)} need --device cuda (or TRITON_INTERPRET=1), triton and a divergence of "
                 f"{', '.join(triton_kd.DIVERGENCE_IDS)}")
    args.impls = impls
    if args.chunk_size < 1 or args.tokens < 1 or args.vocab < 2 or args.hidden < 1:
        ap.error("--chunk-size, --tokens, --hidden must be >= 1 and --vocab >= 2")
    return args


def main(argv=None):
    args = parse_args(argv)
    device = measure.device_of(args.device)
    dtype = DTYPES[args.dtype]
    torch.manual_seed(args.seed)
    n, v, d = args.tokens, args.vocab, args.hidden
    gen = dict(device=device)
    hidden = (torch.randn(n, d, **gen) / d ** 0.25).to(dtype).requires_grad_()
    weight = (torch.randn(v, d, **gen) / d ** 0.25).to(dtype).requires_grad_()
    with torch.no_grad():
        student = (hidden @ weight.t()).requires_grad_()
        teacher = (torch.randn(n, v, **gen) * 2.0).to(dtype)
    labels = torch.randint(0, v, (n,), **gen)
    div = functools.partial(DIVERGENCES[args.divergence])
    vg = None
    if args.divergence == "forward_kl" and not args.no_analytic:
        vg = functools.partial(forward_kl_loss_and_grad, compiled=args.compile)
    elif args.divergence == "reverse_kl" and not args.no_analytic:
        vg = reverse_kl_loss_and_grad
    r, chunk = args.kd_ratio, args.chunk_size
    # the kernel's coefficient: the divergence's own default alpha (skew) or beta (js), as ``div`` uses
    params = inspect.signature(DIVERGENCES[args.divergence]).parameters
    coef = next((params[k].default for k in ("alpha", "beta") if k in params), 0.0)

    def run(impl):
        if impl == "fused":
            hidden.grad = weight.grad = None
            loss = fused_kd_loss(hidden, weight, labels, teacher, div, r, chunk, vg).loss
        else:
            student.grad = None
            if impl == "reference":
                loss = reference_loss(student, teacher, labels, r)
            elif impl in GPU_IMPLS:
                kd, ce, grad = triton_kd.kd_rows_and_grad(student.detach(), teacher, labels, args.divergence, r,
                                                          coef=coef, tile_max=impl == "triton_tile")
                student.grad = grad  # what TritonKDLoss's backward hands on (times an incoming 1)
                return (1.0 - r) * ce.sum() + r * kd.sum()
            elif impl == "plain":
                loss = plain_kd_loss(student, labels, teacher, div, r).loss
            else:
                loss = chunked_kd_loss(student, labels, teacher, div, r, chunk, vg).loss
        loss.backward()
        return loss.detach()

    b = torch.finfo(dtype).bits // 8
    bandwidth = measure.copy_bandwidth(device, 1 << (31 if device.type == "cuda" else 28))
    # against wall time (x_floor below), so FLOP per wall second on the CPU too (its threads together)
    peak_flops = args.peak_flops or measure.DEFAULT_PEAK_FLOPS.get(device.type) or measure.matmul_rate(
        device, wall_clock=True)
    logits_bytes = n * v * (2 * b + b)
    fused_bytes = 2 * n * d * b + 2 * v * d * b + n * v * b
    fused_flops = 6 * n * v * d
    results = {}
    for impl in args.impls:
        seconds, cpu_seconds = measure.time_call(lambda: run(impl), device, args.warmup, args.repeats)
        peak = measure.peak_extra_bytes(lambda: run(impl), device)
        floor_bytes = fused_bytes if impl == "fused" else logits_bytes
        floor_s = floor_bytes / bandwidth
        if impl == "fused":
            floor_s = max(floor_s, fused_flops / peak_flops)
        results[impl] = {
            "loss": float(run(impl)),  # the same computation: the same value in every impl (up to rounding)
            "time_ms": seconds * 1e3,
            "cpu_ms": cpu_seconds * 1e3,
            "peak_extra_mib": peak / measure.MiB,
            "floor_bytes": floor_bytes,
            "floor_ms": floor_s * 1e3,
            "x_floor": seconds / floor_s,
            "effective_gb_s": floor_bytes / seconds / 1e9,
        }
    ratios = {}
    base = results.get("plain")  # not the reference: its -sum p log q leaves out the teacher's entropy
    if base is not None:
        ratios["max loss relative difference to plain"] = max(abs(res["loss"] - base["loss"]) / max(abs(base["loss"]), 1e-30)
                                                     for k, res in results.items() if k != "reference")
    if "reference" in results:
        for impl in results:
            if impl != "reference":
                ratios[f"{impl}/reference time"] = results[impl]["time_ms"] / results["reference"]["time_ms"]
                ratios[f"{impl}/reference CPU time"] = results[impl]["cpu_ms"] / results["reference"]["cpu_ms"]
                ref_mem = results["reference"]["peak_extra_mib"]
                ratios[f"{impl}/reference memory"] = results[impl]["peak_extra_mib"] / ref_mem if ref_mem else None
    out = {
        "benchmark": "kd_loss",
        "config": {k: getattr(args, k) for k in ("preset", "tokens", "vocab", "hidden", "dtype", "divergence",
                                                 "kd_ratio", "chunk_size", "no_analytic", "compile", "warmup",
                                                 "repeats")},
        "machine": {**measure.environment(device), "copy_bandwidth_gb_s": bandwidth / 1e9,
                    "peak_flops": peak_flops, "memory_method": measure.MEMORY_METHOD[device.type]},
        "results": results,
        "ratios": ratios,
    }
    print(f"KD loss forward+backward: N={n} V={v} d={d} {args.dtype} {args.divergence} r={r} "
          f"chunk={chunk}{' compiled' if args.compile else ''} on {device} (copy bandwidth {bandwidth / 1e9:.1f} GB/s)\n")
    rows = [{"impl": k, **res} for k, res in results.items()]
    print(measure.markdown_table(rows, [
        ("impl", "impl", None), ("time ms", "time_ms", "{:.2f}"), ("process CPU ms", "cpu_ms", "{:.2f}"),
        ("extra peak MiB", "peak_extra_mib", "{:.1f}"),
        ("floor ms", "floor_ms", "{:.3f}"), ("x floor", "x_floor", "{:.1f}"), ("GB/s", "effective_gb_s", "{:.1f}"),
    ]))
    if ratios:
        print("\n" + "\n".join(f"{k}: {val:.3f}" for k, val in ratios.items() if val is not None))
    measure.write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
