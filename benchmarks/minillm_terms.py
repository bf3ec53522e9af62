"""MiniLLM's vocabulary-sized terms, ours (--kd-impl fused) against the plain form, in one run.

    python benchmarks/minillm_terms.py --device cpu --preset cpu-small --json terms.json
    python benchmarks/minillm_terms.py --device cuda --preset gpt2-xl-base

Per step: L_reg (exact single-step reverse KL over the vocabulary, on a rollout minibatch) and L_pt
((1 - k) CE + k KL(p || q) on an --lm-data batch, k = 0.5), forward + backward through the student,
with a frozen teacher (``distill_plugins.criterions.minillm``). ``plain`` is the direct form, as the
reference (MiniLLM's losses.py) computes it: full float32 [tokens, vocab] softmaxes of both models;
``fused`` is the criterion's default: chunks of --kd-chunk-size tokens, L_pt with both output
projections fused in, the Triton kernel on CUDA. Reported: time per step, tokens/s (rollout + LM
tokens) and peak extra memory (``measure.py``), and fused/plain ratios.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import measure  # noqa: E402
from kd_step import SHAPES  # noqa: E402  (layers, dim, heads of the GPT-2 family)

PRESETS = {  # teacher, student, vocab, sequence length, sequences per batch (rollout and LM batch each)
    "cpu-tiny": ("tiny", "nano", 1024, 64, 4),
    "cpu-small": ("mini", "tiny", 8192, 256, 8),
    "gpt2-xl-base": ("xl", "base", 50257, 512, 16),
}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu-tiny")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="both models' dtype")
    ap.add_argument("--kd-chunk-size", type=int, default=1024)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--seed", type=int, default=1)
    return ap.parse_args(argv)


def build_model(task, shape, seed, device, dtype):
    from fairseq.models import ARCH_CONFIG_REGISTRY, ARCH_MODEL_REGISTRY

    layers, dim, heads = SHAPES[shape]
    torch.manual_seed(seed)
    ns = argparse.Namespace(arch="kd_gpt2_tiny", decoder_layers=layers, decoder_embed_dim=dim,
                            decoder_ffn_embed_dim=4 * dim, decoder_attention_heads=heads, dropout=0.0)
    ARCH_CONFIG_REGISTRY["kd_gpt2_tiny"](ns)
    return ARCH_MODEL_REGISTRY["kd_gpt2_tiny"].build_model(ns, task).to(device=device, dtype=dtype).eval()


def build(args, device):
    """(task with a frozen teacher, student, rollout-like batch, LM batch)."""
    from fairseq.data import Dictionary

    import distill_plugins  # noqa: F401  (registers the archs and criterions)
    from distill_plugins.tasks.instruction_distillation import InstructionDistillationConfig, InstructionDistillationTask
    from distill_plugins.teacher import Teacher

    teacher_shape, student_shape, vocab, seq_len, batch = PRESETS[args.preset]
    d = Dictionary()
    for i in range(vocab - 4):
        d.add_symbol(f"w{i}")
    task = InstructionDistillationTask(InstructionDistillationConfig(tokens_per_sample=seq_len), d)
    task.provides_rollouts = True  # what --task minillm declares; these terms need only the teacher
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    task.teachers = [Teacher(build_model(task, teacher_shape, args.seed + 1, device, dtype), path="<random>",
                             sha256="0" * 64)]
    student = build_model(task, student_shape, args.seed, device, dtype)
    g = torch.Generator().manual_seed(args.seed)

    def tokens():
        return torch.randint(d.nspecial, len(d), (batch, seq_len), generator=g).to(device)

    rollout = {"src_tokens": tokens(), "src_lengths": torch.full((batch,), seq_len, device=device)}
    mask = torch.ones(batch, seq_len, dtype=torch.bool, device=device)
    mask[:, : seq_len // 4] = False  # the prompt: no response tokens there
    x = tokens()
    lm = {"net_input": {"src_tokens": x, "src_lengths": torch.full((batch,), seq_len, device=device)},
          "target": torch.roll(x, -1, 1)}
    return task, student, rollout, mask, lm, vocab


def main(argv=None):
    from omegaconf import OmegaConf

    args = parse_args(argv)
    device = measure.device_of(args.device)
    task, student, rollout, mask, lm, vocab = build(args, device)
    ntokens = int(mask.sum()) + lm["target"].numel()
    results = {}
    for impl in ("plain", "fused"):
        criterion = task.build_criterion(OmegaConf.create(
            {"_name": "minillm", "kd_impl": impl, "kd_chunk_size": args.kd_chunk_size}))

        def step():
            student.zero_grad(set_to_none=True)
            reg = criterion.single_step_term(student(**rollout)[0], rollout, mask)
            pt = criterion.pretraining_term(student, lm)
            (reg + pt.loss).backward()
            return float(reg), float(pt.loss)

        values = step()
        wall, cpu = measure.time_call(step, device, args.warmup, args.repeats)
        peak = measure.peak_extra_bytes(step, device)
        results[impl] = {"step_s": wall, "cpu_s": cpu, "tokens_per_s": ntokens / wall,
                         "peak_extra_mib": peak / measure.MiB, "reg_loss": values[0], "pt_loss": values[1]}
    ratios = {"tokens_per_s fused/plain": results["fused"]["tokens_per_s"] / results["plain"]["tokens_per_s"],
              "peak_memory fused/plain": results["fused"]["peak_extra_mib"] / results["plain"]["peak_extra_mib"]}
    rows = [dict(name=k, **v) for k, v in results.items()]
    print(f"MiniLLM L_reg + L_pt, preset {args.preset}: vocab {vocab}, {ntokens} tokens per step, {args.dtype}")
    print(measure.markdown_table(rows, [("impl", "name", None), ("step s", "step_s", "{:.3f}"),
                                        ("tokens/s", "tokens_per_s", "{:,.0f}"),
                                        ("peak extra MiB", "peak_extra_mib", "{:,.1f}"),
                                        ("L_reg", "reg_loss", "{:.5f}"), ("L_pt", "pt_loss", "{:.5f}")]))
    print(" ".join(f"{k}: {v:.2f}x" for k, v in ratios.items()))
    measure.write_json(args.json, {"preset": args.preset, "vocab": vocab, "tokens": ntokens, "dtype": args.dtype,
                                   "results": results, "ratios": ratios, "environment": measure.environment(device)})


if __name__ == "__main__":
    main()
