"""distill-score: Rouge-L of fairseq-generate output against the prepared references.

    distill-score data-bin/dolly generate-test.txt [more files: one per seed] --json out.json

Hypotheses (H- lines, token strings) are decoded with the data directory's tokenizer; references
are the ``output`` fields of ``{data}/{split}.jsonl`` (several references: the max counts).
Several files are taken as several seeds: the mean and standard deviation over them are reported.
Each file must answer every example of the split exactly once (no truncated output, no other split).
"""
import argparse
import os

from ..data.instruction_jsonl import read_instruction_jsonl
from ..data.tokenizers import load_tokenizer
from ..evaluation.report_files import check_outputs, write_json_atomic
from ..evaluation.scoring import score_generation_files, seed_summary


def main(argv=None):
    p = argparse.ArgumentParser(prog="distill-score", description=__doc__.split("\n\n")[0])
    p.add_argument("data", help="data directory made by distill-prepare")
    p.add_argument("generations", nargs="+", help="fairseq-generate output files (one per seed)")
    p.add_argument("--split", default="test", help="the split generated (fairseq-generate --gen-subset)")
    p.add_argument("--json", help="write the result here")
    p.add_argument("--name", default=None, help="label of this run in the result")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    args = p.parse_args(argv)
    reference = os.path.join(args.data, f"{args.split}.jsonl")
    check_outputs([args.json], args.overwrite, inputs=[*args.generations, reference])
    rows = read_instruction_jsonl(reference)
    tokenizer = load_tokenizer(args.data)
    scores = score_generation_files(
        args.generations, rows, tokenizer, f"split {args.split!r} ({reference})",
        f"rerun fairseq-generate to completion on it (--gen-subset {args.split}), or pass the --split it was generated on")
    n = len(rows)
    result = {
        "name": args.name,
        "split": args.split,
        "examples": n,
        "seeds": len(scores),
        **seed_summary(scores),
        "per_file": dict(zip(args.generations, scores)),
    }
    print(f"Rouge-L {result['rouge_l']:.2f} (std {result['rouge_l_std']:.2f}, {len(scores)} file(s), {n} examples)")
    if args.json:
        write_json_atomic(args.json, result)


if __name__ == "__main__":
    main()
