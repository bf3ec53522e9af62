"""Cross-tokenizer KD (``uld``, ``min_ed``, ``dskd_cma``, ``multi_cost_ot``): a training step's loss in
each ``--kd-impl``, in one run.

    python benchmarks/cross_tokenizer_loss.py --device cpu --preset cpu-small --json xt.json
    python benchmarks/cross_tokenizer_loss.py --device cuda --preset gpt2-xl-base

Per criterion and form: forward + backward of the criterion on a batch whose teacher side is its own
tokenization (another vocabulary and other lengths), student and frozen teacher random-initialised
GPT-2 shapes. ``plain`` is the reference form (DSKD's): full float32 [tokens, vocab] logits of both
models at the response tokens; ``chunked`` takes --kd-chunk-size student rows at a time; ``fused``
(the default) also makes both models' logits from their hidden states a chunk at a time (for the
dual-space criterions chunked and fused are one form: the readouts recomputed chunk by chunk in the
backward pass). Reported:
time per step, response tokens/s, peak extra memory (``measure.py``), ratios to plain, and the
largest relative difference of the loss to plain's. MinED's DTW alignments are cached per example,
so the warm-up step pays for them and the timed ones do not (in training they are paid once per
example).
"""
import argparse
import json
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import measure  # noqa: E402
from minillm_terms import build_model  # noqa: E402  (random GPT-2 shapes for a task)

PRESETS = {  # teacher, student shapes; teacher, student vocab; student response tokens; sequences
    "cpu-tiny": ("tiny", "nano", 1500, 1000, 48, 4),
    "cpu-small": ("mini", "tiny", 12000, 8192, 192, 8),
    "gpt2-xl-base": ("xl", "base", 64000, 50257, 384, 16),
}
IMPLS = ("plain", "chunked", "fused")


def dictionary(prefix, size):
    from fairseq.data import Dictionary

    d = Dictionary()
    for i in range(size - 4):
        d.add_symbol(f"{prefix}{i}")
    return d


def batch(d, lengths, prompt, g, device):
    """A collated prompt/response batch: ``prompt`` prompt tokens then ``lengths[i]`` response labels."""
    longest = prompt + max(lengths)
    src = torch.full((len(lengths), longest), d.pad(), dtype=torch.long)
    target = torch.full_like(src, d.pad())
    for i, n in enumerate(lengths):
        tokens = torch.randint(d.nspecial, len(d), (prompt + n,), generator=g)
        src[i, 0] = d.eos()
        src[i, 1: prompt + n] = tokens[:-1]
        target[i, prompt: prompt + n] = tokens[prompt:]
    lengths_t = torch.tensor([prompt + n for n in lengths])
    return {"net_input": {"src_tokens": src.to(device), "src_lengths": lengths_t.to(device)},
            "target": target.to(device), "ntokens": int(sum(lengths))}


def build(args, device, workdir):
    import distill_plugins  # noqa: F401
    from distill_plugins.tasks.instruction_distillation import InstructionDistillationConfig, InstructionDistillationTask
    from distill_plugins.teacher import Teacher
    from distill_plugins.token_alignment import ALIGNMENT_FILE

    t_shape, s_shape, t_vocab, s_vocab, n, b = PRESETS[args.preset]
    s_dict, t_dict = dictionary("s", s_vocab), dictionary("t", t_vocab)
    # MinED's mapping: every teacher token to a student token (synthetic: one in every few is exact)
    mapping = list(range(4)) + [4 + (i * 7) % (s_vocab - 4) for i in range(t_vocab - 4)]
    with open(os.path.join(workdir, ALIGNMENT_FILE), "w") as f:
        json.dump({"student_tokens": s_dict.symbols, "teacher_tokens": t_dict.symbols, "teacher_to_student": mapping}, f)
    prompt = n // 3
    cfg = dict(tokens_per_sample=prompt + 2 * n)
    task = InstructionDistillationTask(InstructionDistillationConfig(teacher_data=workdir, **cfg), s_dict)
    task.teacher_task = InstructionDistillationTask(InstructionDistillationConfig(**cfg), t_dict)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    task.teachers = [Teacher(build_model(task.teacher_task, t_shape, args.seed + 1, device, dtype), path="<random>",
                             sha256="0" * 64)]
    student = build_model(task, s_shape, args.seed, device, dtype)  # eval: no dropout, the forms comparable
    task.student_hidden_dim = student.decoder.output_projection.weight.size(1)  # what build_model records
    g = torch.Generator().manual_seed(args.seed)
    s_lengths = [n - 5 * i for i in range(b)]
    sample = batch(s_dict, s_lengths, prompt, g, device)
    sample["teacher"] = batch(t_dict, [int(x * 1.2) for x in s_lengths], int(prompt * 1.2), g, device)
    return task, student, sample


def main(argv=None):
    from omegaconf import OmegaConf

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu-tiny")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="both models' dtype")
    ap.add_argument("--criteria", default="uld,min_ed,dskd_cma,multi_cost_ot")
    ap.add_argument("--kd-chunk-size", type=int, default=1024)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)
    device = measure.device_of(args.device)
    with tempfile.TemporaryDirectory() as workdir:
        task, student, sample = build(args, device, workdir)
        results, ratios = {}, {}
        for name in args.criteria.split(","):
            for impl in IMPLS:
                options = {"_name": name, "kd_ratio": 0.5, "kd_impl": impl, "kd_chunk_size": args.kd_chunk_size}
                if name == "multi_cost_ot":
                    options["ot_interpolation_updates"] = 0  # what --max-update gives it in fairseq-train
                torch.manual_seed(args.seed)  # the same projections for every form
                criterion = task.build_criterion(OmegaConf.create(options)).to(device)

                def step():
                    student.zero_grad(set_to_none=True)
                    loss, _, _ = criterion(student, sample)
                    loss.backward()
                    return loss.item()

                value = step()
                wall, cpu = measure.time_call(step, device, args.warmup, args.repeats)
                peak = measure.peak_extra_bytes(step, device)
                results[f"{name} {impl}"] = {"criterion": name, "impl": impl, "step_s": wall, "cpu_s": cpu,
                                             "tokens_per_s": sample["ntokens"] / wall,
                                             "peak_extra_mib": peak / measure.MiB, "loss": value}
            plain = results[f"{name} plain"]
            for impl in IMPLS[1:]:
                res = results[f"{name} {impl}"]
                ratios[f"{name} {impl}/plain tokens_per_s"] = res["tokens_per_s"] / plain["tokens_per_s"]
                ratios[f"{name} {impl}/plain peak_memory"] = res["peak_extra_mib"] / plain["peak_extra_mib"]
                ratios[f"{name} {impl} loss relative difference"] = abs(res["loss"] - plain["loss"]) / abs(plain["loss"])
    t_shape, s_shape, t_vocab, s_vocab, _, _ = PRESETS[args.preset]
    print(f"cross-tokenizer KD step, preset {args.preset}: teacher {t_shape} (vocab {t_vocab:,}), student {s_shape} "
          f"(vocab {s_vocab:,}), {sample['ntokens']} response tokens, {args.dtype}")
    print(measure.markdown_table(list(results.values()), [
        ("criterion", "criterion", None), ("impl", "impl", None), ("step s", "step_s", "{:.3f}"),
        ("tokens/s", "tokens_per_s", "{:,.0f}"), ("peak extra MiB", "peak_extra_mib", "{:,.1f}"),
        ("loss", "loss", "{:.5f}")]))
    print(" ".join(f"{k}: {v:.3g}" for k, v in ratios.items()))
    measure.write_json(args.json, {"preset": args.preset, "dtype": args.dtype, "tokens": sample["ntokens"],
                                   "results": results, "ratios": ratios, "environment": measure.environment(device)})


if __name__ == "__main__":
    main()
