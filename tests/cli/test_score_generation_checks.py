"""distill-score and distill-evaluate score a generation file only when its hypotheses answer every
example of the reference split exactly once: a truncated fairseq-generate output, a file scored
against the wrong --split, seed files with different ids and a cut-off H- line end with a one-line
error and write nothing. A complete file scores with nothing but the result printed."""
import json
import os
import random

import pytest

from conftest import cli, run
from distill_plugins.cli import compare, evaluate, score
from distill_plugins.data.tokenizers import load_tokenizer


def read_jsonl(path):
    return [json.loads(line) for line in open(path)]


def write_generation(path, data_bin, ids=None, cut=None):
    """A fairseq-generate-like output (S-/T-/H-/D-/P- lines in batch order, the final BLEU line) for
    ``ids`` (default: every test example); ``cut``: keep only the first ``cut`` lines."""
    rows = read_jsonl(os.path.join(data_bin, "test.jsonl"))
    tok = load_tokenizer(data_bin)
    ids = list(range(len(rows))) if ids is None else list(ids)
    random.Random(0).shuffle(ids)  # fairseq-generate prints in length-sorted batch order
    lines = []
    for i in ids:
        hyp = " ".join(tok.encode(rows[i]["output"] if i < len(rows) else "apple"))
        lines += [f"S-{i}\tprompt", f"T-{i}\tref", f"H-{i}\t-1.5\t{hyp}", f"D-{i}\t-1.5\t{hyp}", f"P-{i}\t-1.5"]
    lines.append("Generate test with beam=1: BLEU4 = 0.00")
    text = "\n".join(lines[:cut]) + "\n"
    path.write_text(text)
    return str(path)


@pytest.fixture
def full(data_bin, tmp_path):
    return write_generation(tmp_path / "gen10.txt", data_bin)


def one_line_error(excinfo, *words):
    msg = str(excinfo.value)
    assert "\n" not in msg and "Traceback" not in msg
    for w in words:
        assert w in msg, msg


def test_complete_files_score_every_example_quietly(data_bin, full, tmp_path):
    other = write_generation(tmp_path / "gen20.txt", data_bin)
    proc = run([cli("distill-score"), data_bin, full, other, "--json", tmp_path / "s.json"])
    result = json.load(open(tmp_path / "s.json"))
    assert result["examples"] == 16 and result["seeds"] == 2
    # the hypotheses are the references; row 0's is empty, which rouge-score scores 0
    assert result["rouge_l"] == pytest.approx(100.0 * 15 / 16)
    assert "absl" not in proc.stderr and "Using default tokenizer" not in proc.stderr  # rouge_score's INFO line
    assert proc.stdout == "Rouge-L 93.75 (std 0.00, 2 file(s), 16 examples)\n"


def test_truncated_generation_output_is_one_line_error(data_bin, tmp_path):
    trunc = write_generation(tmp_path / "trunc.txt", data_bin, cut=20)  # 4 whole examples
    for tool, args in (("distill-score", [data_bin, trunc]), ("distill-evaluate", [trunc, "--data", data_bin])):
        proc = run([cli(tool), *args, "--json", tmp_path / "r.json"], check=False)
        assert proc.returncode == 1, proc.stdout
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert "trunc.txt has hypotheses for 4 of the 16 examples of" in lines[0] and "test.jsonl" in lines[0]
        assert "12 missing" in lines[0] and "rerun fairseq-generate to completion" in lines[0]
        assert not (tmp_path / "r.json").exists() and not (tmp_path / "r.md").exists()


@pytest.mark.parametrize("main", ["score", "evaluate"])
def test_wrong_split_is_an_error(main, data_bin, full, tmp_path):
    with pytest.raises(SystemExit) as e:
        if main == "score":
            score.main([data_bin, full, "--split", "train", "--json", str(tmp_path / "r.json")])
        else:
            evaluate.main([full, "--data", data_bin, "--split", "train", "--json", str(tmp_path / "r.json")])
    one_line_error(e, "16 of the 240 examples of", "train.jsonl", "224 missing (first: id 16)", "--split")
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("ids,words", [
    (range(15), ["15 of the 16 examples", "1 missing (first: id 15)"]),
    (range(17), ["16 of the 16 examples", "1 extra (first: id 16)"]),
])
@pytest.mark.parametrize("main", ["score", "evaluate"])
def test_seed_files_with_other_ids_are_not_averaged(main, ids, words, data_bin, full, tmp_path):
    odd = write_generation(tmp_path / "gen20.txt", data_bin, ids=ids)
    with pytest.raises(SystemExit) as e:
        if main == "score":
            score.main([data_bin, full, odd, "--json", str(tmp_path / "r.json")])
        else:
            evaluate.main([full, odd, "--data", data_bin, "--json", str(tmp_path / "r.json")])
    one_line_error(e, "gen20.txt has hypotheses for", *words)
    assert not (tmp_path / "r.json").exists()


def test_cut_off_hypothesis_line_is_an_error(data_bin, tmp_path):
    """A killed fairseq-generate can stop inside its last H- line: those tokens are not a response."""
    path = tmp_path / "cut.txt"
    lines = open(write_generation(path, data_bin)).read().splitlines()
    last_h = max(k for k, line in enumerate(lines) if line.startswith("H-"))
    path.write_text("\n".join(lines[:last_h]) + "\n" + lines[last_h][:4])  # "H-<id>" and no newline
    with pytest.raises(SystemExit) as e:
        score.main([data_bin, str(path)])
    one_line_error(e, f"cut.txt:{last_h + 1} is not a complete H-", "rerun fairseq-generate to completion")


def test_result_files_are_replaced_only_with_overwrite(data_bin, full, tmp_path):
    """distill-score --json and distill-compare's outputs refuse an existing file unless --overwrite,
    and an output that is one of the inputs always."""
    res = tmp_path / "s.json"
    score.main([data_bin, full, "--json", str(res)])
    first = res.read_text()
    res.write_text("{}")
    with pytest.raises(SystemExit) as e:
        score.main([data_bin, full, "--json", str(res)])
    one_line_error(e, "already exists", "--overwrite")
    assert res.read_text() == "{}"
    score.main([data_bin, full, "--json", str(res), "--overwrite"])
    assert res.read_text() == first
    with pytest.raises(SystemExit) as e:
        score.main([data_bin, full, "--json", full, "--overwrite"])
    one_line_error(e, "also an input")
    md = tmp_path / "cmp.md"
    compare.main([str(res), "--md", str(md)])
    table = md.read_text()
    md.write_text("old")
    with pytest.raises(SystemExit) as e:
        compare.main([str(res), "--md", str(md)])
    one_line_error(e, "already exists")
    assert md.read_text() == "old"
    compare.main([str(res), "--md", str(md), "--overwrite"])
    assert md.read_text() == table
    with pytest.raises(SystemExit) as e:
        compare.main([str(res), "--json", str(res), "--overwrite"])
    one_line_error(e, "also an input")
