"""Offline teacher cache: the teacher's top-k log-probabilities at every label token, computed once.

The teacher forward is most of a KD step's FLOPs (about 75% for GPT-2 XL -> base). ``distill-cache-teacher``
runs it once over the data (inference mode, batched, any dtype) and stores, for every label position
(response token or its EOS) of every example, the k most probable tokens K, their log-probabilities
log p_i (float32 softmax of the teacher's logits at T = 1) and

    tail = log( sum_{j not in K} p_j / (V - k) )        (logsumexp over the other tokens: no cancellation)

``--teacher-cache DIR`` (task option) then trains without the teacher: each row is rebuilt as the logits

    z_j = log p_j  (j in K),     z_j = tail  (j not in K)

a distribution that keeps the top-k probabilities exactly and spreads the rest of the mass evenly, so every
divergence, chunked or fused path and the Triton kernel run unchanged (at temperature T on softmax(z / T)).
With k = V and ``--cache-dtype fp32`` it is the teacher itself (tests/test_teacher_cache.py).
``--teacher-cache-tail none`` instead renormalises the teacher over K (plain top-k distillation): the
other entries become -inf, which the divergences mask (``divergences.py``).

Examples are found by content, not by index: key = blake2b-64 of (source tokens, number of labels), so the
cache serves any order, sharding or subset of the data it was built from, duplicates are stored once, and a
batch from other data (or other ``--tokens-per-sample`` truncation) is refused with a one-line error.

Layout of DIR (written whole or not at all): ``cache.json`` (teacher path + sha256, dictionary
fingerprint, k, dtype, counts), ``keys.npy`` (sorted uint64), ``offsets.npy`` ([n + 1] int64 into the
rows), ``ids.npy`` ([R, k], uint16 when V <= 65,536 else int32), ``logp.npy`` ([R, k] float16 or float32),
``tail.npy`` ([R] float32). Read memory-mapped.
"""
import hashlib
import json
import logging
import math
import os
import time
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from .errors import DistillError, brief
from .teacher import dictionary_fingerprint

logger = logging.getLogger(__name__)

FORMAT = "fairseq-distill teacher cache v1"
CACHE_DTYPES = {"fp16": np.float16, "fp32": np.float32}


def example_key(tokens, n_labels: int) -> int:
    """Content key of one example: its source tokens (no padding) and number of label positions."""
    h = hashlib.blake2b(digest_size=8)
    h.update(np.asarray(tokens, dtype=np.int64).tobytes())
    h.update(int(n_labels).to_bytes(8, "little"))
    return int.from_bytes(h.digest(), "little")


def batch_keys(src_tokens: Tensor, mask: Tensor, pad: int):
    """``example_key`` of every row of a batch (``mask``: its label positions)."""
    src, counts = src_tokens.cpu(), mask.sum(1).cpu().tolist()
    return [example_key(row[row.ne(pad)].numpy(), n) for row, n in zip(src, counts)]


def dataset_keys(dataset, pad: int):
    """(``example_key``, number of labels) of every example of a ``PromptResponseDataset``, in order."""
    out = []
    for i in range(len(dataset)):
        item = dataset[i]
        n = int(item["target"].ne(pad).sum())
        out.append((example_key(item["source"].numpy(), n), n))
    return out


def label_rows(offsets: np.ndarray, where: np.ndarray) -> np.ndarray:
    """Row indices of the examples at positions ``where`` of the sorted keys, in batch order (each
    example's labels in position order: the row-major order of a batch's mask)."""
    return np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in where])


def top_k_rows(logits: Tensor, k: int):
    """(ids [n, k] int64, log p [n, k], tail [n]) of teacher logits [n, V], in float32 (float64 for float64)."""
    logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    top, ids = logp.topk(k, dim=-1)
    vocab = logp.size(-1)
    if k == vocab:
        tail = logp.new_full((logp.size(0),), -math.inf)
    else:
        tail = torch.logsumexp(logp.scatter(-1, ids, -math.inf), dim=-1) - math.log(vocab - k)
    return ids, top, tail


class CacheWriter:
    """Writes a cache directory ``out``: ``counts`` ({example key: number of labels}) fixes the layout,
    ``write`` stores a batch's teacher rows (any source ``chunked_divergences.teacher_rows`` reads),
    ``finish`` writes ``cache.json`` last."""

    def __init__(self, out: str, counts: dict, top_k: int, vocab: int, cache_dtype: str = "fp16"):
        self.out, self.k, self.vocab = out, int(top_k), int(vocab)
        self.keys = np.array(sorted(counts), dtype=np.uint64)
        self.offsets = np.zeros(len(self.keys) + 1, dtype=np.int64)
        self.offsets[1:] = np.cumsum([counts[int(key)] for key in self.keys])
        self.n_rows = int(self.offsets[-1])
        np.save(os.path.join(out, "keys.npy"), self.keys)
        np.save(os.path.join(out, "offsets.npy"), self.offsets)

        def array(name, shape, dtype):
            return np.lib.format.open_memmap(os.path.join(out, name), mode="w+", dtype=dtype, shape=shape)

        self.ids = array("ids.npy", (self.n_rows, self.k), np.uint16 if vocab <= 65536 else np.int32)
        self.logp = array("logp.npy", (self.n_rows, self.k), CACHE_DTYPES[cache_dtype])
        self.tail = array("tail.npy", (self.n_rows,), np.float32)
        self.cache_dtype = cache_dtype

    def write(self, src_tokens: Tensor, mask: Tensor, pad: int, source, chunk_size: int = 1024) -> int:
        """Store the rows of ``source`` (the teacher at ``mask``, row-major) for this batch's examples;
        returns the number of examples."""
        from .chunked_divergences import teacher_rows

        where = np.searchsorted(self.keys, np.asarray(batch_keys(src_tokens, mask, pad), dtype=np.uint64))
        dest = label_rows(self.offsets, where)
        for a in range(0, len(dest), chunk_size):
            b = min(a + chunk_size, len(dest))
            ids, logp, tail = top_k_rows(teacher_rows(source, a, b), self.k)
            if torch.isnan(logp).any():
                raise DistillError("the teacher gives NaN log-probabilities (NaN or +inf logits); check its "
                                   "checkpoint, or cache it with --teacher-dtype fp32")
            rows = dest[a:b]
            self.ids[rows] = ids.cpu().numpy().astype(self.ids.dtype)
            self.logp[rows] = logp.float().cpu().numpy().astype(self.logp.dtype)
            self.tail[rows] = tail.float().cpu().numpy()
        return len(where)

    def finish(self, meta: dict) -> None:
        for a in (self.ids, self.logp, self.tail):
            a.flush()
        meta = {"format": FORMAT, "vocab": self.vocab, "top_k": self.k, "cache_dtype": self.cache_dtype,
                "examples": int(len(self.keys)), "label_tokens": self.n_rows, **meta}
        with open(os.path.join(self.out, "cache.json"), "w") as f:
            json.dump(meta, f, indent=1)
        del self.ids, self.logp, self.tail


class CachedLogits(NamedTuple):
    """The teacher side of a loss from the cache: logit rows [n, V] rebuilt a chunk at a time (the
    interface of ``chunked_divergences.ProjectedLogits``: ``rows(start, end)`` and ``size(dim)``)."""

    ids: Tensor  # [N, k] int64
    logp: Tensor  # [N, k] float32
    tail: Tensor  # [N] float32
    vocab: int

    def rows(self, start: int, end: int) -> Tensor:
        out = self.tail[start:end, None].expand(-1, self.vocab).clone()
        return out.scatter_(-1, self.ids[start:end], self.logp[start:end])

    def size(self, dim: int) -> int:
        return self.ids.size(0) if dim == 0 else self.vocab

    def materialize(self) -> Tensor:
        return self.rows(0, self.ids.size(0))


class CachedTeacher:
    """A teacher read from ``distill-cache-teacher``'s output; ``rows`` as ``Teacher.rows``."""

    def __init__(self, path: str, task):
        self.path = os.path.abspath(path)
        meta_path = os.path.join(path, "cache.json")
        if not os.path.isfile(meta_path):
            raise DistillError(f"{path} is not a teacher cache (no cache.json); build one with distill-cache-teacher")
        with open(meta_path) as f:
            self.meta = json.load(f)
        if self.meta.get("format") != FORMAT:
            raise DistillError(f"{path}: unknown cache format {self.meta.get('format')!r}; rebuild it with "
                               "distill-cache-teacher")
        student = dictionary_fingerprint(task.target_dictionary)
        if self.meta["dictionary"] != student:
            raise DistillError(
                f"teacher cache {path} was built with a dictionary of size {self.meta['dictionary']['size']}, the "
                f"student's has {student['size']} (or other symbols); rebuild it with distill-cache-teacher --data "
                "<the student's data>")
        tps = int(task.cfg.tokens_per_sample)
        if int(self.meta["tokens_per_sample"]) != tps:
            raise DistillError(
                f"teacher cache {path} was built with --tokens-per-sample {self.meta['tokens_per_sample']}, training "
                f"uses {tps}: examples are truncated differently; rebuild the cache or pass the same value")
        self.keys, self.offsets, self.ids, self.logp, self.tail = self._arrays(path)
        self.vocab, self.k = int(self.meta["vocab"]), int(self.meta["top_k"])
        self.sha256 = self.meta["teacher"]["sha256"]
        self.pad = task.target_dictionary.pad()
        self.tail_mass = str(getattr(task.cfg, "teacher_cache_tail", "even"))
        logger.info(f"teacher cache {path}: {len(self.keys):,} examples, {len(self.tail):,} label tokens, top-{self.k} "
                    f"of {self.vocab} ({self.meta['cache_dtype']}), teacher sha256 {self.sha256[:12]}")

    @staticmethod
    def _arrays(path: str):
        """keys, offsets, ids, logp, tail, memory-mapped; a missing, truncated or inconsistent array
        (a copy or a deletion cut short) is a one-line error."""
        arrays = []
        for name in ("keys.npy", "offsets.npy", "ids.npy", "logp.npy", "tail.npy"):
            try:
                arrays.append(np.load(os.path.join(path, name), mmap_mode="r"))
            except (OSError, ValueError) as e:
                raise DistillError(f"teacher cache {path} is incomplete or damaged ({name}: {brief(e)}); rebuild it "
                                   "with distill-cache-teacher") from None
        keys, offsets, ids, logp, tail = arrays
        rows = int(offsets[-1]) if len(offsets) else -1
        if len(offsets) != len(keys) + 1 or not (ids.shape[0] == logp.shape[0] == tail.shape[0] == rows) \
                or ids.shape[1:] != logp.shape[1:]:
            raise DistillError(f"teacher cache {path} is damaged: its arrays disagree in size ({len(keys)} keys, "
                               f"{len(offsets)} offsets, {ids.shape[0]} / {logp.shape[0]} / {tail.shape[0]} rows); "
                               "rebuild it with distill-cache-teacher")
        return keys, offsets, ids, logp, tail

    def record(self) -> dict:
        return {"path": self.path, "sha256": self.sha256, "cache_top_k": self.k}

    def compile(self) -> None:
        logger.warning("--teacher-compile: a cached teacher runs no forward; nothing to compile")

    def _find(self, keys: np.ndarray, what: str) -> np.ndarray:
        where = np.searchsorted(self.keys, keys)
        found = (where < len(self.keys)) & (self.keys[np.minimum(where, len(self.keys) - 1)] == keys)
        if not found.all():
            raise DistillError(
                f"teacher cache {self.path} has no entry for {int((~found).sum())} of the {len(keys)} examples of "
                f"{what}: it was built from other data (or splits); rebuild it with distill-cache-teacher "
                "--splits <every split you train and validate on>")
        return where

    def check_dataset(self, dataset, split: str) -> None:
        """Refuse, before training, a split whose examples the cache does not hold."""
        t0 = time.time()
        keys = np.array([key for key, _n in dataset_keys(dataset, self.pad)], dtype=np.uint64)
        self._find(keys, f"the '{split}' split")
        logger.info(f"teacher cache: all {len(keys):,} examples of '{split}' are cached ({time.time() - t0:.1f}s)")

    def cached_logits(self, net_input: dict, mask: Tensor) -> CachedLogits:
        keys = np.asarray(batch_keys(net_input["src_tokens"], mask, self.pad), dtype=np.uint64)
        where = self._find(keys, "this batch")
        rows = label_rows(self.offsets, where)
        device = mask.device
        ids = torch.from_numpy(self.ids[rows].astype(np.int64)).to(device)
        logp = torch.from_numpy(self.logp[rows].astype(np.float32)).to(device)
        if self.tail_mass == "none":  # renormalised over the top-k: the other entries are -inf (masked)
            tail = torch.full((len(rows),), -math.inf, device=device)
        else:
            tail = torch.from_numpy(self.tail[rows].astype(np.float32)).to(device)
        return CachedLogits(ids, logp, tail, self.vocab)

    def rows(self, net_input: dict, mask: Tensor, fused: bool):
        """The cached rows at ``mask`` (rebuilt a chunk at a time by the chunked/fused losses)."""
        return self.cached_logits(net_input, mask)

    def projected_logits(self, net_input: dict, mask: Tensor):
        return self.cached_logits(net_input, mask)

    def logits(self, net_input: dict):
        raise DistillError(
            "this needs the teacher's logits at every position (generated sequences, rollouts, or a criterion "
            "without the cached path); pass --teacher-path instead of --teacher-cache")
