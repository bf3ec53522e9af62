"""distill-evaluate: Rouge-L of a checkpoint on instruction-following sets, as MiniLLM/DistiLLM report it.

    distill-evaluate checkpoints/kd/checkpoint_best.pt --data data-bin/dolly \\
        --eval-files dolly/valid.jsonl self-inst/valid.jsonl --json kd.json --md kd.md

For each evaluation jsonl (``instruction``, ``input``, ``output`` string or list, optional
``prompt``) and each seed, one response per prompt is sampled with the task's generator and
scored with Rouge-L; the mean and standard deviation over seeds go to JSON and markdown.
Defaults are the papers' (spec section 5): sampling with top-k 0 and top-p 1.0 (off), temperature
1.0, no-repeat n-gram size 6, prompts cut to their first 256 tokens (counted in the report), 512
tokens in all (prompt + response), seeds 10 20 30 40 50, rouge-score with stemming, F x 100, the
maximum over references. The example's files are MiniLLM's evaluation sets, which MiniLLM names
``valid.jsonl`` although they are test sets. PATH may also be a directory (every ``*.pt`` in it is
evaluated and the best per file is named: a report on those files; select checkpoints on a dev
set, never on test sets) or fairseq-generate output files (scored as one run, one file per seed, against
``--eval-files`` or the data directory's ``{--split}.jsonl``; each file must answer every example).
Outputs appear only when every step succeeded, and replace existing files only with ``--overwrite``.
"""
import argparse
import logging
import os
import re
import sys
import time
import zipfile
from collections import Counter
from typing import Dict, List

from ..data.instruction_jsonl import read_instruction_jsonl
from ..data.tokenizers import load_tokenizer
from ..errors import DistillError
from ..evaluation.generation_settings import SamplingSettings
from ..evaluation.report_files import check_outputs, write_atomic, write_json_atomic, write_text_atomic
from ..evaluation.result_tables import rouge_table, speed_table
from ..evaluation.scoring import response_text, score_generation_files, score_responses, seed_summary, token_pieces

DEFAULT_SEEDS = [10, 20, 30, 40, 50]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds ``(default: X)`` only where the help does not name its default and X is a value."""

    def _get_help_string(self, action):
        if "default" in (action.help or "") or action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def get_parser():
    p = argparse.ArgumentParser(prog="distill-evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="checkpoint(s), a directory of checkpoints, or fairseq-generate output files (one per seed)")
    p.add_argument("--data", required=True, help="data directory made by distill-prepare (dictionary, tokenizer)")
    p.add_argument("--eval-files", nargs="+", default=None,
                   help="evaluation jsonl files (default: the data directory's {--split}.jsonl)")
    p.add_argument("--split", default="test", help="data directory split used when no --eval-files are given")
    p.add_argument("--max-examples", type=int, default=None,
                   help="evaluate only the first N rows of each file (the protocol caps UnNI at 10000)")
    p.add_argument("--seeds", nargs="+", type=int, default=DEFAULT_SEEDS, help="one sampling pass per seed")
    p.add_argument("--top-k", type=int, default=0, help="0: off")
    p.add_argument("--top-p", type=float, default=1.0, help="1.0: off")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    p.add_argument("--no-repeat-ngram-size", type=int, default=6, help="0: off")
    p.add_argument("--max-prompt-tokens", type=int, default=256, help="longer prompts keep their first tokens")
    p.add_argument("--max-length", type=int, default=512,
                   help="prompt + response tokens; a response has at most --max-length - --max-prompt-tokens")
    p.add_argument("--batch-size", type=int, default=32, help="prompts per generation batch")
    p.add_argument("--max-tokens", type=int, default=None, help="prompt tokens per batch (optional)")
    p.add_argument("--cpu", action="store_true", help="generate on CPU even if a GPU is present")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="model precision")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--md", help="write the markdown tables here (default: --json with .md)")
    p.add_argument("--responses", help="write every generated response here (jsonl)")
    p.add_argument("--overwrite", action="store_true", help="replace existing --json/--md/--responses files")
    p.add_argument("--name", help="label of the run (one checkpoint or one set of generation files)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


# -- inputs ------------------------------------------------------------------------------------------
def _natural_key(path: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", os.path.basename(path))]


def is_checkpoint(path: str) -> bool:
    """torch.save files are zip archives (or legacy pickles, which start with 0x80)."""
    if zipfile.is_zipfile(path):
        return True
    with open(path, "rb") as f:
        return f.read(1) == b"\x80"


def resolve_paths(paths: List[str]):
    """('checkpoints', [files]) or ('generations', [files]); every problem is a one-line error."""
    checkpoints, generations = [], []
    for path in paths:
        if os.path.isdir(path):
            found = sorted((os.path.join(path, f) for f in os.listdir(path) if f.endswith(".pt")), key=_natural_key)
            if not found:
                raise DistillError(f"directory {path} has no *.pt checkpoints")
            checkpoints += found
        elif not os.path.exists(path):
            raise DistillError(f"checkpoint {path} does not exist; pass a checkpoint, a directory of checkpoints "
                               "or fairseq-generate output")
        elif not os.access(path, os.R_OK):
            raise DistillError(f"{path} is not readable; check its permissions")
        elif is_checkpoint(path):
            checkpoints.append(path)
        else:
            generations.append(path)
    if checkpoints and generations:
        raise DistillError(f"{generations[0]} is generation output but {checkpoints[0]} is a checkpoint; "
                           "evaluate checkpoints and score generation files in separate calls")
    return ("checkpoints", checkpoints) if checkpoints else ("generations", generations)


def eval_set_labels(paths: List[str]) -> List[str]:
    """File stems (``valid``), or ``parent/stem`` where stems collide (MiniLLM's ``dolly/valid.jsonl``)."""
    stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    counts = Counter(stems)
    labels = [f"{os.path.basename(os.path.dirname(os.path.abspath(p)))}/{s}" if counts[s] > 1 else s
              for p, s in zip(paths, stems)]
    repeated = [p for p, label in zip(paths, labels) if labels.count(label) > 1]
    if repeated:
        raise DistillError(f"evaluation file {repeated[0]} is given twice")
    return labels


def run_labels(paths: List[str]) -> List[str]:
    stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    counts = Counter(stems)
    return [f"{os.path.basename(os.path.dirname(os.path.abspath(p)))}/{s}" if counts[s] > 1 else s
            for p, s in zip(paths, stems)]


# -- checkpoints ---------------------------------------------------------------------------------------
def load_checkpoint(path: str, data: str, device, dtype: str):
    """The model and task of a fairseq checkpoint, built on ``data``'s dictionary, in eval mode."""
    import torch
    from fairseq import checkpoint_utils

    import distill_plugins  # noqa: F401  (registers the task and architectures)

    try:
        models, _cfg, task = checkpoint_utils.load_model_ensemble_and_task([path], arg_overrides={"data": data})
    except DistillError:
        raise
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DistillError(f"checkpoint {path} could not be loaded ({type(e).__name__}: {msg[:300]}); "
                           "is it a fairseq-distill checkpoint trained on this --data dictionary?") from None
    model = models[0].eval()
    model.to(device=device, dtype={"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype])
    return model, task


def evaluate_checkpoint(path, name, eval_sets, args, settings, device, progress, responses_out) -> Dict:
    from ..evaluation.batched_generation import generate_dataset, prompt_dataset

    model, task = load_checkpoint(path, args.data, device, args.dtype)
    generator = task.build_generator([model], settings.generator_args())
    run = {"name": name, "source": os.path.abspath(path), "kind": "checkpoint", "files": []}
    for es in eval_sets:
        dataset = prompt_dataset(es["prompts"], task.dictionary)
        per_seed, seconds, n_tokens = {}, 0.0, 0
        for seed in args.seeds:
            gen = generate_dataset(task, model, generator, dataset, seed, args.batch_size, args.max_tokens, progress)
            pieces = {i: token_pieces(task.dictionary, t) for i, t in gen.responses.items()}
            texts = {i: response_text(es["tokenizer"], p) for i, p in pieces.items()}
            per_seed[seed], _ = score_responses(texts, es["rows"], source=es["path"])
            seconds += gen.seconds
            n_tokens += gen.generated_tokens
            if responses_out is not None:
                responses_out.extend({"run": name, "eval_set": es["label"], "seed": seed, "id": i,
                                      "response": texts[i], "tokens": pieces[i]} for i in sorted(texts))
        n_responses = len(es["rows"]) * len(args.seeds)
        run["files"].append({
            "name": es["label"], "path": os.path.abspath(es["path"]), "examples": len(es["rows"]),
            "seeds": len(args.seeds), "prompts_truncated": es["truncated"],
            **seed_summary(list(per_seed.values())), "per_seed": {str(s): v for s, v in per_seed.items()},
            "seconds": round(seconds, 3), "generated_tokens": n_tokens,
            "responses_per_s": n_responses / seconds if seconds > 0 else None,
            "tokens_per_s": n_tokens / seconds if seconds > 0 else None,
        })
    return run


# -- main -------------------------------------------------------------------------------------------
def check_args(args):
    settings = check_values(args)
    if not os.path.isdir(args.data):
        raise DistillError(f"data directory {args.data} does not exist; pass the directory made by distill-prepare")
    if not os.path.isfile(os.path.join(args.data, "dict.src.txt")):
        raise DistillError(f"{args.data} has no dict.src.txt; prepare it with distill-prepare")
    return settings


GENERATION_OPTIONS = ("max_examples", "seeds", "top_k", "top_p", "temperature", "no_repeat_ngram_size",
                      "max_prompt_tokens", "max_length", "batch_size", "max_tokens", "dtype", "responses")


def check_generation_options(args):
    """Generation files are scored as they are: the options that sample responses from a checkpoint
    would be ignored, so they are refused."""
    parser = get_parser()
    changed = [name for name in GENERATION_OPTIONS if getattr(args, name) != parser.get_default(name)]
    if changed:
        flags = ", ".join("--" + name.replace("_", "-") for name in changed)
        raise DistillError(f"{flags} apply only when evaluating checkpoints; generation files are scored as they "
                           "are (one file per seed): drop " + ("it" if len(changed) == 1 else "them"))


def check_values(args):
    """The option values alone (no file is read): also what distill-chain checks before any stage."""
    if not args.seeds:
        raise DistillError("--seeds needs at least one seed")
    if args.max_examples is not None and args.max_examples < 1:
        raise DistillError(f"--max-examples must be >= 1, got {args.max_examples}")
    if len(set(args.seeds)) != len(args.seeds):
        raise DistillError(f"--seeds {' '.join(map(str, args.seeds))}: a seed is repeated")
    if args.max_prompt_tokens < 1 or args.max_length <= args.max_prompt_tokens:
        raise DistillError("need 0 < --max-prompt-tokens < --max-length (the response needs room)")
    if args.batch_size < 1:
        raise DistillError("--batch-size must be >= 1")
    return SamplingSettings(args.top_k, args.top_p, args.temperature, args.no_repeat_ngram_size,
                            args.max_length, args.max_length - args.max_prompt_tokens).check()


def main(argv=None):
    args = get_parser().parse_args(argv)
    logging.getLogger().setLevel(logging.WARNING)  # fairseq's task imports configure DEBUG logging
    settings = check_args(args)
    md_path = args.md or (os.path.splitext(args.json)[0] + ".md" if args.json else None)
    kind, paths = resolve_paths(args.paths)
    eval_files = args.eval_files or [os.path.join(args.data, f"{args.split}.jsonl")]
    if kind == "generations":
        check_generation_options(args)
    check_outputs([args.json, md_path, args.responses], args.overwrite, inputs=[*paths, *eval_files])
    tokenizer = load_tokenizer(args.data)
    labels = eval_set_labels(eval_files)
    rows_of = [read_instruction_jsonl(p)[:args.max_examples] for p in eval_files]  # validate all before any work

    t0 = time.time()
    responses_out = [] if args.responses else None
    if kind == "generations":
        if len(eval_files) != 1:
            raise DistillError("generation files are scored against one reference file; pass one --eval-files")
        scores = score_generation_files(paths, rows_of[0], tokenizer, eval_files[0],
                                        "rerun fairseq-generate to completion on it, or pass the --split "
                                        "(or --eval-files) it was generated on")
        n = len(rows_of[0])
        runs = [{"name": args.name or run_labels(paths[:1])[0], "kind": "generations",
                 "sources": [os.path.abspath(p) for p in paths],
                 "files": [{"name": labels[0], "path": os.path.abspath(eval_files[0]), "examples": n,
                            "seeds": len(scores), **seed_summary(scores),
                            "per_seed": {os.path.basename(p): s for p, s in zip(paths, scores)}}]}]
    else:
        import torch
        from tqdm import tqdm

        from ..evaluation.batched_generation import encode_prompts, prompt_dataset

        if args.name and len(paths) > 1:
            raise DistillError("--name labels one checkpoint; several are given")
        device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
        from fairseq.data import Dictionary

        dictionary = Dictionary.load(os.path.join(args.data, "dict.src.txt"))
        eval_sets = []
        for path, label, rows in zip(eval_files, labels, rows_of):
            prompts, truncated = encode_prompts(rows, tokenizer, dictionary, args.max_prompt_tokens)
            eval_sets.append({"path": path, "label": label, "rows": rows, "prompts": prompts,
                              "truncated": truncated, "tokenizer": tokenizer})
            if truncated:
                print(f"| {label}: {truncated} of {len(rows)} prompts cut to their first {args.max_prompt_tokens} tokens",
                      file=sys.stderr, flush=True)
        if args.max_tokens is not None:  # fairseq's batching asserts otherwise, after the model is loaded
            longest = max((int(prompt_dataset(es["prompts"], dictionary).sizes.max()), es["label"]) for es in eval_sets)
            if longest[0] > args.max_tokens:
                raise DistillError(f"--max-tokens {args.max_tokens} is below the longest example ({longest[0]} tokens, "
                                   f"prompt + EOS, in {longest[1]}); raise --max-tokens to at least {longest[0]}")
        names = [args.name] if args.name else run_labels(paths)
        runs = []
        for path, name in zip(paths, names):
            total = sum(len(es["rows"]) for es in eval_sets) * len(args.seeds)
            with tqdm(total=total, desc=name, unit="resp", disable=args.no_progress, file=sys.stderr,
                      dynamic_ncols=True) as progress:
                runs.append(evaluate_checkpoint(path, name, eval_sets, args, settings, device, progress, responses_out))

    best = {}
    for label in labels:
        scored = [(f["rouge_l"], r["name"]) for r in runs for f in r["files"] if f["name"] == label]
        best[label] = max(scored)[1]
    protocol = {"metric": "Rouge-L F x 100 (rouge-score, stemming), max over references",
                "std": "population std over seeds"}
    if kind == "checkpoints":  # generation files were sampled elsewhere, with settings not known here
        protocol = {**settings.to_dict(), "sampling": True, "max_prompt_tokens": args.max_prompt_tokens,
                    "seeds": args.seeds, "max_examples": args.max_examples, **protocol}
    result = {
        "tool": "distill-evaluate",
        "protocol": protocol,
        "data": os.path.abspath(args.data),
        "runs": runs,
        "best": best,
        "seconds": round(time.time() - t0, 3),
    }
    tables = "## Rouge-L (mean ± std over seeds)\n\n" + rouge_table(runs)
    if kind == "checkpoints":
        tables += "\n## Generation\n\n" + speed_table(runs)
    if len(runs) > 1:
        tables += "\nBest: " + ", ".join(f"{k}: {v}" for k, v in best.items()) + "\n"
    # every output is written only now, each atomically
    if args.responses:
        import json

        write_atomic(args.responses, lambda f: f.writelines(json.dumps(r, ensure_ascii=False) + "\n"
                                                            for r in responses_out))
    if args.json:
        write_json_atomic(args.json, result)
    if md_path:
        write_text_atomic(md_path, tables)
    print(tables, end="")


if __name__ == "__main__":
    main()
