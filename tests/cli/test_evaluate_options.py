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
