"""distill-miniplm: MiniPLM's difference sampling, a pre-training corpus refined by a teacher and a
small reference LM (``distill_plugins/difference_sampling.py``; spec ``methods.md`` section 8).

    python -m distill_plugins.cli.prepare_lm --data data-bin/dolly --train corpus.txt --valid dev.txt \
        --destdir data-bin/corpus
    distill-miniplm --data data-bin/dolly --corpus data-bin/corpus --teacher T.pt --reference R.pt \
        --destdir data-bin/corpus-miniplm [--keep-fraction 0.5]
    fairseq-train data-bin/corpus-miniplm --user-dir distill_plugins --task language_modeling ...

Both models score every document of ``--split`` once (``--dtype``, inference mode, batched by
``--max-tokens``); the top ``--keep-fraction`` by difference score are written, in corpus order, as
the refined split, beside the corpus's other splits (copied unchanged), its dictionary,
``scores.tsv`` (every document's log-likelihoods, score and whether it was kept) and
``miniplm.json``. ``--text`` also writes the kept documents as text, for re-tokenizing them for a
student of another family. The output directory appears whole or not at all.

Several workers (``torchrun --nproc-per-node N -m distill_plugins.cli.miniplm ...``, on more nodes
with torchrun's own flags) score blocks of documents in turn, on GPU ``LOCAL_RANK`` each (gloo on CPU),
and worker 0 writes the same output one process would.
"""
import argparse
import json
import logging
import os
import shutil
import sys
import time

import torch

from ..devices import resolve_device
from ..difference_sampling import (
    SCORES, difference_scores, document_log_likelihoods, kept_count, scored_tokens, select_top,
)
from ..errors import DistillError, check, not_utf8
from ..staged_directory import check_output_dir, staged_directory
from ..teacher import Teacher, dictionary_fingerprint

logger = logging.getLogger("distill_plugins.miniplm")


def get_parser():
    p = argparse.ArgumentParser(prog="distill-miniplm", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="data directory made by distill-prepare (tokenizer and "
                                                 "dictionary of both models and the corpus)")
    p.add_argument("--corpus", required=True, help="binarized corpus (python -m distill_plugins.cli.prepare_lm): "
                                                   "SPLIT.{bin,idx} and dict.txt")
    p.add_argument("--teacher", required=True, help="fairseq checkpoint or Hugging Face directory of the teacher LM")
    p.add_argument("--reference", required=True, help="the small reference LM (MiniPLM: trained on a random part "
                                                      "of the same corpus)")
    p.add_argument("--destdir", required=True, help="refined corpus to write")
    p.add_argument("--keep-fraction", type=float, default=0.5, help="fraction of the documents kept (MiniPLM's "
                                                                    "alpha; default 0.5)")
    p.add_argument("--score", choices=SCORES, default="difference",
                   help="difference: [log p(x) - log p_ref(x)] / |x| (MiniPLM's code); ratio: log p(x) / log "
                        "p_ref(x) (the formula as written; see difference_sampling.py)")
    p.add_argument("--split", default="train", help="the split to refine (the others are copied)")
    p.add_argument("--text", help="the text file --split was binarized from (one document per non-empty line): "
                                  "also write the kept documents as SPLIT.txt")
    p.add_argument("--window", type=int, default=0, help="tokens per forward; longer documents are scored in "
                                                         "windows (default: the shortest --tokens-per-sample "
                                                         "either model was trained on)")
    p.add_argument("--max-tokens", type=int, default=8192, help="tokens per batch")
    p.add_argument("--chunk-size", type=int, default=1024, help="label tokens projected to the vocabulary at a time")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="dtype of both models")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda:N")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --destdir")
    return p


BLOCK_DOCUMENTS = 16384  # documents read from the mmap corpus and scored at a time (memory stays flat)


def load_corpus(corpus: str, split: str, dictionary):
    """``corpus/split`` as fairseq's (memory-mapped) dataset; one-line errors for a wrong corpus."""
    from fairseq.data import Dictionary, data_utils

    dict_file = os.path.join(corpus, "dict.txt")
    if not os.path.isfile(os.path.join(corpus, f"{split}.bin")):
        raise DistillError(f"--corpus {corpus} has no {split}.bin; binarize it with python -m "
                           "distill_plugins.cli.prepare_lm --data DATA --train TEXT --destdir CORPUS")
    if not os.path.isfile(dict_file) or dictionary_fingerprint(Dictionary.load(dict_file)) != dictionary_fingerprint(dictionary):
        raise DistillError(f"--corpus {corpus}: its dict.txt is missing or differs from --data's dictionary; "
                           "binarize the corpus with the same --data")
    dataset = data_utils.load_indexed_dataset(os.path.join(corpus, split), dictionary)
    check(dataset is not None and len(dataset) > 0, f"--corpus {corpus}: the {split} split is empty")
    return dataset


def text_documents(text_file: str):
    """The documents of a prepare_lm text file: its non-empty lines, stripped, streamed."""
    try:
        with open(text_file, encoding="utf-8") as f:
            yield from (line.strip() for line in f if line.strip())
    except UnicodeDecodeError:
        raise not_utf8(f"--text {text_file}") from None


def check_text(text_file: str, expected: int):
    if not os.path.isfile(text_file):
        raise DistillError(f"--text {text_file} does not exist")
    n = sum(1 for _ in text_documents(text_file))
    check(n == expected, f"--text {text_file} has {n} non-empty lines but the corpus split has "
                         f"{expected} documents; pass the file the split was binarized from")


def max_positions(model) -> int:
    limit = model.max_positions()
    return int(limit[0] if isinstance(limit, (tuple, list)) else limit)


def worker_blocks(n: int, rank: int, world: int):
    """(start, end) of the document blocks worker ``rank`` of ``world`` scores: block b goes to b mod world,
    blocks of at most ``BLOCK_DOCUMENTS`` and small enough that every worker gets one."""
    size = max(1, min(BLOCK_DOCUMENTS, -(-n // world)))
    return [(s, min(s + size, n)) for b, s in enumerate(range(0, n, size)) if b % world == rank]


def score_with(name, model, task, args, device, dataset, lengths, window, rank=0, world=1):
    """log p(x) of every document under ``model`` (this worker's blocks; the others' are summed in
    from every worker), with a progress bar on worker 0; (log-likelihoods, seconds)."""
    from tqdm import tqdm

    logp = torch.zeros(len(lengths), dtype=torch.float64)
    blocks = worker_blocks(len(lengths), rank, world)
    windows = sum(int((-(-lengths[s:e] // window)).sum()) for s, e in blocks)
    t0 = time.time()
    with tqdm(total=windows, desc=f"distill-miniplm {name}", unit="window", file=sys.stderr, mininterval=2.0,
              disable=rank != 0) as bar, torch.inference_mode():
        for start, end in blocks:
            logp[start:end] = document_log_likelihoods(
                model, [dataset[i] for i in range(start, end)], task.dictionary.pad(), task.dictionary.eos(),
                window, max_tokens=args.max_tokens, chunk_size=args.chunk_size, device=device, progress=bar.update)
    if world > 1:  # each document was scored by exactly one worker: a sum gathers them
        total = logp.to(device)
        torch.distributed.all_reduce(total)
        logp = total.cpu()
    return logp, time.time() - t0


def init_workers(device):
    """(rank, world size, device) under torchrun (WORLD_SIZE > 1), else (0, 1, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return torch.distributed.get_rank(), world, device


def main(argv=None):
    args = get_parser().parse_args(argv)
    logging.basicConfig(format="%(asctime)s | %(levelname)s | %(name)s | %(message)s", level=logging.INFO,
                        stream=sys.stdout)
    logging.getLogger("fairseq").setLevel(logging.WARNING)
    check(0.0 < args.keep_fraction <= 1.0, f"--keep-fraction must be in (0, 1], got {args.keep_fraction}")
    for name in ("max_tokens", "chunk_size"):
        check(getattr(args, name) >= 1, f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    check(args.window >= 0, f"--window must be >= 1 (or 0: the models' training length), got {args.window}")
    inputs = [(f"--{name}", getattr(args, name)) for name in ("data", "corpus", "teacher", "reference", "text")]
    dest = check_output_dir(args.destdir, "--destdir", "miniplm.json", args.overwrite, inputs)
    for flag, path in (("--teacher", args.teacher), ("--reference", args.reference)):
        check(os.path.exists(path), f"{flag} {path} does not exist")
    if os.path.abspath(args.teacher) == os.path.abspath(args.reference):
        logger.warning("--teacher and --reference are the same model: every difference score is 0")
    device = resolve_device(args.device)
    rank, world, device = init_workers(device)
    try:
        run(args, dest, device, rank, world)
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()


def run(args, dest, device, rank, world):
    def say(message):
        if rank == 0:
            print(message, flush=True)

    from ..tasks.instruction_distillation import InstructionDistillationConfig, InstructionDistillationTask

    task = InstructionDistillationTask.setup_task(InstructionDistillationConfig(data=args.data))
    dataset = load_corpus(args.corpus, args.split, task.dictionary)
    lengths = torch.from_numpy(dataset.sizes.astype("int64"))
    if args.text:
        check_text(args.text, len(dataset))
    n_keep = kept_count(args.keep_fraction, len(dataset))
    check(n_keep >= 1, f"--keep-fraction {args.keep_fraction} keeps no document of {len(dataset)}; raise it")

    models = {name: Teacher.load(path, task, dtype=args.dtype, device=str(device), role=name, flag=f"--{name}")
              for name, path in (("teacher", args.teacher), ("reference", args.reference))}
    # Default: the shortest length either model was trained on (or, not recorded, can take).
    window = args.window or min(m.trained_length or max_positions(m.model) for m in models.values())
    window = min(window, *(max_positions(m.model) for m in models.values()))
    check(window <= args.max_tokens, f"--max-tokens {args.max_tokens} is below the window of {window} tokens; "
                                     f"raise it or pass --window {args.max_tokens}")
    say(f"| {args.split}: {len(dataset):,} documents, {int(lengths.sum()):,} tokens; keeping {n_keep:,} "
        f"({args.keep_fraction:g}) by {args.score} score; scored in windows of {window} tokens"
        + (f" by {world} workers" if world > 1 else ""))
    scored, counted = {}, scored_tokens(lengths)  # a document's first token is not scored
    for name, model in models.items():
        logp, seconds = score_with(name, model, task, args, device, dataset, lengths, window, rank, world)
        scored[name] = (model, logp, seconds)
        say(f"| {name} {model.path}: mean log-likelihood {float(logp.sum() / counted.sum()):.4f} nats/token, "
            f"{seconds:.1f}s ({float(lengths.sum()) / max(seconds, 1e-9):,.0f} tokens/s)")
    teacher_logp, reference_logp = scored["teacher"][1], scored["reference"][1]
    scores = difference_scores(teacher_logp, reference_logp, counted, args.score)
    kept = select_top(scores, args.keep_fraction)
    is_kept = torch.zeros(len(dataset), dtype=torch.bool)
    is_kept[kept] = True
    if rank == 0:
        write(args, dest, task, dataset, lengths, scored, scores, kept, is_kept, window, world)
    if world > 1:
        torch.distributed.barrier()  # the others end once the output is there


def write(args, dest, task, dataset, lengths, scored, scores, kept, is_kept, window, world):
    from fairseq.data import indexed_dataset

    teacher_logp, reference_logp = scored["teacher"][1], scored["reference"][1]
    k_tokens = int(lengths[kept].sum())
    counted = scored_tokens(lengths)

    with staged_directory(dest, prefix=".miniplm-") as (_work, out):
        builder = indexed_dataset.make_builder(os.path.join(out, f"{args.split}.bin"), impl="mmap",
                                               vocab_size=len(task.dictionary))
        for i in kept.tolist():
            builder.add_item(dataset[i])
        builder.finalize(os.path.join(out, f"{args.split}.idx"))
        for f in sorted(os.listdir(args.corpus)):  # the other splits and the dictionary, unchanged
            if f.endswith((".bin", ".idx")) and not f.startswith(f"{args.split}.") or f == "dict.txt":
                shutil.copyfile(os.path.join(args.corpus, f), os.path.join(out, f))
        with open(os.path.join(out, "scores.tsv"), "w") as f:
            f.write("index\ttokens\tteacher_logprob\treference_logprob\tscore\tkept\n")  # tokens: the scored
            for i in range(len(dataset)):
                f.write(f"{i}\t{int(counted[i])}\t{float(teacher_logp[i]):.6f}\t{float(reference_logp[i]):.6f}\t"
                        f"{float(scores[i]):.8g}\t{int(is_kept[i])}\n")
        if args.text:
            keep = is_kept.tolist()
            with open(os.path.join(out, f"{args.split}.txt"), "w", encoding="utf-8") as f:
                f.writelines(line + "\n" for i, line in enumerate(text_documents(args.text)) if keep[i])
        record = {
            "method": "MiniPLM difference sampling", "score": args.score, "keep_fraction": args.keep_fraction,
            "split": args.split, "corpus": os.path.abspath(args.corpus), "window": window, "dtype": args.dtype,
            "teacher": scored["teacher"][0].record(), "reference": scored["reference"][0].record(),
            "documents": len(dataset), "tokens": int(lengths.sum()),
            "kept_documents": int(kept.numel()), "kept_tokens": k_tokens,
            "seconds": {name: round(v[2], 2) for name, v in scored.items()}, "workers": world,
        }
        with open(os.path.join(out, "miniplm.json"), "w") as f:
            json.dump(record, f, indent=2)

    def per_token(logp, idx):
        return float(logp[idx].sum() / lengths[idx].sum())

    print(f"| kept {kept.numel():,} documents, {k_tokens:,} tokens ({k_tokens / float(lengths.sum()):.1%}); "
          f"per token, teacher {per_token(teacher_logp, kept):.4f} and reference {per_token(reference_logp, kept):.4f} "
          f"nats on the kept documents: {dest}", flush=True)


if __name__ == "__main__":
    main()
