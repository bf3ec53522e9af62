"""Plain text -> binarized language-modelling data with a prepared data directory's tokenizer and
dictionary (MiniLLM's and DistiLLM's ``--lm-data``, MiniPLM's pre-training corpus, and
``fairseq-train --task language_modeling``).

    python -m distill_plugins.cli.prepare_lm --data data-bin/dolly --train corpus.txt [--valid dev.txt] \
        --destdir data-bin/lm

Each non-empty line of a text file is one document, tokenized with DATA's tokenizer and followed by
EOS; the output is what ``fairseq-preprocess --only-source --srcdict DATA/dict.src.txt`` writes
(``train.{bin,idx}``, ``valid.{bin,idx}`` with --valid, mmap format, and ``dict.txt``), binarized
here directly, and ``prepare_lm.json`` (the counts). The destination appears only when everything succeeded.
"""
import argparse
import json
import os
import shutil

from fairseq.data import Dictionary, indexed_dataset

from ..data.tokenizers import load_tokenizer
from ..errors import DistillError, not_utf8
from ..staged_directory import check_output_dir, staged_directory

MARKER = "prepare_lm.json"  # what was binarized from what: marks the directory as this tool's output


def binarize_text(text_file: str, tok, dictionary: Dictionary, prefix: str, flag: str):
    """One document per non-empty line of ``text_file`` -> ``prefix.{bin,idx}``; (documents, tokens, unk)."""
    builder = indexed_dataset.make_builder(prefix + ".bin", impl="mmap", vocab_size=len(dictionary))
    n, ntok, nunk = 0, 0, 0
    try:
        with open(text_file, encoding="utf-8") as fin:
            for line in fin:
                if not line.strip():
                    continue
                ids = dictionary.encode_line(" ".join(tok.encode(line.strip())), add_if_not_exist=False,
                                             append_eos=True).long()
                builder.add_item(ids)
                n, ntok, nunk = n + 1, ntok + len(ids), nunk + int((ids == dictionary.unk()).sum())
    except UnicodeDecodeError:
        raise not_utf8(f"{flag} {text_file}") from None
    if n == 0:
        raise DistillError(f"{flag} {text_file} has no non-empty line")
    builder.finalize(prefix + ".idx")
    return n, ntok, nunk


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m distill_plugins.cli.prepare_lm", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="data directory made by distill-prepare (tokenizer, dictionary)")
    p.add_argument("--train", required=True, help="text file, one document per line")
    p.add_argument("--valid", help="text file of the validation documents (optional)")
    p.add_argument("--destdir", required=True)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --destdir")
    args = p.parse_args(argv)
    dict_file = os.path.join(args.data, "dict.src.txt")
    if not os.path.isfile(dict_file):
        raise DistillError(f"{args.data} has no dict.src.txt; pass a directory made by distill-prepare")
    splits = {"train": args.train, **({"valid": args.valid} if args.valid else {})}
    for split, path in splits.items():
        if not os.path.isfile(path):
            raise DistillError(f"--{split} {path} does not exist")
    dest = check_output_dir(args.destdir, "--destdir", MARKER, args.overwrite,
                            [("--data", args.data), *((f"--{split}", path) for split, path in splits.items())])
    tok = load_tokenizer(args.data)
    dictionary = Dictionary.load(dict_file)
    with staged_directory(dest, prefix=".prepare-lm-") as (_, out):
        counts = {split: binarize_text(path, tok, dictionary, os.path.join(out, split), f"--{split}")
                  for split, path in splits.items()}
        shutil.copyfile(dict_file, os.path.join(out, "dict.txt"))
        with open(os.path.join(out, MARKER), "w") as f:
            json.dump({"data": os.path.abspath(args.data), "splits": {
                split: {"text": os.path.abspath(splits[split]), "documents": n, "tokens": ntok, "unk": nunk}
                for split, (n, ntok, nunk) in counts.items()}}, f, indent=1)
    for split, (n, ntok, nunk) in counts.items():
        print(f"| {split}: wrote {n} documents, {ntok} tokens ({nunk} <unk>) to {dest}", flush=True)


if __name__ == "__main__":
    main()
