"""Output directories of the data CLIs (distill-prepare, prepare_lm, distill-seqkd, distill-cache-teacher,
distill-miniplm, distill-export-hf): never an input, never a file, and --overwrite replaces only the same
tool's earlier output (or an empty directory), never other files; SentencePiece, --keep-jsonl, --max-tokens
and --teacher mistakes end in one line before any work."""
import json
import os
import shutil

import numpy as np
import pytest

from conftest import cli, run, write_jsonl
from test_bad_input import GOOD, assert_one_line_error
from distill_plugins.errors import DistillError
from distill_plugins.staged_directory import check_output_dir


def listing(path):
    return sorted(os.listdir(path))


@pytest.fixture
def data_copy(data_bin, tmp_path):
    """A private copy of the prepared data (the session's data_bin is read-only for tests)."""
    return str(shutil.copytree(data_bin, tmp_path / "bin"))


# ---------------------------------------------------------------------------------------------
# the shared check, in-process
# ---------------------------------------------------------------------------------------------
def refused(*args, **kw):
    with pytest.raises(DistillError) as e:
        check_output_dir(*args, **kw)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_check_output_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("x")
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text("x")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "tool.json").write_text("{}")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep")
    (tmp_path / "empty").mkdir()
    inputs = [("--train", "in/a.jsonl"), ("--missing", None)]

    assert "is the input --train in/a.jsonl" in refused("in/a.jsonl", "--destdir", "tool.json", True, inputs)
    assert "contains the input --train in/a.jsonl" in refused("in", "--destdir", "tool.json", True, inputs)
    assert "contains the input" in refused(".", "--destdir", "tool.json", True, inputs)
    assert "current directory" in refused(".", "--destdir", "tool.json", True)
    assert "current directory" in refused("..", "--destdir", "tool.json", True)
    assert f"{tmp_path / 'afile'} is a file, not a directory" in refused("afile", "--out", "tool.json", True)
    assert f"{tmp_path / 'afile'} is a file, not a directory" in refused("afile/a/b", "--out", "tool.json", True)
    assert "already exists; pass --overwrite" in refused("mine", "--out", "tool.json", False)
    message = refused("other", "--out", "tool.json", True)
    assert "(no tool.json)" in message and "remove it yourself or pick another --out" in message
    os.symlink(tmp_path / "mine", tmp_path / "link")
    assert "is a symbolic link" in refused("link", "--out", "tool.json", True)
    # allowed: a new path (even inside an input directory), an empty directory, the tool's own output
    assert check_output_dir("in/sub", "--out", "tool.json", False, inputs) == str(tmp_path / "in" / "sub")
    assert check_output_dir("empty", "--out", "tool.json", True) == str(tmp_path / "empty")
    assert check_output_dir("mine", "--out", "tool.json", True) == str(tmp_path / "mine")
    assert listing(tmp_path / "other") == ["notes.txt"] and listing(tmp_path / "mine") == ["tool.json"]


# ---------------------------------------------------------------------------------------------
# distill-prepare
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def prepare(data_bin):
    """distill-prepare with the prepared data's SentencePiece model (a later --spm-model wins)."""
    def command(*args, cwd=None):
        return run([cli("distill-prepare"), "--spm-model", os.path.join(data_bin, "spm.model"), *args],
                   check=False, cwd=cwd)
    return command


def test_prepare_overwrite_keeps_inputs_and_other_files(prepare, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "train.jsonl", [GOOD] * 8)
    (data / "notes.txt").write_text("keep")
    proc = prepare("--train", "data/train.jsonl", "--destdir", "data", "--overwrite", cwd=tmp_path)
    assert_one_line_error(proc, "contains the input --train data/train.jsonl", "pick another --destdir")
    proc = prepare("--train", "data/train.jsonl", "--destdir", ".", "--overwrite", cwd=tmp_path / "data")
    assert_one_line_error(proc, "--destdir", "the input --train")
    assert listing(data) == ["notes.txt", "train.jsonl"]

    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    proc = prepare("--train", data / "train.jsonl", "--destdir", other, "--overwrite")
    assert_one_line_error(proc, "(no prepare_report.json)", "remove it yourself or pick another --destdir")
    assert listing(other) == ["notes.txt"]
    proc = prepare("--train", "../data/train.jsonl", "--destdir", ".", "--overwrite", cwd=other)
    assert_one_line_error(proc, "current directory")
    assert listing(other) == ["notes.txt"]
    assert listing(tmp_path) == ["data", "other"]  # no scratch directory left behind


def test_prepare_overwrite_replaces_its_own_output_or_an_empty_dir(prepare, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [GOOD] * 8)
    dest = tmp_path / "bin"
    dest.mkdir()
    proc = prepare("--train", train, "--destdir", dest, "--overwrite")  # empty: fine
    assert proc.returncode == 0, proc.stderr[-2000:]
    (dest / "stale.txt").write_text("from an earlier run")
    proc = prepare("--train", train, "--destdir", dest, "--overwrite")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "prepare_report.json" in listing(dest) and "stale.txt" not in listing(dest)


def test_prepare_destination_is_a_file_or_under_one(prepare, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [GOOD] * 8)
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert_one_line_error(prepare("--train", train, "--destdir", afile / "sub"), f"{afile} is a file, not a directory")
    assert_one_line_error(prepare("--train", train, "--destdir", afile, "--overwrite"),
                          f"{afile} is a file", "remove it yourself")
    assert afile.read_text() == "x" and listing(tmp_path) == ["afile", "train.jsonl"]


def test_prepare_spm_model_that_is_not_one(prepare, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [GOOD] * 8)
    dest = tmp_path / "out"
    for option, value, needles in (
        ("--spm-model", train, ("--spm-model", "is not a SentencePiece model")),
        ("--teacher-spm-model", train, ("--teacher-spm-model", "is not a SentencePiece model")),
        ("--spm-model", tmp_path, (f"--spm-model {tmp_path} is a directory", "pass the .model file")),
        ("--teacher-spm-model", tmp_path / "none.model", ("--teacher-spm-model", "does not exist")),
    ):
        assert_one_line_error(prepare("--train", train, "--destdir", dest, option, value), *needles)
        assert listing(tmp_path) == ["train.jsonl"], option


# ---------------------------------------------------------------------------------------------
# prepare_lm, distill-miniplm, distill-export-hf (their checks run before any work: in-process)
# ---------------------------------------------------------------------------------------------
def test_prepare_lm_marks_and_replaces_only_its_output(data_bin, data_copy, tmp_path):
    from distill_plugins.cli import prepare_lm

    text = tmp_path / "corpus.txt"
    text.write_text("apple banana\ncherry dog\n")
    dest = tmp_path / "lm"
    base = ["--data", data_bin, "--train", str(text), "--destdir", str(dest)]
    prepare_lm.main(base)
    assert json.load(open(dest / "prepare_lm.json"))["splits"]["train"]["documents"] == 2
    prepare_lm.main(base + ["--overwrite"])  # its own output: replaced
    for argv, needle in (
        (["--data", data_copy, "--train", str(text), "--destdir", data_copy, "--overwrite"], "is the input --data"),
        (["--data", data_bin, "--train", str(text), "--destdir", data_copy, "--overwrite"], "(no prepare_lm.json)"),
    ):
        with pytest.raises(DistillError) as e:
            prepare_lm.main(argv)
        assert needle in str(e.value), str(e.value)
    assert "prepare_report.json" in listing(data_copy)


def test_miniplm_and_export_refuse_inputs_and_foreign_dirs(data_bin, data_copy, plain_lm_data, teacher_ckpt, tmp_path):
    from distill_plugins.cli import export_hf, miniplm

    (tmp_path / "teacher").mkdir()
    teacher = shutil.copy(teacher_ckpt, tmp_path / "teacher" / "checkpoint.pt")
    corpus_files, data_files = listing(plain_lm_data), listing(data_copy)
    base = ["--data", data_bin, "--corpus", plain_lm_data, "--teacher", teacher_ckpt, "--reference", teacher_ckpt]
    for main, argv, needle in (
        (miniplm.main, base + ["--destdir", plain_lm_data, "--overwrite"], "is the input --corpus"),
        (miniplm.main, [*base, "--teacher", teacher, "--destdir", tmp_path / "teacher", "--overwrite"],
         "contains the input --teacher"),
        (miniplm.main, base + ["--destdir", data_copy, "--overwrite"], "(no miniplm.json)"),
        (export_hf.main, [teacher_ckpt, data_copy, "--data", data_copy, "--overwrite"], "is the input --data"),
        (export_hf.main, [teacher_ckpt, data_copy, "--data", data_bin, "--overwrite"], "(no config.json)"),
    ):
        with pytest.raises(DistillError) as e:
            main([str(a) for a in argv])
        assert needle in str(e.value), str(e.value)
    assert listing(plain_lm_data) == corpus_files and listing(data_copy) == data_files
    assert listing(tmp_path / "teacher") == ["checkpoint.pt"]


# ---------------------------------------------------------------------------------------------
# distill-seqkd and distill-cache-teacher (real CLIs)
# ---------------------------------------------------------------------------------------------
def seqkd(data, teacher, dest, *extra):
    return run([cli("distill-seqkd"), "--data", data, "--teacher", teacher, "--destdir", dest, "--device", "cpu",
                "--max-new-tokens", "2", "--batch-size", "64", *extra], check=False)


def cache(data, teacher, out, *extra):
    return run([cli("distill-cache-teacher"), "--data", data, "--teacher", teacher, "--out", out, "--device", "cpu",
                "--top-k", "4", "--max-tokens", "512", *extra], check=False)


def test_output_is_never_the_input_data(data_copy, teacher_ckpt):
    before = listing(data_copy)
    assert_one_line_error(cache(data_copy, teacher_ckpt, data_copy, "--overwrite"),
                          f"--out {data_copy} is the input --data")
    assert_one_line_error(seqkd(data_copy, teacher_ckpt, data_copy, "--overwrite"),
                          f"--destdir {data_copy} is the input --data")
    assert listing(data_copy) == before


def test_seqkd_keep_jsonl_and_overwrite_of_its_own_output(data_bin, data_copy, teacher_ckpt, tmp_path):
    dest = tmp_path / "seqkd"
    proc = seqkd(data_bin, teacher_ckpt, dest, "--keep-jsonl", tmp_path / "nodir" / "k.jsonl")
    assert_one_line_error(proc, f"no directory {tmp_path / 'nodir'}; create it")
    assert "generated" not in proc.stdout and not dest.exists()
    proc = seqkd(data_copy, teacher_ckpt, dest, "--keep-jsonl", os.path.join(data_copy, "train.jsonl"))
    assert_one_line_error(proc, "--keep-jsonl", "is inside --data")
    assert open(os.path.join(data_copy, "train.jsonl")).read() == open(os.path.join(data_bin, "train.jsonl")).read()

    # a distill-prepare output is not seqkd's: --overwrite leaves it; seqkd's own output is replaced
    prepared = shutil.copytree(data_bin, tmp_path / "prepared")
    assert_one_line_error(seqkd(data_bin, teacher_ckpt, prepared, "--overwrite"), "(no seqkd.json)")
    assert listing(prepared) == listing(data_bin)
    keep = tmp_path / "k.jsonl"
    for extra in ([], ["--overwrite"]):
        proc = seqkd(data_bin, teacher_ckpt, dest, "--keep-jsonl", keep, *extra)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "seqkd.json" in listing(dest) and "prepare_report.json" in listing(dest)
        assert open(keep).read() == open(dest / "train.jsonl").read()
    assert sorted(os.listdir(tmp_path)) == ["bin", "k.jsonl", "prepared", "seqkd"]  # no scratch left behind
    # an existing --keep-jsonl file is replaced only with --overwrite, and never the teacher (was: overwritten)
    kept = open(keep).read()
    assert_one_line_error(seqkd(data_bin, teacher_ckpt, tmp_path / "s2", "--keep-jsonl", keep),
                          f"--keep-jsonl {keep} already exists; pass --overwrite")
    teacher_copy = shutil.copy(teacher_ckpt, tmp_path / "t.pt")
    blob = open(teacher_copy, "rb").read()
    assert_one_line_error(seqkd(data_bin, teacher_copy, tmp_path / "s2", "--keep-jsonl", teacher_copy, "--overwrite"),
                          "is the --teacher checkpoint")
    assert open(keep).read() == kept and open(teacher_copy, "rb").read() == blob and not (tmp_path / "s2").exists()


def test_cache_max_tokens_below_the_longest_example(data_bin, teacher_ckpt, tmp_path):
    from distill_plugins.tasks.instruction_distillation import InstructionDistillationConfig, InstructionDistillationTask

    task = InstructionDistillationTask.setup_task(InstructionDistillationConfig(data=data_bin))
    task.load_dataset("train")
    longest = int(np.max(task.dataset("train").sizes))
    proc = cache(data_bin, teacher_ckpt, tmp_path / "c", "--max-tokens", "10")
    assert_one_line_error(proc, "--max-tokens 10 is below the longest example", f"({longest} tokens)",
                          f"--max-tokens {longest} or more")
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("tool", ["cache", "seqkd"])
def test_teacher_messages_name_the_teacher_option(tool, data_bin, teacher_ckpt, tmp_path):
    command = cache if tool == "cache" else seqkd
    truncated = tmp_path / "half.pt"
    truncated.write_bytes(open(teacher_ckpt, "rb").read()[:4096])
    for teacher, needle in ((tmp_path / "nope.pt", "does not exist"), (truncated, "could not be loaded")):
        last = assert_one_line_error(command(data_bin, teacher, tmp_path / "out"), str(teacher), needle, "--teacher")
        assert "--teacher-path" not in last
        assert not (tmp_path / "out").exists()
