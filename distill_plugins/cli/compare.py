"""distill-compare: one Rouge-L table (and bar chart) across runs, e.g. SFT vs KD vs skew KL.

    distill-compare sft.json kd.json skl.json --names SFT KD SKL --md compare.md --png compare.png

Reads result files of ``distill-evaluate --json`` (or ``distill-score --json``), prints a markdown
table with one row per run and one column per evaluation set (mean ± std over seeds, the best in
bold), and draws grouped bars with the standard deviation as error bars (matplotlib, Agg backend).
"""
import argparse
import io
import json
import logging
from typing import Dict, List

from ..errors import DistillError
from ..evaluation.report_files import check_outputs, write_atomic, write_text_atomic
from ..evaluation.result_tables import eval_set_names, load_runs, rouge_table


def get_parser():
    p = argparse.ArgumentParser(prog="distill-compare", description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", help="result JSON files of distill-evaluate / distill-score")
    p.add_argument("--names", nargs="+", help="one label per result file (default: the runs' own names)")
    p.add_argument("--md", help="write the markdown table here")
    p.add_argument("--json", help="write the compared runs (names, Rouge-L per evaluation set) here")
    p.add_argument("--png", help="draw a bar chart here")
    p.add_argument("--title", default="Rouge-L (mean ± std over seeds)")
    p.add_argument("--overwrite", action="store_true", help="replace existing --md/--json/--png files")
    return p


def bar_chart_png(runs: List[Dict], title: str) -> bytes:
    """Grouped bars: evaluation sets on the x axis, one bar per run, std as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = eval_set_names(runs)
    width = 0.8 / len(runs)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 + 0.55 * len(sets) * len(runs) + 0.4 * len(sets)), 3.8), dpi=120)
    for k, run in enumerate(runs):
        by_set = {f["name"]: f for f in run["files"]}
        xs = [i - 0.4 + width * (k + 0.5) for i, s in enumerate(sets) if s in by_set]
        means = [by_set[s]["rouge_l"] for s in sets if s in by_set]
        stds = [by_set[s].get("rouge_l_std", 0.0) for s in sets if s in by_set]
        ax.bar(xs, means, width * 0.92, yerr=stds, capsize=3, label=run["name"])
        for x, m, sd in zip(xs, means, stds):  # the value above its error bar
            ax.annotate(f"{m:.1f}", (x, m + sd), xytext=(0, 2), textcoords="offset points", ha="center",
                        va="bottom", fontsize=7)
    ax.set_xticks(range(len(sets)), sets)
    ax.set_ylabel("Rouge-L")
    ax.set_title(title, fontsize=10)
    top = max(f["rouge_l"] + f.get("rouge_l_std", 0.0) for r in runs for f in r["files"])
    ax.set_ylim(0, max(1.0, top * 1.18))
    ax.legend(fontsize=8, ncols=min(len(runs), 3), loc="upper center", bbox_to_anchor=(0.5, -0.1), frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def main(argv=None):
    args = get_parser().parse_args(argv)
    logging.getLogger().setLevel(logging.WARNING)  # fairseq's task imports configure DEBUG logging
    if args.names and len(args.names) != len(args.results):
        raise DistillError(f"--names has {len(args.names)} labels for {len(args.results)} result files; give one each")
    check_outputs([args.md, args.json, args.png], args.overwrite, inputs=args.results)
    runs = []
    for i, path in enumerate(args.results):
        runs += load_runs(path, args.names[i] if args.names else None)
    names = [r["name"] for r in runs]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise DistillError(f"two runs are both named {repeated[0]!r}; label them with --names")
    table = rouge_table(runs)
    png = bar_chart_png(runs, args.title) if args.png else None  # everything computed before writing
    if args.md:
        write_text_atomic(args.md, table)
    if args.json:
        write_text_atomic(args.json, json.dumps({"runs": runs}, indent=1) + "\n")
    if png is not None:
        write_atomic(args.png, lambda f: f.write(png), mode="wb")
    print(table, end="")


if __name__ == "__main__":
    main()
