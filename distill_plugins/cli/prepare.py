"""distill-prepare: instruction jsonl -> fairseq binarized prompt/response pairs.

    distill-prepare --train train.jsonl --valid dev.jsonl --test test.jsonl --destdir data-bin/dolly

Renders each row's prompt with the MiniLLM template, tokenizes prompt and response (a SentencePiece
model trained here on the training split by default, or ``--spm-model`` to reuse one), and writes
``{split}.src`` (prompt) / ``{split}.tgt`` (response) through ``fairseq-preprocess`` with one joined
dictionary. Prompts longer than ``--max-prompt-tokens`` are truncated (DistiLLM, DSKD) or dropped
(MiniLLM) by ``--long-prompts``; responses are cut so prompt + response + EOS fits in
``--max-total-tokens``. Counts go to ``prepare_report.json``. The destination appears only when
everything succeeded (built in a temporary directory, then renamed).

Cross-tokenizer KD (``--criterion uld|min_ed|dskd_cma``): ``--teacher-spm-model`` or
``--teacher-hf-tokenizer`` also writes ``DESTDIR/teacher``, the same rows in the same order in the
teacher's tokenization (a data directory of its own: train the teacher on it, pass it to the
student's fairseq-train as ``--teacher-data``), with ``alignment.json`` (both vocabularies as token
strings and the teacher -> student token mapping by least edit distance, ``token_alignment.py``).
"""
import argparse
import json
import logging
import os
import time

from ..data.instruction_jsonl import read_instruction_jsonl, references, render_prompt
from ..data.prepare_report import REPORT
from ..data.tokenizers import HFTokenizer, SentencePieceTokenizer
from ..errors import DistillError, brief, check
from ..staged_directory import check_output_dir, staged_directory
from ..token_alignment import ALIGNMENT_FILE, dictionary_token_strings, in_student_markers, vocabulary_mapping

SPLITS = ("train", "valid", "test")
INPUTS = ("train", "valid", "test", "spm_model", "hf_tokenizer", "teacher_spm_model", "teacher_hf_tokenizer")
TEACHER_SUBDIR = "teacher"  # cross-tokenizer KD: the teacher's tokenization of the same rows


def binarize(argv):
    """fairseq-preprocess ``argv``, run in this process (fairseq is already imported with the plugin, so
    this saves a second interpreter's start-up). Its report goes to ``{destdir}/preprocess.log`` only."""
    from fairseq import options
    from fairseq_cli import preprocess

    args = options.get_preprocessing_parser().parse_args(argv)
    log = logging.getLogger("fairseq_cli.preprocess")
    saved = log.level, log.propagate
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        preprocess.main(args)
    except Exception as e:
        raise DistillError(f"fairseq-preprocess failed: {type(e).__name__}: {e}") from e
    finally:
        for handler in [h for h in log.handlers if isinstance(h, logging.FileHandler)]:
            log.removeHandler(handler)
            handler.close()
        log.setLevel(saved[0])
        log.propagate = saved[1]


def get_parser():
    p = argparse.ArgumentParser(prog="distill-prepare", description=__doc__.split("\n\n")[0])
    p.add_argument("--train", required=True, help="training jsonl")
    p.add_argument("--valid", help="validation jsonl (validation loss, Rouge-L during training)")
    p.add_argument("--test", help="held-out jsonl (generation and scoring)")
    p.add_argument("--destdir", required=True, help="output directory (e.g. data-bin/dolly)")
    p.add_argument("--tokenizer", choices=["sentencepiece", "hf"], default="sentencepiece",
                   help="hf: the tokenizer of a Hugging Face checkpoint (--hf-tokenizer), ids aligned with its embeddings")
    p.add_argument("--hf-tokenizer", help="Hugging Face checkpoint (or tokenizer) directory for --tokenizer hf")
    p.add_argument("--spm-model", help="an existing SentencePiece model (else one is trained)")
    p.add_argument("--vocab-size", type=int, default=4000, help="size of a newly trained SentencePiece model")
    p.add_argument("--teacher-spm-model", help="cross-tokenizer KD: the teacher's SentencePiece model; the same rows "
                   "tokenized with it go to DESTDIR/teacher (pass it to fairseq-train as --teacher-data)")
    p.add_argument("--teacher-hf-tokenizer", help="cross-tokenizer KD: the teacher's Hugging Face checkpoint (or "
                   "tokenizer) directory, as --teacher-spm-model")
    p.add_argument("--max-prompt-tokens", type=int, default=256)
    p.add_argument("--max-total-tokens", type=int, default=512, help="prompt + response + EOS")
    p.add_argument("--long-prompts", choices=["truncate", "drop"], default="truncate",
                   help="prompts over --max-prompt-tokens: keep the first tokens (DistiLLM) or drop the row (MiniLLM; "
                        "train and valid only: test prompts are always cut, as MiniLLM's evaluation does)")
    p.add_argument("--workers", type=int, default=2, help="fairseq-preprocess worker processes")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --destdir")
    return p


def encode_split(rows, tok, max_prompt, max_total, long_prompts):
    """Token lists for (prompt, response) pairs; returns them, the kept rows and the counts."""
    pairs, kept = [], []
    counts = {"rows": len(rows), "prompts_truncated": 0, "prompts_dropped": 0, "responses_truncated": 0}
    for row in rows:
        text = render_prompt(row)
        prompt = tok.encode(text)
        # tokenised jointly with the prompt, then split at the prompt's length (MiniLLM/DistiLLM
        # process_data_dolly.py; spec 5): a tokenizer that marks word starts (Metaspace) would otherwise
        # begin the response with a word-start piece the joint text does not have
        response = tok.encode(text + references(row)[0])[len(prompt):]
        if len(prompt) > max_prompt:
            if long_prompts == "drop":
                counts["prompts_dropped"] += 1
                continue
            prompt = prompt[:max_prompt]
            counts["prompts_truncated"] += 1
        # the references' (prompt + response + [EOS])[:max_total]: a cut response has no EOS. Its
        # room - P tokens are stored; the EOS binarization appends is cut off by the dataset's
        # --tokens-per-sample window (join_prompt_response), as the reference's slice does
        room = max_total - len(prompt)
        if len(response) > room:
            response = response[: max(room, 0)]
            counts["responses_truncated"] += 1
        pairs.append((prompt, response))
        kept.append(row)
    counts["kept"] = len(pairs)
    return pairs, kept, counts


def spm_tokenizer(path: str, flag: str) -> SentencePieceTokenizer:
    """The SentencePiece model file ``path`` given as ``flag``; one-line errors for anything else."""
    check(not os.path.isdir(path), f"{flag} {path} is a directory; pass the .model file in it (e.g. DATA/spm.model)")
    check(os.path.isfile(path), f"{flag} {path} does not exist")
    try:
        return SentencePieceTokenizer(path)
    except (RuntimeError, OSError) as e:
        raise DistillError(f"{flag} {path} is not a SentencePiece model ({brief(e)}); pass the spm.model file "
                           "of a data directory made by distill-prepare") from None


def teacher_tokenizer(args):
    """The teacher's own tokenizer for cross-tokenizer KD (--teacher-spm-model / --teacher-hf-tokenizer), or None."""
    if args.teacher_spm_model and args.teacher_hf_tokenizer:
        raise DistillError("--teacher-spm-model and --teacher-hf-tokenizer both given; pass the teacher's one tokenizer")
    if args.teacher_hf_tokenizer:
        return HFTokenizer(args.teacher_hf_tokenizer)
    if args.teacher_spm_model:
        return spm_tokenizer(args.teacher_spm_model, "--teacher-spm-model")
    return None


def write_tokenized(tok, data, files, work, out, args, long_prompts):
    """Tokenize every split with ``tok`` and binarize it into ``out`` (dictionary, tokenizer, report,
    the kept rows as jsonl); returns the kept rows of each split."""
    tok.save(out)
    dict_file = os.path.join(work, "dict.txt")
    with open(dict_file, "w", encoding="utf-8") as f:
        f.writelines(f"{piece} 1\n" for piece in tok.vocabulary())
    report = {"tokenizer": tok.kind, "max_prompt_tokens": args.max_prompt_tokens,
              "max_total_tokens": args.max_total_tokens, "long_prompts": long_prompts, "splits": {}}
    prefs, kept_rows = [], {}
    for split, rows in data.items():
        # MiniLLM drops long prompts from train/dev only; its test prompts are cut to their first tokens
        mode = "truncate" if split == "test" else long_prompts
        pairs, kept, counts = encode_split(rows, tok, args.max_prompt_tokens, args.max_total_tokens, mode)
        if not pairs:
            raise DistillError(f"{files[split]}: no example left after dropping long prompts")
        for side, idx in (("src", 0), ("tgt", 1)):
            with open(os.path.join(work, f"{split}.{side}"), "w", encoding="utf-8") as f:
                f.writelines(" ".join(pair[idx]) + "\n" for pair in pairs)
        with open(os.path.join(out, f"{split}.jsonl"), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in kept)
        prompt_lens = [len(p) for p, _ in pairs]
        resp_lens = [len(r) + 1 for _, r in pairs]
        counts["prompt_tokens_mean"] = round(sum(prompt_lens) / len(pairs), 1)
        counts["response_tokens_mean"] = round(sum(resp_lens) / len(pairs), 1)
        report["splits"][split] = counts
        kept_rows[split] = kept
        prefs += [f"--{split}pref", os.path.join(work, split)]
        print(f"| {split}: {counts}", flush=True)
    binarize(["--source-lang", "src", "--target-lang", "tgt", "--joined-dictionary", "--srcdict", dict_file,
              "--destdir", out, "--workers", str(args.workers), *prefs])
    with open(os.path.join(out, REPORT), "w") as f:
        json.dump(report, f, indent=1)
    return kept_rows


def write_alignment(student_tok, student_dir, teacher_tok, teacher_dir):
    """``{teacher_dir}/alignment.json``: both dictionaries as token strings and the teacher -> student
    id mapping by least edit distance (token_alignment.py), what MinED needs at training time."""
    from fairseq.data import Dictionary

    t0 = time.time()
    student = dictionary_token_strings(student_tok, Dictionary.load(os.path.join(student_dir, "dict.src.txt")))
    teacher = dictionary_token_strings(teacher_tok, Dictionary.load(os.path.join(teacher_dir, "dict.src.txt")))
    mapping = vocabulary_mapping(teacher, student)
    exact = sum(q == student[j] for q, j in zip(in_student_markers(teacher, student), mapping))
    with open(os.path.join(teacher_dir, ALIGNMENT_FILE), "w", encoding="utf-8") as f:
        json.dump({"student_tokens": student, "teacher_tokens": teacher, "teacher_to_student": mapping},
                  f, ensure_ascii=False)
    print(f"| teacher -> student vocabulary mapping: {exact} of {len(teacher)} teacher tokens matched exactly "
          f"({time.time() - t0:.1f}s)", flush=True)


def main(argv=None):
    args = get_parser().parse_args(argv)
    if args.max_prompt_tokens < 1 or args.max_total_tokens <= args.max_prompt_tokens:
        raise DistillError("need 0 < --max-prompt-tokens < --max-total-tokens")
    if args.workers < 1:
        raise DistillError(f"--workers must be >= 1, got {args.workers}")
    if (args.tokenizer == "hf") != bool(args.hf_tokenizer):
        raise DistillError("--tokenizer hf and --hf-tokenizer DIR go together")
    if args.tokenizer == "hf":
        ignored = [flag for flag, given in (("--spm-model", args.spm_model),
                                            ("--vocab-size", args.vocab_size != get_parser().get_default("vocab_size")))
                   if given]
        check(not ignored, f"{' and '.join(ignored)} {'are' if len(ignored) > 1 else 'is'} for the SentencePiece "
                           "tokenizer; --tokenizer hf keeps the --hf-tokenizer's own vocabulary: drop "
                           + ("them" if len(ignored) > 1 else "it"))
    dest = check_output_dir(args.destdir, "--destdir", REPORT, args.overwrite,
                            [(f"--{name.replace('_', '-')}", getattr(args, name)) for name in INPUTS])

    t0 = time.time()
    files = {s: getattr(args, s) for s in SPLITS if getattr(args, s)}
    data = {s: read_instruction_jsonl(path) for s, path in files.items()}  # validate all first
    print(f"| read {', '.join(f'{s}: {len(r)} rows' for s, r in data.items())}", flush=True)

    teacher_tok = teacher_tokenizer(args)
    student_spm = spm_tokenizer(args.spm_model, "--spm-model") if args.spm_model and args.tokenizer != "hf" else None
    with staged_directory(dest, prefix=".prepare-") as (work, out):
        if args.tokenizer == "hf":
            tok = HFTokenizer(args.hf_tokenizer)
            print(f"| Hugging Face tokenizer {args.hf_tokenizer}, {tok.vocab.size} tokens", flush=True)
        elif student_spm is not None:
            tok = student_spm
        else:
            texts = [t for r in data["train"] for t in (render_prompt(r), references(r)[0])]
            tok = SentencePieceTokenizer.train(texts, os.path.join(work, "spm"), args.vocab_size)
            print(f"| trained a SentencePiece model, {tok.sp.get_piece_size()} pieces", flush=True)
        kept = write_tokenized(tok, data, files, work, out, args, args.long_prompts)
        if teacher_tok is not None:
            # the teacher's tokenization of exactly the rows kept for the student, in the same order;
            # a teacher prompt over --max-prompt-tokens is truncated (never dropped: rows stay paired)
            t_work, t_out = os.path.join(work, TEACHER_SUBDIR), os.path.join(out, TEACHER_SUBDIR)
            os.makedirs(t_work)
            os.makedirs(t_out)
            print(f"| teacher tokenization ({teacher_tok.kind}) in {TEACHER_SUBDIR}/", flush=True)
            write_tokenized(teacher_tok, kept, files, t_work, t_out, args, "truncate")
            write_alignment(tok, out, teacher_tok, t_out)
    print(f"| wrote {dest} in {time.time() - t0:.1f}s", flush=True)


if __name__ == "__main__":
    main()
