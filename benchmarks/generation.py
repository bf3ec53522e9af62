"""Prompt-conditioned generation: one-pass prompt prefill vs fairseq's token-by-token prompt forcing.

    python benchmarks/generation.py --device cpu --preset cpu-small --json gen.json
    python benchmarks/generation.py --device cuda --preset gpt2-base --json gen.json

Both runs generate for the same random prompts (lengths uniform in [--min-prompt, --max-prompt]) with
the same random-init ``kd_gpt2`` model through ``task.build_generator`` / ``task.inference_step``,
the path of distill-evaluate, the generated-data modes and MiniLLM's rollouts:
* ``reference``: ``PromptSequenceGenerator`` (fairseq's SequenceGenerator; one decoder call per
  prompt token of the longest prompt before any row's response);
* ``prefill``: ``PrefillGenerator`` (``prompt_prefill.py``; one call for all prompts).
Both drop finished rows. As in distill-evaluate, --max-len bounds prompt + response. A random model
almost never ends a response, so the EOS logit gets a bias, calibrated on random sequences to end
a response with probability 1 / --mean-response per step; greedy contexts are not random, so the
lengths come out otherwise (the table reports the tokens generated), but they vary per row as a
trained model's do. --mean-response 0: no bias, every response runs to --max-len (the case least
favourable to the prefill: the same response steps, only the prompt steps saved). Greedy
decoding gives both runs the same work: the same tokens (checked and reported; a float rounding
difference can flip an argmax). --sampling samples instead (the runs then draw different tokens).
Reported: generated tokens/s and responses/s (wall time, and process CPU time), extra peak memory
(``measure.py``), and prefill/reference ratios.
"""
import argparse
import logging
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import measure  # noqa: E402

PRESETS = {
    # name: (layers, dim, heads), vocab, prompts, min / max prompt length, max prompt + response, mean response
    "cpu-tiny": ((1, 64, 2), 1024, 8, 8, 32, 64, 8),
    "cpu-small": ((4, 256, 4), 8192, 32, 16, 256, 512, 64),
    "gpt2-base": ((12, 768, 12), 50257, 64, 16, 256, 512, 128),
}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu-tiny")
    ap.add_argument("--prompts", type=int, help="prompts per generation call")
    ap.add_argument("--min-prompt", type=int)
    ap.add_argument("--max-prompt", type=int)
    ap.add_argument("--max-len", type=int, help="max prompt + response tokens")
    ap.add_argument("--mean-response", type=int, help="EOS logit bias for responses of about this many "
                                                        "tokens (0: no bias)")
    ap.add_argument("--sampling", action="store_true", help="sample (top-p 1, T 1) instead of greedy decoding")
    ap.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    shape, vocab, prompts, lo, hi, max_len, mean = PRESETS[args.preset]
    args.shape, args.vocab = shape, vocab
    args.prompts = args.prompts or prompts
    args.min_prompt = args.min_prompt or lo
    args.max_prompt = args.max_prompt or hi
    args.max_len = args.max_len or max_len
    args.mean_response = mean if args.mean_response is None else args.mean_response
    if not 1 <= args.min_prompt <= args.max_prompt < args.max_len:
        ap.error("need 1 <= --min-prompt <= --max-prompt < --max-len")
    if args.mean_response == 1 or args.mean_response < 0:
        ap.error("--mean-response must be 0 (no bias) or at least 2")
    return args


def build(args, device):
    from fairseq.data import Dictionary
    from fairseq.models import ARCH_CONFIG_REGISTRY, ARCH_MODEL_REGISTRY

    import distill_plugins  # noqa: F401
    from distill_plugins.tasks.instruction_distillation import InstructionDistillationConfig, InstructionDistillationTask

    d = Dictionary()
    for i in range(args.vocab - 4):
        d.add_symbol(f"w{i}")
    task = InstructionDistillationTask(InstructionDistillationConfig(), d)
    layers, dim, heads = args.shape
    torch.manual_seed(args.seed)
    ns = argparse.Namespace(arch="kd_gpt2_tiny", decoder_layers=layers, decoder_embed_dim=dim,
                            decoder_ffn_embed_dim=4 * dim, decoder_attention_heads=heads)
    ARCH_CONFIG_REGISTRY["kd_gpt2_tiny"](ns)
    model = ARCH_MODEL_REGISTRY["kd_gpt2_tiny"].build_model(ns, task).eval()
    if args.mean_response:
        eos_bias(model, d, args, device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    return task, model.to(device=device, dtype=dtype)


def eos_bias(model, d, args, device):
    """Give the EOS logit a bias b so that greedy decoding ends a response with probability about
    1 / --mean-response per step: b is that quantile of (best other logit - EOS logit) over the
    positions of random sequences. The output layer gets a bias vector, its weight stays tied."""
    g = torch.Generator().manual_seed(args.seed + 1)
    x = torch.randint(d.nspecial, len(d), (8, args.max_len // 2), generator=g)
    with torch.no_grad():
        logits = model(x)[0].float().view(-1, len(d))
    gap = torch.cat([logits[:, :d.eos()], logits[:, d.eos() + 1:]], 1).max(-1).values - logits[:, d.eos()]
    tied = model.decoder.output_projection
    head = torch.nn.Linear(tied.in_features, tied.out_features, bias=True)
    head.weight = tied.weight
    with torch.no_grad():
        head.bias.zero_()
        head.bias[d.eos()] = torch.quantile(gap, 1.0 - 1.0 / args.mean_response)
    model.decoder.output_projection = head


def prompt_sample(args, task, device):
    """A batch as the task's dataset collates it: [EOS] + prompt (+ a 1-token response), right-padded."""
    g = torch.Generator().manual_seed(args.seed)
    d = task.dictionary
    lengths = torch.randint(args.min_prompt, args.max_prompt + 1, (args.prompts,), generator=g)
    src = torch.full((args.prompts, int(lengths.max()) + 2), d.pad(), dtype=torch.long)
    for i, n in enumerate(lengths.tolist()):
        src[i, 0] = d.eos()
        src[i, 1 : n + 1] = torch.randint(d.nspecial, len(d), (n,), generator=g)
        src[i, n + 1] = d.eos()
    return {"id": torch.arange(args.prompts), "prompt_lengths": lengths.to(device),
            "net_input": {"src_tokens": src.to(device), "src_lengths": (lengths + 2).to(device)}}


def run_generator(name, task, model, sample, args, device):
    from distill_plugins.generation import PromptSequenceGenerator
    from distill_plugins.prefill_generator import PrefillGenerator
    from distill_plugins.sampling import generation_args

    gen_args = generation_args(sampling=args.sampling, max_len=args.max_len)
    cls = PromptSequenceGenerator if name == "reference" else None
    generator = task.build_generator([model], gen_args, seq_gen_cls=cls)
    assert isinstance(generator, PrefillGenerator) == (name == "prefill")
    outputs = {}

    def call():
        torch.manual_seed(args.seed)
        with torch.no_grad():
            outputs["hypos"] = task.inference_step(generator, [model], dict(sample))

    wall, cpu = measure.time_call(call, device, args.warmup, args.repeats)
    peak = measure.peak_extra_bytes(call, device)
    responses = [h[0]["tokens"].cpu() for h in outputs["hypos"]]
    tokens = sum(len(r) for r in responses)
    return {"generator": "PrefillGenerator" if name == "prefill" else "PromptSequenceGenerator",
            "wall_s": wall, "cpu_s": cpu, "tokens": tokens, "tokens_per_s": tokens / wall,
            "responses_per_s": len(responses) / wall, "peak_extra_mib": peak / measure.MiB}, responses


def main(argv=None):
    args = parse_args(argv)
    device = measure.device_of(args.device)
    logging.getLogger("fairseq").setLevel(logging.WARNING)
    task, model = build(args, device)
    sample = prompt_sample(args, task, device)
    results, outputs = {}, {}
    for name in ("reference", "prefill"):
        results[name], outputs[name] = run_generator(name, task, model, sample, args, device)
    same = all(torch.equal(a, b) for a, b in zip(outputs["reference"], outputs["prefill"]))
    r, p = results["reference"], results["prefill"]
    ratios = {"tokens_per_s prefill/reference": p["tokens_per_s"] / r["tokens_per_s"],
              "wall_s prefill/reference": p["wall_s"] / r["wall_s"],
              "cpu_s prefill/reference": p["cpu_s"] / r["cpu_s"],
              "peak_memory prefill/reference": p["peak_extra_mib"] / max(r["peak_extra_mib"], 1e-9)}
    out = {"benchmark": "generation",
           "config": {"preset": args.preset, "shape": args.shape, "vocab": args.vocab, "prompts": args.prompts,
                      "prompt_lengths": [args.min_prompt, args.max_prompt], "max_len": args.max_len,
                      "mean_response": args.mean_response, "sampling": args.sampling, "dtype": args.dtype, "repeats": args.repeats},
           "machine": {**measure.environment(device), "memory_method": measure.MEMORY_METHOD[device.type]},
           "results": results, "ratios": ratios, "same_outputs": same}
    layers, dim, heads = args.shape
    print(f"Generation: kd_gpt2 {layers} layers x {dim} dims, V={args.vocab}, {args.prompts} prompts of "
          f"{args.min_prompt}-{args.max_prompt} tokens, prompt + response <= {args.max_len}, "
          f"{'sampling' if args.sampling else 'greedy'}, mean response {args.mean_response or 'unbiased'}, "
          f"{args.dtype}, on {device}\n")
    rows = [{"run": k, **v} for k, v in results.items()]
    print(measure.markdown_table(rows, [
        ("run", "run", None), ("generator", "generator", None), ("tokens", "tokens", "{:,}"),
        ("tokens/s", "tokens_per_s", "{:,.0f}"), ("responses/s", "responses_per_s", "{:.2f}"),
        ("wall s", "wall_s", "{:.3f}"), ("process CPU s", "cpu_s", "{:.3f}"),
        ("peak extra MiB", "peak_extra_mib", "{:.1f}"),
    ]))
    print("\n" + "\n".join(f"{k}: {v:.3f}" for k, v in ratios.items()))
    print(f"same outputs: {same}")
    measure.write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
