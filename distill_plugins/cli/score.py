"""distill-score: Rouge-L of fairseq-generate output against the prepared references.

    distill-score data-bin/dolly generate-test.txt [more files: one per seed] --json out.json

Hypotheses (H- lines, token strings) are decoded with the data directory's tokenizer; references
are the ``output`` fields of ``{data}/{split}.jsonl`` (several references: the max counts).
Several files are taken as several seeds: the mean and standard deviation over them are reported.
"""
import argparse
import json
import os
import statistics

from ..data.instruction_jsonl import read_instruction_jsonl, references
from ..data.tokenizers import load_tokenizer
from ..errors import DistillError
from ..evaluation.fairseq_output import read_hypotheses
from ..evaluation.rouge import clean_response, corpus_rouge_l


def score_generation_file(path, rows, tokenizer):
    hyps = read_hypotheses(path)
    missing = [i for i in hyps if i >= len(rows)]
    if missing:
        raise DistillError(f"{path}: sample id {missing[0]} is beyond the {len(rows)} reference rows")
    ids = sorted(hyps)
    preds = [clean_response(tokenizer.decode(hyps[i])) for i in ids]
    return corpus_rouge_l(preds, [references(rows[i]) for i in ids]), len(ids), preds


def main(argv=None):
    p = argparse.ArgumentParser(prog="distill-score", description=__doc__.split("\n\n")[0])
    p.add_argument("data", help="data directory made by distill-prepare")
    p.add_argument("generations", nargs="+", help="fairseq-generate output files (one per seed)")
    p.add_argument("--split", default="test")
    p.add_argument("--json", help="write the result here")
    p.add_argument("--name", default=None, help="label of this run in the result")
    args = p.parse_args(argv)
    rows = read_instruction_jsonl(os.path.join(args.data, f"{args.split}.jsonl"))
    tokenizer = load_tokenizer(args.data)
    scores, n = [], 0
    for path in args.generations:
        score, n, _ = score_generation_file(path, rows, tokenizer)
        scores.append(score)
    result = {
        "name": args.name,
        "split": args.split,
        "examples": n,
        "seeds": len(scores),
        "rouge_l": statistics.fmean(scores),
        "rouge_l_std": statistics.pstdev(scores) if len(scores) > 1 else 0.0,
        "per_file": dict(zip(args.generations, scores)),
    }
    print(f"Rouge-L {result['rouge_l']:.2f} (std {result['rouge_l_std']:.2f}, {len(scores)} file(s), {n} examples)")
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1)
        os.replace(tmp, args.json)


if __name__ == "__main__":
    main()
