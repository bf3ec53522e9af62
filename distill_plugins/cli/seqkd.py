"""distill-seqkd: SeqKD data, the teacher's sampled responses to the training prompts as a new data-bin.

    distill-seqkd --data data-bin/dolly --teacher checkpoints/teacher/checkpoint_best.pt \
        --destdir data-bin/dolly-seqkd [--top-p 1.0 --temperature 1.0 --max-new-tokens 256 --seed 1]

Sequence-level KD (Kim & Rush 2016; spec section 1b: MiniLLM's SeqKD samples with T=1, top-p 1):
the teacher answers every prompt of ``--split`` (batched, fairseq's SequenceGenerator through the
task, prompts forced, incremental decoding); each row of ``{data}/{split}.jsonl`` is written with
its ``output`` replaced by the teacher's response (the original is kept as ``reference_output``)
and binarized by ``distill-prepare --spm-model {data}/spm.model`` with the source's length limits,
so the new data-bin has the same dictionary. Its valid/test splits are the source's (real
references). Then train the student on it as usual (``--criterion kd`` or ``cross_entropy``).
"""
import argparse
import json
import logging
import os
import shutil
import sys
import time

import torch
from fairseq.data import data_utils

from ..data.instruction_jsonl import read_instruction_jsonl
from ..data.prepare_report import read_prepare_report
from ..data.tokenizers import load_tokenizer
from ..devices import resolve_device
from ..evaluation.report_files import write_atomic
from ..errors import DistillError, check
from ..generated.responses import sample_responses
from ..staged_directory import check_output_dir, is_within, staged_directory
from ..tasks.instruction_distillation import InstructionDistillationConfig, InstructionDistillationTask
from ..teacher import Teacher


def get_parser():
    p = argparse.ArgumentParser(prog="distill-seqkd", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="data directory made by distill-prepare")
    p.add_argument("--teacher", required=True, help="fairseq checkpoint of the teacher")
    p.add_argument("--destdir", required=True, help="new data directory with the teacher's responses")
    p.add_argument("--split", default="train", help="split whose prompts the teacher answers")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (1 = off)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=256, help="max tokens of a teacher response")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=16, help="prompts per generation batch")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda:N")
    p.add_argument("--teacher-dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    p.add_argument("--keep-jsonl", help="also write the generated jsonl here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --destdir (and --keep-jsonl file)")
    return p


def prepare_limits(data: str) -> list:
    """distill-prepare length options the source data-bin was made with."""
    report = read_prepare_report(data)
    if report is None:
        return []
    return ["--max-prompt-tokens", str(report["max_prompt_tokens"]), "--max-total-tokens",
            str(report["max_total_tokens"]), "--long-prompts", report["long_prompts"]]


def check_keep_jsonl(path, data, dest, teacher, overwrite: bool):
    """--keep-jsonl as an absolute path, checked before any generation: its directory exists, it is
    neither a directory nor a file of --data or --destdir (those are inputs or replaced) nor the
    --teacher checkpoint, and an existing file is replaced only with --overwrite."""
    if not path:
        return None
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    check(os.path.isdir(parent), f"--keep-jsonl {path}: no directory {parent}; create it or pick another path")
    check(not os.path.isdir(path), f"--keep-jsonl {path} is a directory; pass a file name (e.g. DIR/seqkd.jsonl)")
    for flag, top in (("--data", data), ("--destdir", dest)):
        check(not is_within(path, top), f"--keep-jsonl {path} is inside {flag} {top}; pick a path outside it")
    if os.path.exists(path) and os.path.exists(teacher) and os.path.samefile(path, teacher):
        raise DistillError(f"--keep-jsonl {path} is the --teacher checkpoint; pick another path")
    check(overwrite or not os.path.exists(path), f"--keep-jsonl {path} already exists; pass --overwrite to replace it")
    return path


def generate_split(task, teacher, split, args, device):
    """{dataset index: response token ids}, in batches sorted by length, with a progress bar."""
    from tqdm import tqdm

    with data_utils.numpy_seed(args.seed):
        task.load_dataset(split)
        itr = task.get_batch_iterator(task.dataset(split), max_sentences=args.batch_size, seed=args.seed,
                                      disable_iterator_cache=True).next_epoch_itr(shuffle=False)
    torch.manual_seed(args.seed)
    out = {}
    with tqdm(total=len(task.dataset(split)), desc="distill-seqkd", unit="prompt", file=sys.stderr,
              mininterval=2.0) as bar:
        for sample in itr:
            sample = {k: v.to(device) if torch.is_tensor(v) else v for k, v in sample.items()}
            sample["net_input"] = {k: v.to(device) for k, v in sample["net_input"].items()}
            responses = sample_responses(task, teacher, sample, args.max_new_tokens, top_p=args.top_p,
                                         temperature=args.temperature, max_total=task.cfg.tokens_per_sample)
            for i, r in zip(sample["id"].tolist(), responses):
                out[i] = r.cpu()
            bar.update(len(responses))
    return out


def main(argv=None):
    args = get_parser().parse_args(argv)
    logging.basicConfig(format="%(asctime)s | %(levelname)s | %(name)s | %(message)s", level=logging.INFO)
    logging.getLogger("fairseq").setLevel(logging.WARNING)
    check(0.0 < args.top_p <= 1.0, f"--top-p must be in (0, 1], got {args.top_p}")
    check(args.temperature > 0, f"--temperature must be > 0, got {args.temperature}")
    check(args.max_new_tokens >= 1, f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    check(args.batch_size >= 1, f"--batch-size must be >= 1, got {args.batch_size}")
    dest = check_output_dir(args.destdir, "--destdir", "seqkd.json", args.overwrite,
                            [("--data", args.data), ("--teacher", args.teacher)])
    keep = check_keep_jsonl(args.keep_jsonl, args.data, dest, args.teacher, args.overwrite)
    check(os.path.isfile(os.path.join(args.data, f"{args.split}.jsonl")),
          f"{args.data} has no {args.split}.jsonl; pass a data directory made by distill-prepare")
    check(os.path.isfile(os.path.join(args.data, "spm.model")),
          f"{args.data} has no spm.model: distill-seqkd decodes the teacher's responses with the data's "
          "SentencePiece model, so it needs data made by distill-prepare with --tokenizer sentencepiece (the default), "
          "not --tokenizer hf")
    device = resolve_device(args.device)
    rows = read_instruction_jsonl(os.path.join(args.data, f"{args.split}.jsonl"))
    tokenizer = load_tokenizer(args.data)

    t0 = time.time()
    task = InstructionDistillationTask.setup_task(InstructionDistillationConfig(data=args.data, seed=args.seed))
    teacher = Teacher.load(args.teacher, task, dtype=args.teacher_dtype, device=str(device), flag="--teacher").model
    check(teacher.max_positions() > args.max_new_tokens,
          f"--max-new-tokens {args.max_new_tokens} does not fit the teacher's {teacher.max_positions()} positions")
    responses = generate_split(task, teacher, args.split, args, device)
    check(len(responses) == len(rows),
          f"{args.data}: {len(rows)} rows in {args.split}.jsonl but {len(responses)} binarized examples")

    with staged_directory(dest, prefix=".seqkd-") as (work, out):
        jsonl = os.path.join(work, f"{args.split}.jsonl")
        n_tokens = 0
        with open(jsonl, "w", encoding="utf-8") as f:
            for i, row in enumerate(rows):
                ids = responses[i]
                ids = ids[: -1] if len(ids) and int(ids[-1]) == task.dictionary.eos() else ids
                n_tokens += len(ids)
                text = tokenizer.decode(task.dictionary.string(ids).split()) if len(ids) else ""
                new = dict(row, output=text, reference_output=row["output"])
                f.write(json.dumps(new, ensure_ascii=False) + "\n")
        print(f"| generated {len(rows)} responses, {n_tokens / max(len(rows), 1):.1f} tokens on average, "
              f"in {time.time() - t0:.1f}s", flush=True)
        splits = ["--train", jsonl]
        for other in ("valid", "test"):
            path = os.path.join(args.data, f"{other}.jsonl")
            if other != args.split and os.path.isfile(path):
                splits += [f"--{other}", path]
        from . import prepare

        # into the (empty) staged directory; it replaces --destdir only once all of this succeeded
        prepare.main([*splits, "--destdir", out, "--spm-model", os.path.join(args.data, "spm.model"),
                      *prepare_limits(args.data), "--overwrite"])
        with open(os.path.join(args.data, "dict.src.txt")) as a, open(os.path.join(out, "dict.src.txt")) as b:
            if a.read() != b.read():
                raise DistillError("the new data-bin's dictionary differs from the source's; is spm.model intact?")
        with open(os.path.join(out, "seqkd.json"), "w") as f:
            json.dump({"source": os.path.abspath(args.data), "teacher": os.path.abspath(args.teacher),
                       "split": args.split, "top_p": args.top_p, "temperature": args.temperature,
                       "max_new_tokens": args.max_new_tokens, "seed": args.seed}, f, indent=1)
        if keep:  # whole or not at all, like the data-bin
            with open(jsonl, encoding="utf-8") as src:
                write_atomic(keep, lambda f: shutil.copyfileobj(src, f))
    print(f"| seqkd data in {dest}" + (f", responses also in {keep}" if keep else ""), flush=True)


if __name__ == "__main__":
    main()
