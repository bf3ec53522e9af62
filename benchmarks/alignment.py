"""DTW alignment of two tokenizations (MinED, multi-cost OT): ours against the cell-by-cell form.

    python benchmarks/alignment.py --preset dolly --json alignment.json

Both align the same pairs of token sequences (one text in two vocabularies: every student token, a
third of them split in two for the teacher) with edit-distance costs and the same trace-back rule,
and must return the same alignment. ``reference`` is the form of FuseLLM / DSKD's MinED (and our
own until session 15): an edit distance per pair of positions (one C call each: DSKD's editdistance,
here rapidfuzz's, the same values), then the table filled cell by cell in Python. ``ours``
(``token_alignment.dtw_alignment``): the whole cost matrix in one rapidfuzz ``cdist`` call, the
table filled an anti-diagonal at a time with numpy. Reported: alignments/s, tokens/s
(student tokens) and the ratio; CPU only (it is CPU work in training too).
"""
import json
import math
import os
import random
import sys
import time

from rapidfuzz.distance import Levenshtein

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from distill_plugins.token_alignment import dtw_alignment, normalize_token  # noqa: E402

PRESETS = {"tiny": (4, 24), "dolly": (16, 256), "long": (8, 512)}  # pairs, student tokens per pair


def pairs(count, length, seed=1):
    rng = random.Random(seed)
    vocab = ["▁" + "".join(rng.choice("abcdefghijklmnop") for _ in range(rng.randint(1, 8))) for _ in range(4000)]
    out = []
    for _ in range(count):
        a = [rng.choice(vocab) for _ in range(length)]
        b = []
        for t in a:
            t = t.replace("▁", "Ġ")
            b += [t[:3], t[3:]] if len(t) > 4 and rng.random() < 1 / 3 else [t]
        out.append((a, b))
    return out


def reference(a, b, distance=Levenshtein.distance):
    """The cell-by-cell DTW with the same trace-back rule (diagonal, then up, then left)."""
    n, m = len(a), len(b)
    cost = [[distance(normalize_token(x), normalize_token(y)) for y in b] for x in a]
    acc = [[math.inf] * (m + 1) for _ in range(n + 1)]
    acc[0][0] = 0.0
    for i in range(1, n + 1):
        row, prev, c = acc[i], acc[i - 1], cost[i - 1]
        for j in range(1, m + 1):
            row[j] = c[j - 1] + min(prev[j - 1], prev[j], row[j - 1])
    aligned = [[] for _ in range(n)]
    i, j = n, m
    while True:
        aligned[i - 1].insert(0, j - 1)
        if i == 1 and j == 1:
            return aligned
        options = [acc[i - 1][j - 1], acc[i - 1][j], acc[i][j - 1]]
        move = options.index(min(options))
        i, j = (i - 1, j - 1) if move == 0 else ((i - 1, j) if move == 1 else (i, j - 1))


def main(argv=None):
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)
    count, length = PRESETS[args.preset]
    data = pairs(count, length)
    results, outputs = {}, {}
    for name, fn in (("reference", reference), ("ours", dtw_alignment)):
        times = []
        for _ in range(args.repeats):
            start = time.process_time()
            outputs[name] = [fn(a, b) for a, b in data]
            times.append(time.process_time() - start)
        cpu = sorted(times)[len(times) // 2]
        results[name] = {"cpu_s": cpu, "alignments_per_s": count / cpu, "tokens_per_s": count * length / cpu}
    same = outputs["ours"] == outputs["reference"]
    ratio = results["ours"]["tokens_per_s"] / results["reference"]["tokens_per_s"]
    teacher = sum(len(b) for _, b in data) / count
    print(f"DTW alignment, preset {args.preset}: {count} pairs of {length} student / {teacher:.0f} teacher tokens")
    print("| impl | CPU s | alignments/s | tokens/s |\n|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['cpu_s']:.3f} | {r['alignments_per_s']:,.1f} | {r['tokens_per_s']:,.0f} |")
    print(f"tokens_per_s ours/reference: {ratio:.1f}x; the same alignments: {same}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"preset": args.preset, "results": results, "ratio": ratio, "same": same}, f, indent=2)
    if not same:
        sys.exit("alignment benchmark: error: ours and the reference disagree")


if __name__ == "__main__":
    main()
