"""The one mapping between a Hugging Face tokenizer's ids and the fairseq dictionary's rows.

fairseq's ``Dictionary`` always starts with ``<s> <pad> </s> <unk>`` (ids 0-3) and takes every
other symbol from ``dict.txt`` in file order. An HF tokenizer has its own ids 0..n-1 and its own
special tokens. The fairseq dictionary is made an exact permutation of the HF vocabulary:

* fairseq ``</s>`` (2) *is* the tokenizer's EOS, so generation stops where HF's would;
* fairseq ``<s>`` (0), ``<pad>`` (1), ``<unk>`` (3) are the tokenizer's BOS, PAD, UNK when it has
  them as tokens distinct from EOS (and from each other); otherwise they are *absent rows*: fairseq
  symbols no HF token maps to (GPT-2 has only ``<|endoftext|>``, so its pad, bos and unk are absent);
* every other HF id ``h``, ascending, follows as the symbol ``str(h)`` (the token strings
  themselves may contain whitespace; their ids never do).

So ``dict.txt`` is written by :meth:`HFVocab.dict_symbols` and ``fairseq id -> HF id`` is the array
:attr:`HFVocab.fairseq_to_hf` (-1 for absent rows). Model weights are permuted with it on import
(:meth:`to_fairseq_rows`) and back on export (:meth:`to_hf_rows`); absent rows never get probability
(the models give them the logit :data:`ABSENT_LOGIT`). fairseq-preprocess is given ``--srcdict``, so
it adds no padding rows (``--padding-factor`` applies only to dictionaries it builds itself).
"""
import hashlib
import json
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from ..errors import DistillError

FAIRSEQ_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")  # fairseq ids 0..3: bos, pad, eos, unk
SPECIAL_ROLES = ("bos", "pad", "eos", "unk")
# Logit of a row no HF token maps to: exp underflows to exactly 0 in fp16/bf16/fp32 softmax, and
# unlike -inf it never makes 0 * log(0) = NaN in a loss.
ABSENT_LOGIT = -1e4


@dataclass(frozen=True)
class HFVocab:
    size: int  # HF tokenizer ids 0..size-1
    specials: Dict[str, Optional[int]]  # role -> HF id playing fairseq's <s>/<pad>/</s>/<unk>, or None

    @classmethod
    def from_tokenizer(cls, tok) -> "HFVocab":
        """Assign the tokenizer's special tokens to fairseq's four; refuse a tokenizer without EOS."""
        ids = set(tok.get_vocab().values())
        size = len(tok)
        if ids != set(range(size)):
            raise DistillError(f"the tokenizer's ids are not 0..{size - 1} without gaps; it cannot be mapped")
        eos = tok.eos_token_id
        if eos is None:
            raise DistillError("the tokenizer has no EOS token; fairseq needs one to end sequences")
        taken = {eos}
        specials = {"eos": eos}
        for role in ("bos", "pad", "unk"):
            h = getattr(tok, f"{role}_token_id")
            specials[role] = h if h is not None and h not in taken else None
            if h is not None:
                taken.add(h)
        return cls(size=size, specials=specials)

    @classmethod
    def from_meta(cls, meta: dict) -> "HFVocab":
        return cls(size=int(meta["size"]), specials={r: meta["specials"][r] for r in SPECIAL_ROLES})

    def meta(self) -> dict:
        return {"size": self.size, "specials": dict(self.specials)}

    # -- the permutation -------------------------------------------------------------------
    @property
    def fairseq_to_hf(self) -> List[int]:
        head = [self.specials[r] if self.specials[r] is not None else -1 for r in SPECIAL_ROLES]
        used = {h for h in head if h >= 0}
        return head + [h for h in range(self.size) if h not in used]

    @property
    def hf_to_fairseq(self) -> List[int]:
        inv = [-1] * self.size
        for f, h in enumerate(self.fairseq_to_hf):
            if h >= 0:
                inv[h] = f
        return inv

    def __len__(self):
        """Rows of the fairseq dictionary (HF ids plus absent rows)."""
        return len(self.fairseq_to_hf)

    def absent_rows(self) -> List[int]:
        return [f for f, h in enumerate(self.fairseq_to_hf) if h < 0]

    def dict_symbols(self) -> List[str]:
        """The symbols after fairseq's own four, in order: the lines of dict.txt."""
        return [str(h) for h in self.fairseq_to_hf[4:]]

    def symbol(self, hf_id: int) -> str:
        f = self.hf_to_fairseq[hf_id]
        return FAIRSEQ_SPECIALS[f] if f < 4 else str(hf_id)

    def hf_id(self, symbol: str) -> Optional[int]:
        """HF id of a fairseq symbol; None for absent rows and fairseq-only symbols."""
        if symbol in FAIRSEQ_SPECIALS:
            h = self.specials[SPECIAL_ROLES[FAIRSEQ_SPECIALS.index(symbol)]]
            return h
        return int(symbol) if symbol.isdigit() and int(symbol) < self.size else None

    def check_dictionary(self, dictionary, where: str):
        """Refuse a fairseq dictionary that is not this tokenizer's permutation."""
        expected = list(FAIRSEQ_SPECIALS) + self.dict_symbols()
        if list(dictionary.symbols) != expected or dictionary.eos() != 2 or dictionary.pad() != 1:
            raise DistillError(
                f"the dictionary of {where} ({len(dictionary)} symbols) was not built from this Hugging Face "
                f"tokenizer ({self.size} tokens); prepare the data with distill-prepare --tokenizer hf "
                f"--hf-tokenizer <the checkpoint's directory>"
            )

    # -- weights ---------------------------------------------------------------------------
    def to_fairseq_rows(self, hf_rows: torch.Tensor) -> torch.Tensor:
        """[V_hf(+extra), ...] weight in HF id order -> [len(self), ...] in fairseq id order (absent rows 0).

        Rows of the HF table past the tokenizer (embedding sizes padded to a multiple) are dropped.
        """
        if hf_rows.size(0) < self.size:
            raise DistillError(
                f"the checkpoint's embedding has {hf_rows.size(0)} rows but its tokenizer has {self.size} "
                "tokens; the tokenizer does not belong to this checkpoint"
            )
        idx = torch.tensor(self.fairseq_to_hf, dtype=torch.long)
        out = hf_rows.index_select(0, idx.clamp_min(0)).clone()
        out[idx < 0] = 0
        return out

    def to_hf_rows(self, fairseq_rows: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_fairseq_rows`: [len(self), ...] -> [self.size, ...] (absent rows dropped)."""
        if fairseq_rows.size(0) != len(self):
            raise DistillError(
                f"the model has {fairseq_rows.size(0)} vocabulary rows, the tokenizer's dictionary {len(self)}; "
                "export with the data directory the model was trained on"
            )
        return fairseq_rows.index_select(0, torch.tensor(self.hf_to_fairseq, dtype=torch.long)).clone()


def tokenizer_fingerprint(tok) -> str:
    """sha256 over what decides tokenization token for token: the backend pipeline (normalizer,
    pre-tokenizer, model vocab + merges, added tokens, decoder) and the special token ids.
    Padding/truncation settings are ignored."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        content = json.loads(backend.to_str())
        content.pop("padding", None)
        content.pop("truncation", None)
    else:  # a slow tokenizer: its vocabulary (merges are not reachable generically)
        content = {"vocab": sorted(tok.get_vocab().items())}
    content["specials"] = {r: getattr(tok, f"{r}_token_id") for r in SPECIAL_ROLES}
    return hashlib.sha256(json.dumps(content, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
