"""distill-cache-teacher: run the teacher once over the data and store its top-k log-probabilities.

    distill-cache-teacher --data data-bin/dolly --teacher checkpoints/teacher/checkpoint_best.pt \
        --out data-bin/dolly-teacher-top64 [--top-k 64 --splits train,valid --teacher-dtype bf16]
    fairseq-train data-bin/dolly --user-dir distill_plugins --task instruction_distillation \
        --teacher-cache data-bin/dolly-teacher-top64 --criterion kd ...

The format and what training rebuilds from it are in ``distill_plugins/teacher_cache.py``. The teacher
runs under ``torch.inference_mode`` in ``--teacher-dtype``, batched by ``--max-tokens``; its logits are
projected ``--chunk-size`` label tokens at a time, so no [tokens, vocab] tensor is larger than a chunk.
The output directory appears whole or not at all.
"""
import argparse
import logging
import math
import os
import sys
import time

import numpy as np
import torch

from ..devices import resolve_device
from ..errors import check
from ..staged_directory import check_output_dir, staged_directory
from ..tasks.instruction_distillation import InstructionDistillationConfig, InstructionDistillationTask
from ..teacher import Teacher, dictionary_fingerprint
from ..teacher_cache import CACHE_DTYPES, CacheWriter, dataset_keys

logger = logging.getLogger("distill_plugins.cache_teacher")


def get_parser():
    p = argparse.ArgumentParser(prog="distill-cache-teacher", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="data directory made by distill-prepare")
    p.add_argument("--teacher", required=True, help="fairseq checkpoint or Hugging Face directory of the teacher")
    p.add_argument("--out", required=True, help="cache directory to write")
    p.add_argument("--splits", default="train,valid", help="comma-separated splits to cache (every split the "
                                                           "student trains or validates on)")
    p.add_argument("--top-k", type=int, default=64, help="tokens kept per position (the vocabulary size: exact)")
    p.add_argument("--cache-dtype", choices=sorted(CACHE_DTYPES), default="fp16", help="dtype of the stored log-probs")
    p.add_argument("--teacher-dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    p.add_argument("--tokens-per-sample", type=int, default=512, help="as the student's training (examples are cut "
                                                                      "to this length)")
    p.add_argument("--max-tokens", type=int, default=8192, help="tokens per teacher batch")
    p.add_argument("--chunk-size", type=int, default=1024, help="label tokens projected to the vocabulary at a time")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda:N")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return p


def index_examples(task, splits, max_tokens):
    """{key: number of labels} over the splits' examples (duplicates once) and examples per split;
    refuses a ``max_tokens`` below the longest example (a batch must hold it)."""
    counts, per_split = {}, {}
    for split in splits:
        task.load_dataset(split)
        ds = task.dataset(split)
        longest = int(np.max(ds.sizes)) if len(ds) else 0
        check(longest <= max_tokens, f"--max-tokens {max_tokens} is below the longest example of the {split} split "
                                     f"({longest} tokens); pass --max-tokens {longest} or more")
        counts.update(dataset_keys(ds, task.dictionary.pad()))
        per_split[split] = len(ds)
    return counts, per_split


def main(argv=None):
    args = get_parser().parse_args(argv)
    logging.basicConfig(format="%(asctime)s | %(levelname)s | %(name)s | %(message)s", level=logging.INFO,
                        stream=sys.stdout)
    logging.getLogger("fairseq").setLevel(logging.WARNING)
    for name in ("top_k", "max_tokens", "chunk_size", "tokens_per_sample"):
        check(getattr(args, name) >= 1, f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    out_dir = check_output_dir(args.out, "--out", "cache.json", args.overwrite,
                               [("--data", args.data), ("--teacher", args.teacher)])
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    check(bool(splits), "--splits is empty; pass e.g. train,valid")
    device = resolve_device(args.device)

    t0 = time.time()
    task = InstructionDistillationTask.setup_task(
        InstructionDistillationConfig(data=args.data, tokens_per_sample=args.tokens_per_sample))
    vocab = len(task.dictionary)
    check(args.top_k <= vocab, f"--top-k {args.top_k} exceeds the vocabulary ({vocab} tokens); use at most {vocab}")
    counts, per_split = index_examples(task, splits, args.max_tokens)
    teacher = Teacher.load(args.teacher, task, dtype=args.teacher_dtype, device=str(device), flag="--teacher")
    teacher.check_positions(*task.teacher_input_length())
    n_rows, k = sum(counts.values()), args.top_k
    print(f"| {len(counts):,} distinct examples ({', '.join(f'{s}: {n:,}' for s, n in per_split.items())}), "
          f"{n_rows:,} label tokens; top-{k} of {vocab}, {args.cache_dtype}", flush=True)

    from tqdm import tqdm

    pad = task.dictionary.pad()
    with staged_directory(out_dir, prefix=".teacher-cache-") as (_work, out):
        writer = CacheWriter(out, counts, k, vocab, args.cache_dtype)
        t1 = time.time()
        with tqdm(total=sum(per_split.values()), desc="distill-cache-teacher", unit="ex", file=sys.stderr,
                  mininterval=2.0) as bar, torch.inference_mode():
            for split in splits:
                itr = task.get_batch_iterator(task.dataset(split), max_tokens=args.max_tokens,
                                              disable_iterator_cache=True).next_epoch_itr(shuffle=False)
                for sample in itr:
                    net_input = {key: v.to(device) for key, v in sample["net_input"].items()}
                    mask = sample["target"].to(device).ne(pad)
                    source = teacher.rows(net_input, mask, fused=True)
                    bar.update(writer.write(net_input["src_tokens"], mask, pad, source, args.chunk_size))
        seconds, teacher_pass = time.time() - t0, time.time() - t1
        writer.finish({
            "teacher": teacher.record(), "teacher_dtype": args.teacher_dtype, "data": os.path.abspath(args.data),
            "splits": per_split, "dictionary": dictionary_fingerprint(task.dictionary),
            "tokens_per_sample": args.tokens_per_sample, "build_seconds": round(seconds, 2),
            "teacher_pass_seconds": round(teacher_pass, 2),
        })
    size = sum(os.path.getsize(os.path.join(out_dir, f)) for f in os.listdir(out_dir))
    print(f"| cached {n_rows:,} label tokens in {seconds:.1f}s (teacher pass {teacher_pass:.1f}s: "
          f"{n_rows / max(teacher_pass, 1e-9):,.0f} label tokens/s), "
          f"{size / 2**20:.1f} MiB, {math.ceil(size / max(n_rows, 1))} bytes per token: {out_dir}", flush=True)


if __name__ == "__main__":
    main()
