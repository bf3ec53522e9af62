"""Tokenizers that turn text into the whitespace-free token strings fairseq-preprocess binarizes.

The data directory records its tokenizer in ``tokenizer.json`` so that every later step (training,
generation, scoring) decodes with exactly the same one: a SentencePiece model trained here, or a
Hugging Face checkpoint's own tokenizer (``HFTokenizer``), behind the same four methods.
"""
import json
import os
import shutil
from typing import Iterable, List, Optional

from ..errors import DistillError

TOKENIZER_META = "tokenizer.json"


class SentencePieceTokenizer:
    """A SentencePiece model (unigram, byte fallback, so no text maps to <unk>)."""

    kind = "sentencepiece"

    def __init__(self, model_file: str):
        import sentencepiece as spm

        if not os.path.isfile(model_file):
            raise DistillError(f"sentencepiece model {model_file} does not exist")
        self.model_file = model_file
        self.sp = spm.SentencePieceProcessor(model_file=model_file)
        self._pieces = {self.sp.id_to_piece(i) for i in range(self.sp.get_piece_size())}

    @classmethod
    def train(cls, texts: Iterable[str], model_prefix: str, vocab_size: int) -> "SentencePieceTokenizer":
        import sentencepiece as spm

        try:
            cls._train(spm, texts, model_prefix, vocab_size)
        except RuntimeError as e:
            msg = str(e).strip().splitlines()[-1]
            raise DistillError(f"training the SentencePiece model failed ({msg}); adjust --vocab-size") from None
        return cls(model_prefix + ".model")

    @staticmethod
    def _train(spm, texts, model_prefix, vocab_size):
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts),
            model_prefix=model_prefix,
            vocab_size=vocab_size,
            model_type="unigram",
            character_coverage=1.0,
            byte_fallback=True,
            hard_vocab_limit=False,
            bos_id=-1,
            eos_id=-1,
            unk_id=0,
            num_threads=2,
            minloglevel=2,
        )

    def encode(self, text: str) -> List[str]:
        return self.sp.encode(text, out_type=str)

    def decode(self, tokens: List[str]) -> str:
        # fairseq's own symbols (<unk>, madeupwordNNNN padding) are not pieces: drop them.
        return self.sp.decode_pieces([t for t in tokens if t in self._pieces])

    def vocabulary(self) -> List[str]:
        """Every piece but <unk> (fairseq's dictionary has its own), in id order."""
        return [self.sp.id_to_piece(i) for i in range(self.sp.get_piece_size()) if i != self.sp.unk_id()]

    def save(self, directory: str) -> dict:
        shutil.copyfile(self.model_file, os.path.join(directory, "spm.model"))
        meta = {"type": self.kind, "model": "spm.model"}
        with open(os.path.join(directory, TOKENIZER_META), "w") as f:
            json.dump(meta, f, indent=1)
        return meta


class HFTokenizer:
    """A Hugging Face checkpoint's own tokenizer (``AutoTokenizer`` from a local directory).

    Tokens are written as fairseq symbols of :class:`distill_plugins.hf.vocab.HFVocab` (the HF id as
    a string, or one of fairseq's four special symbols), so the dictionary, the binarized data and
    the checkpoint's embedding rows are one permutation apart. No special tokens are added to text.
    """

    kind = "hf"
    subdir = "hf_tokenizer"  # HF's own tokenizer.json must not overwrite ours

    def __init__(self, directory: str):
        from ..hf.checkpoint_dir import load_tokenizer as load_hf_tokenizer
        from ..hf.vocab import HFVocab, tokenizer_fingerprint

        self.directory = directory
        self.tok = load_hf_tokenizer(directory)
        self.vocab = HFVocab.from_tokenizer(self.tok)
        self.fingerprint = tokenizer_fingerprint(self.tok)

    def encode(self, text: str) -> List[str]:
        return [self.vocab.symbol(h) for h in self.tok.encode(text, add_special_tokens=False)]

    def decode(self, tokens: List[str]) -> str:
        ids = [h for h in (self.vocab.hf_id(t) for t in tokens) if h is not None]
        return self.tok.decode(ids, skip_special_tokens=True)

    def vocabulary(self) -> List[str]:
        return self.vocab.dict_symbols()

    def save(self, directory: str) -> dict:
        self.tok.save_pretrained(os.path.join(directory, self.subdir))
        meta = {"type": self.kind, "dir": self.subdir, "fingerprint": self.fingerprint, **self.vocab.meta()}
        with open(os.path.join(directory, TOKENIZER_META), "w") as f:
            json.dump(meta, f, indent=1)
        return meta


def load_tokenizer_meta(data_dir: str) -> dict:
    path = os.path.join(data_dir, TOKENIZER_META)
    if not os.path.isfile(path):
        raise DistillError(f"{data_dir} has no {TOKENIZER_META}; prepare it with distill-prepare")
    with open(path) as f:
        return json.load(f)


def tokenizer_identity(data_dir: str) -> Optional[dict]:
    """What decides a data directory's tokenization beyond its dict.txt, recorded in checkpoints so
    that a model is never used with data of another tokenizer: the HF tokenizer's fingerprint (dict.txt
    of an HF tokenizer holds only ids, so two tokenizers of one size share it) or the sha256 of the
    SentencePiece model (same pieces, other scores: other segmentations). None without tokenizer.json."""
    if not os.path.isfile(os.path.join(data_dir, TOKENIZER_META)):
        return None
    meta = load_tokenizer_meta(data_dir)
    if meta.get("type") == HFTokenizer.kind:
        return {"type": HFTokenizer.kind, "sha256": meta.get("fingerprint")}
    model = os.path.join(data_dir, meta.get("model", ""))
    if meta.get("type") == SentencePieceTokenizer.kind and os.path.isfile(model):
        from ..teacher import sha256_file

        return {"type": SentencePieceTokenizer.kind, "sha256": sha256_file(model)}
    return None


def check_tokenizer_identity(recorded: Optional[dict], data_dir: str, what: str, fix: str) -> None:
    """Refuse ``what`` (a checkpoint, with the ``tokenizer_identity`` it recorded) for the data in
    ``data_dir`` if their tokenizers differ; nothing to compare (older checkpoints, plain data): pass."""
    current = tokenizer_identity(data_dir)
    if not recorded or current is None or recorded == current:
        return
    raise DistillError(
        f"{what} was trained on data of another tokenizer than {data_dir} ({recorded.get('type')} "
        f"{str(recorded.get('sha256'))[:12]} vs {current['type']} {str(current['sha256'])[:12]}; the dictionaries "
        f"may look alike, the token ids mean other text); {fix}"
    )


def load_tokenizer(data_dir: str):
    """The tokenizer recorded in a prepared data directory."""
    path = os.path.join(data_dir, TOKENIZER_META)
    if not os.path.isfile(path):
        raise DistillError(
            f"{data_dir} has no {TOKENIZER_META}; prepare it with distill-prepare"
        )
    with open(path) as f:
        meta = json.load(f)
    if meta.get("type") == SentencePieceTokenizer.kind:
        return SentencePieceTokenizer(os.path.join(data_dir, meta["model"]))
    if meta.get("type") == HFTokenizer.kind:
        return HFTokenizer(os.path.join(data_dir, meta["dir"]))
    raise DistillError(f"{path}: unknown tokenizer type {meta.get('type')!r}")
