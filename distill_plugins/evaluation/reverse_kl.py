"""Reverse KL of a student to a teacher on held-out prompts, measured on the student's own samples.

    python -m distill_plugins.evaluation.reverse_kl DATA --student S.pt --teacher T.pt [--split valid]

For each prompt of the split one response y ~ q (plain sampling, temperature 1, fixed seed) is drawn
from the student; then, over the sampled response tokens,

* ``token_rkl`` = mean_t sum_v q(v|y_<t) (log q(v|y_<t) - log p(v|y_<t))   (exact per step)
* ``seq_rkl``   = mean over responses of sum_t (log q(y_t|y_<t) - log p(y_t|y_<t)), an unbiased
                  Monte-Carlo estimate of the sequence-level KL(q || p) MiniLLM minimises.

Both are in nats; several ``--seeds`` are averaged.
"""
import argparse
import os
from typing import Dict, Sequence

import torch
from fairseq import checkpoint_utils, utils

from ..divergences import reverse_kl
from ..errors import DistillError, check
from ..policy_gradient import token_log_probs
from ..rollouts import to_device
from .report_files import check_outputs, write_json_atomic
from ..sampling import batch_from_responses, generate_responses, generation_args
from ..tasks.instruction_distillation import InstructionDistillationConfig, InstructionDistillationTask


@torch.no_grad()
def sampled_reverse_kl(task, student, teacher, split: str = "valid", seeds: Sequence[int] = (1,),
                       max_len: int = 512, batch_size: int = 32) -> Dict[str, float]:
    """``token_rkl`` and ``seq_rkl`` (see the module docstring) of ``student`` to ``teacher``
    (fairseq models in eval mode) on the prompts of ``split``."""
    dataset = task.datasets[split]
    device = next(student.parameters()).device
    pad, eos = task.target_dictionary.pad(), task.target_dictionary.eos()
    generator = task.build_generator([student], generation_args(max_len=max_len))
    tok_sum, tok_n, seq_sum, seq_n = 0.0, 0, 0.0, 0
    for seed in seeds:
        utils.set_torch_seed(seed)
        for start in range(0, len(dataset), batch_size):
            prompts = dataset.collater([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            prompts = to_device(prompts, device)
            responses = generate_responses(task, student, prompts, generator=generator)
            batch = to_device(batch_from_responses(prompts, responses, pad, eos, max_len), device)
            mask = batch["target"].ne(pad)
            s = student(**batch["net_input"])[0].float()
            t = teacher(**batch["net_input"])[0].float()
            tok_sum += float(reverse_kl(s[mask], t[mask]).sum())
            tok_n += int(mask.sum())
            log_ratio = (token_log_probs(s, batch["target"]) - token_log_probs(t, batch["target"])) * mask
            seq_sum += float(log_ratio.sum())
            seq_n += mask.size(0)
    return {"token_rkl": tok_sum / max(tok_n, 1), "seq_rkl": seq_sum / max(seq_n, 1),
            "tokens": tok_n, "responses": seq_n}


def load_frozen(path: str, task):
    if not os.path.isfile(path):
        raise DistillError(f"checkpoint {path} does not exist")
    models, _cfg = checkpoint_utils.load_model_ensemble([path], task=task)
    return models[0].eval().requires_grad_(False)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m distill_plugins.evaluation.reverse_kl",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("data", help="data directory made by distill-prepare")
    p.add_argument("--student", required=True, help="student checkpoint")
    p.add_argument("--teacher", required=True, help="teacher checkpoint (same dictionary)")
    p.add_argument("--split", default="valid")
    p.add_argument("--seeds", default="1", help="comma-separated sampling seeds")
    p.add_argument("--max-len", type=int, default=512, help="max prompt + response tokens")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is there")
    p.add_argument("--json", help="write the result here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    args = p.parse_args(argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise DistillError(f"--seeds {args.seeds!r}: pass comma-separated integers, e.g. 1,2,3") from None
    check(bool(seeds) and len(set(seeds)) == len(seeds), f"--seeds {args.seeds!r}: give distinct seeds, e.g. 1,2,3")
    check(args.batch_size >= 1, f"--batch-size must be >= 1, got {args.batch_size}")
    check(args.max_len >= 2, f"--max-len must be >= 2 (a prompt token and a response token), got {args.max_len}")
    check_outputs([args.json], args.overwrite, inputs=[args.student, args.teacher])
    task = InstructionDistillationTask.setup_task(InstructionDistillationConfig(data=args.data))
    task.load_dataset(args.split)
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    student, teacher = load_frozen(args.student, task).to(device), load_frozen(args.teacher, task).to(device)
    result = sampled_reverse_kl(task, student, teacher, args.split, seeds, args.max_len, args.batch_size)
    print(f"| {args.split}: token reverse KL {result['token_rkl']:.4f} nats, sequence reverse KL "
          f"{result['seq_rkl']:.4f} nats ({result['responses']} responses, {result['tokens']} tokens)", flush=True)
    if args.json:
        write_json_atomic(args.json, result)


if __name__ == "__main__":
    main()
