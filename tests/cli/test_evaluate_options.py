"""distill-evaluate's options: --max-tokens below the longest example is a one-line error before any
generation (the number it names is enough), existing outputs are replaced only with --overwrite (and
only by a run that succeeded), and --help names each default once."""
import json
import os
import re

import pytest

from conftest import cli, run
from distill_plugins.cli import evaluate
from test_score_generation_checks import write_generation


def test_max_tokens_below_the_longest_example(teacher_ckpt, data_bin, tmp_path):
    common = [cli("distill-evaluate"), teacher_ckpt, "--data", data_bin, "--seeds", "10", "--cpu", "--no-progress",
              "--max-length", "128", "--max-prompt-tokens", "120"]
    proc = run([*common, "--max-tokens", "10", "--json", tmp_path / "r.json"], check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and "AssertionError" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    m = re.search(r"--max-tokens 10 is below the longest example \((\d+) tokens.*raise --max-tokens to at least (\d+)$",
                  last)
    assert m and m.group(1) == m.group(2), last
    assert not os.path.exists(tmp_path / "r.json")
    need = int(m.group(1))
    run([*common, "--max-tokens", str(need), "--json", tmp_path / "ok.json"])  # the named minimum works
    assert json.load(open(tmp_path / "ok.json"))["runs"][0]["files"][0]["examples"] == 16
    proc = run([*common, "--max-tokens", str(need - 1)], check=False)
    assert proc.returncode == 1 and f"at least {need}" in proc.stderr


def test_existing_outputs_need_overwrite(data_bin, tmp_path):
    gen = write_generation(tmp_path / "gen.txt", data_bin)
    out = tmp_path / "out.json"
    evaluate.main([gen, "--data", data_bin, "--json", str(out), "--name", "first"])
    before = out.read_text()
    assert json.loads(before)["runs"][0]["name"] == "first" and (tmp_path / "out.md").exists()

    proc = run([cli("distill-evaluate"), gen, "--data", data_bin, "--json", out, "--name", "second"], check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].endswith(f"{out} already exists; pass --overwrite to replace it")
    assert out.read_text() == before
    (tmp_path / "out.json").rename(tmp_path / "moved.json")  # the default --md next to it counts too
    with pytest.raises(SystemExit) as e:
        evaluate.main([gen, "--data", data_bin, "--json", str(out)])
    assert "out.md already exists; pass --overwrite" in str(e.value)
    (tmp_path / "moved.json").rename(out)

    # a failing run with --overwrite leaves the old result whole
    trunc = write_generation(tmp_path / "trunc.txt", data_bin, cut=20)
    with pytest.raises(SystemExit):
        evaluate.main([trunc, "--data", data_bin, "--json", str(out), "--overwrite"])
    assert out.read_text() == before

    evaluate.main([gen, "--data", data_bin, "--json", str(out), "--name", "second", "--overwrite"])
    assert json.loads(out.read_text())["runs"][0]["name"] == "second"
    assert "| second |" in (tmp_path / "out.md").read_text()
    assert sorted(os.listdir(tmp_path)) == ["gen.txt", "out.json", "out.md", "trunc.txt"]  # no temp files


def test_help_names_each_default_once():
    proc = run([cli("distill-evaluate"), "--help"])
    text = " ".join(proc.stdout.split())  # undo argparse's line wrapping
    assert "(default: None)" not in text and "(default: False)" not in text
    assert not re.search(r"\(default: [^)]*\) \(default:", text), text
    assert "write the markdown tables here (default: --json with .md)" in text
    assert "evaluation jsonl files (default: the data directory's {--split}.jsonl)" in text
    assert "0: off (default: 0)" in text and "(default: [10, 20, 30, 40, 50])" in text
    assert "--overwrite replace existing --json/--md/--responses files" in text


def test_outputs_never_replace_inputs_or_each_other(data_bin, teacher_ckpt, tmp_path):
    """Before: --overwrite let --json/--responses replace the checkpoint or an --eval-files file, two outputs
    on one path clobbered each other, and options for sampling were recorded for generation files."""
    import shutil

    from distill_plugins.cli import compare, score
    from test_score_generation_checks import one_line_error

    gen = write_generation(tmp_path / "gen.txt", data_bin)
    ckpt = shutil.copy(teacher_ckpt, tmp_path / "t.pt")
    ev = shutil.copy(os.path.join(data_bin, "test.jsonl"), tmp_path / "ev.jsonl")
    before = {p: open(p, "rb").read() for p in (gen, ckpt, ev)}
    cases = [
        ([ckpt, "--data", data_bin, "--json", ckpt, "--overwrite", "--cpu"], ("also an input",)),
        ([ckpt, "--data", data_bin, "--eval-files", ev, "--responses", ev, "--overwrite", "--cpu"], ("also an input",)),
        ([gen, "--data", data_bin, "--json", gen, "--overwrite"], ("also an input",)),
        ([gen, "--data", data_bin, "--json", str(tmp_path / "e.json"), "--md", str(tmp_path / "e.json")],
         ("are the same file",)),
        ([gen, "--data", data_bin, "--responses", str(tmp_path / "r.jsonl"), "--top-k", "5"],
         ("--top-k, --responses apply only when evaluating checkpoints",)),
        ([gen, gen, "--data", data_bin], ("given twice",)),
    ]
    for argv, words in cases:
        with pytest.raises(SystemExit) as e:
            evaluate.main([str(a) for a in argv])
        one_line_error(e, *words)
    with pytest.raises(SystemExit) as e:
        score.main([data_bin, gen, gen])
    one_line_error(e, "given twice")
    with pytest.raises(SystemExit) as e:
        score.main([data_bin, gen, "--split", "test", "--json", os.path.join(data_bin, "test.jsonl"), "--overwrite"])
    one_line_error(e, "also an input")
    res = tmp_path / "s.json"
    score.main([data_bin, gen, "--json", str(res)])
    with pytest.raises(SystemExit) as e:
        compare.main([str(res), "--md", str(tmp_path / "c.md"), "--json", str(tmp_path / "c.md")])
    one_line_error(e, "are the same file")
    assert {p: open(p, "rb").read() for p in before} == before
    assert sorted(os.listdir(tmp_path)) == ["ev.jsonl", "gen.txt", "s.json", "t.pt"]
    # generation files record only how they were scored, not sampling settings never applied to them
    evaluate.main([gen, "--data", data_bin, "--json", str(tmp_path / "g.json")])
    assert set(json.load(open(tmp_path / "g.json"))["protocol"]) == {"metric", "std"}


def test_max_examples_evaluates_the_first_rows_of_each_file(teacher_ckpt, data_bin, tmp_path):
    """The protocol scores UnNI's first 10,000 rows only (--dev-num 10000); before, every row was scored."""
    out = tmp_path / "r.json"
    evaluate.main([teacher_ckpt, "--data", data_bin, "--seeds", "10", "--cpu", "--no-progress", "--max-length", "64",
                   "--max-prompt-tokens", "56", "--max-examples", "3", "--responses", str(tmp_path / "r.jsonl"),
                   "--json", str(out)])
    result = json.load(open(out))
    assert result["runs"][0]["files"][0]["examples"] == 3 and result["protocol"]["max_examples"] == 3
    assert sorted(json.loads(line)["id"] for line in open(tmp_path / "r.jsonl")) == [0, 1, 2]
    with pytest.raises(SystemExit) as e:
        evaluate.main([teacher_ckpt, "--data", data_bin, "--max-examples", "0"])
    assert "--max-examples must be >= 1, got 0" in str(e.value)
