"""Aligning two tokenizations of one text, for cross-tokenizer KD (MinED; spec section 1d).

Pure functions on token strings:

* ``normalize_token`` drops the word-start markers of byte-level BPE ("Ġ") and SentencePiece ("▁"),
  as DSKD's MinED does before comparing tokens.
* ``vocabulary_mapping`` maps every teacher token to the student token at the least edit distance
  after swapping the teacher's word-start marker for the student's (FuseLLM / DSKD's
  ``tea2stu_id_mapping``, top-1: ``max_align_num`` 1); exact matches first, ties to the lower student
  id. Special symbols map to the student's same special symbol. The distances of
  the inexact ones to every student token come from rapidfuzz's ``cdist`` (C++, all cores): 5,645 x
  6,905 random tokens in 0.13 s against 4.0 s for the per-pair search by length it replaced (session 15,
  the same mapping).
* ``dtw_alignment`` aligns two token sequences by dynamic time warping with the edit distance of
  their normalized strings as the cost (FuseLLM's ``dtw``; DSKD ``min_edit_dis_kld.py``): every token
  is aligned to at least one token of the other side, monotonically.
* ``dictionary_token_strings`` gives a data directory's fairseq dictionary as token strings (for a
  Hugging Face tokenizer the dictionary holds HF ids; its token strings come from the tokenizer).
"""
from typing import Dict, List, Sequence

import numpy as np
from rapidfuzz.distance import Levenshtein
from rapidfuzz.process import cdist

MARKERS = ("Ġ", "▁")
ALIGNMENT_FILE = "alignment.json"  # in a --teacher-data dir: written by distill-prepare, read by min_ed


def normalize_token(token: str) -> str:
    for marker in MARKERS:
        token = token.replace(marker, "")
    return token


def edit_distance(a: str, b: str) -> int:
    return int(Levenshtein.distance(a, b))


def nearest_tokens(queries: Sequence[str], candidates: Sequence[str], chunk: int = 256) -> np.ndarray:
    """For each query, the index of the candidate at the least edit distance (ties: the lowest
    index): the distances of a chunk of queries to every candidate in one rapidfuzz ``cdist`` call
    (C++, every core), then the first minimum of each row."""
    out = np.empty(len(queries), dtype=np.int64)
    for start in range(0, len(queries), chunk):
        d = cdist(queries[start:start + chunk], candidates, scorer=Levenshtein.distance, dtype=np.int32, workers=-1)
        out[start:start + chunk] = d.argmin(axis=1)
    return out


def word_start_marker(tokens: Sequence[str]) -> str:
    """The word-start marker a vocabulary uses: "Ġ" (byte-level BPE) or "▁" (SentencePiece), whichever
    more of its tokens begin with; "" when none does (a word-level or character vocabulary)."""
    counts = [sum(t.startswith(m) for t in tokens) for m in MARKERS]
    return MARKERS[int(np.argmax(counts))] if max(counts) > 0 else ""


def in_student_markers(teacher_tokens: Sequence[str], student_tokens: Sequence[str], specials: int = 4) -> List[str]:
    """The teacher's token strings with its word-start marker replaced by the student's."""
    t_marker, s_marker = word_start_marker(teacher_tokens[specials:]), word_start_marker(student_tokens[specials:])
    return [t.replace(t_marker, s_marker) if t_marker and i >= specials else t for i, t in enumerate(teacher_tokens)]


def vocabulary_mapping(teacher_tokens: Sequence[str], student_tokens: Sequence[str],
                       specials: int = 4) -> List[int]:
    """For every teacher token id, a student token id, as FuseLLM's ``find_best_mapping`` (DSKD's
    ``tea2stu_id_mapping``, top-1): the teacher's word-start marker is replaced by the student's, then
    the student token equal to that string, else the one nearest by edit distance (ties: the lower id).
    Word-start and word-internal pieces stay apart ("Ġa" -> "▁a", "a" -> "a"), so a vocabulary maps
    onto itself as the identity. The first ``specials`` ids (fairseq's <s> <pad> </s> <unk>) map to
    themselves."""
    students = list(student_tokens[specials:])
    exact: Dict[str, int] = {}
    for i, token in enumerate(students, specials):
        exact.setdefault(token, i)
    queries = in_student_markers(teacher_tokens, student_tokens, specials)[specials:]
    inexact = sorted({q for q in queries if q not in exact})
    found: Dict[str, int] = {}
    if inexact and students:
        found = dict(zip(inexact, (specials + nearest_tokens(inexact, students)).tolist()))
    mapping = list(range(min(specials, len(teacher_tokens))))
    for q in queries:
        mapping.append(exact[q] if q in exact else found.get(q, 3))  # no candidates at all: <unk>
    return mapping


def edit_costs(a: Sequence[str], b: Sequence[str]) -> np.ndarray:
    """[len(a), len(b)] edit distances of the normalized token strings (float64), the whole matrix in
    one call of rapidfuzz's C++ ``cdist`` (about 60x the per-pair calls on 256 x 308 tokens)."""
    na, nb = [normalize_token(t) for t in a], [normalize_token(t) for t in b]
    return cdist(na, nb, scorer=Levenshtein.distance, dtype=np.int32, workers=1).astype(np.float64)


def dtw_alignment(a: Sequence[str], b: Sequence[str]) -> List[List[int]]:
    """For each token of ``a``, the indices of the tokens of ``b`` aligned to it by dynamic time
    warping with cost ``edit_distance(normalize_token(a_i), normalize_token(b_j))``.

    D[i, j] = cost(i, j) + min(D[i-1, j-1], D[i-1, j], D[i, j-1]), D[0, 0] = cost(0, 0); the path is
    traced back from (n-1, m-1) preferring the diagonal, then a step in ``a``, then one in ``b``.
    An empty side aligns nothing. The table is filled a row at a time: with u_j = min(D[i-1, j-1],
    D[i-1, j]) and C the row's prefix sums of the cost, D[i, j] = C_j + min_{k <= j} (u_k - C_{k-1})
    (enter the row from above at k, then move right), a running minimum; costs are integers, so the
    float64 sums are exact and the table equals the cell-by-cell one."""
    if len(a) == 0 or len(b) == 0:
        return [[] for _ in range(len(a))]
    return dtw_path(edit_costs(a, b))


def dtw_path(cost: np.ndarray) -> List[List[int]]:
    """``dtw_alignment`` from its cost matrix [n, m] (n, m >= 1)."""
    n, m = cost.shape
    acc = np.full((n + 1, m + 1), np.inf)
    acc[0, 0] = 0.0
    for i in range(1, n + 1):
        prev, c = acc[i - 1], cost[i - 1]
        prefix = np.cumsum(c)
        acc[i, 1:] = prefix + np.minimum.accumulate(np.minimum(prev[:-1], prev[1:]) - (prefix - c))
    aligned: List[List[int]] = [[] for _ in range(n)]
    i, j = n, m
    while True:
        aligned[i - 1].append(j - 1)
        if i == 1 and j == 1:
            break
        options = (acc[i - 1, j - 1], acc[i - 1, j], acc[i, j - 1])
        move = int(np.argmin(options))  # first minimum: diagonal, then up, then left
        if move == 0:
            i, j = i - 1, j - 1
        elif move == 1:
            i -= 1
        else:
            j -= 1
    for row in aligned:
        row.reverse()
    return aligned


def dictionary_token_strings(tokenizer, dictionary) -> List[str]:
    """Token string of every id of a fairseq ``dictionary`` built from ``tokenizer``
    (``data.tokenizers``): SentencePiece pieces are the symbols themselves; for a Hugging Face
    tokenizer the symbols are HF ids, turned back into the tokenizer's token strings."""
    symbols = list(dictionary.symbols)
    if getattr(tokenizer, "kind", None) != "hf":
        return symbols
    out = []
    for sym in symbols:
        hf_id = tokenizer.vocab.hf_id(sym)
        out.append(sym if hf_id is None else tokenizer.tok.convert_ids_to_tokens(hf_id))
    return out
