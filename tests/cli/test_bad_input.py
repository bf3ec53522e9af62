"""Bad user input through the real CLIs: non-zero exit, one line ``fairseq-distill: error: ...``
naming the problem (no traceback), and nothing half-written (no checkpoint, no --destdir)."""
import json
import os

import pytest
from fairseq.data import Dictionary

from conftest import TRAIN_COMMON, cli, make_rows, run, train, write_jsonl
from distill_plugins.data.instruction_jsonl import read_instruction_jsonl
from distill_plugins.errors import DistillError
from distill_plugins.tasks.instruction_distillation import (
    InstructionDistillationConfig,
    InstructionDistillationTask,
)
from distill_plugins.teacher import Teacher


def assert_one_line_error(proc, *needles):
    """The command failed with our one-line message last on stderr and printed no traceback."""
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert lines, "nothing on stderr"
    last = lines[-1]
    assert last.startswith("fairseq-distill: error: "), proc.stderr[-3000:]
    for needle in needles:
        assert needle in last, last
    return last


def assert_no_checkpoint(save_dir):
    written = os.listdir(save_dir) if os.path.isdir(save_dir) else []
    assert not written, f"half-written output in {save_dir}: {written}"


def train_fails(data_bin, save_dir, *extra):
    proc = train(data_bin, save_dir, *extra, max_update=1, check=False)
    assert_no_checkpoint(save_dir)
    return proc


# ---------------------------------------------------------------------------------------------
# teacher checkpoints
# ---------------------------------------------------------------------------------------------
def test_missing_teacher_checkpoint(data_bin, tmp_path):
    missing = tmp_path / "nowhere" / "teacher.pt"
    proc = train_fails(data_bin, tmp_path / "ckpt", "--criterion", "kd", "--teacher-path", missing)
    assert_one_line_error(proc, str(missing), "does not exist", "--teacher-path")


@pytest.mark.parametrize("content", ["random", "truncated"])
def test_teacher_file_that_is_not_a_checkpoint(content, data_bin, teacher_ckpt, tmp_path):
    """Random bytes, or a real checkpoint cut in half (an interrupted copy)."""
    bad = tmp_path / "teacher.pt"
    if content == "random":
        bad.write_bytes(os.urandom(4096))
    else:
        data = open(teacher_ckpt, "rb").read()
        bad.write_bytes(data[: len(data) // 2])
    proc = train_fails(data_bin, tmp_path / "ckpt", "--criterion", "kd", "--teacher-path", bad)
    assert_one_line_error(proc, str(bad), "could not be loaded", "truncated or not a fairseq checkpoint")


@pytest.fixture(scope="module")
def other_vocab_teacher(tmp_path_factory):
    """A teacher trained for 2 updates on data prepared with a different (smaller) vocabulary."""
    d = tmp_path_factory.mktemp("other_vocab")
    jsonl = write_jsonl(d / "train.jsonl", make_rows(60, 7))
    run([cli("distill-prepare"), "--train", jsonl, "--destdir", d / "bin", "--vocab-size", "330"])
    train(d / "bin", d / "teacher", "--criterion", "cross_entropy", "--disable-validation", max_update=2)
    return str(d / "bin"), str(d / "teacher" / "checkpoint_last.pt")


def test_teacher_with_another_dictionary(data_bin, other_vocab_teacher, tmp_path):
    other_bin, teacher = other_vocab_teacher
    student_size = len(Dictionary.load(os.path.join(data_bin, "dict.src.txt")))
    teacher_size = len(Dictionary.load(os.path.join(other_bin, "dict.src.txt")))
    assert student_size != teacher_size
    proc = train_fails(data_bin, tmp_path / "ckpt", "--criterion", "skew_kl", "--teacher-path", teacher)
    assert_one_line_error(proc, "dictionary", f"size {teacher_size}", f"size {student_size}")


def test_teacher_with_same_size_other_symbols(data_bin, teacher_ckpt):
    """Same vocabulary size, two symbols swapped (in-process: no CLI needed to see the message)."""
    d = Dictionary.load(os.path.join(data_bin, "dict.src.txt"))
    i, j = d.nspecial, d.nspecial + 1
    d.symbols[i], d.symbols[j] = d.symbols[j], d.symbols[i]
    task = InstructionDistillationTask(InstructionDistillationConfig(data=data_bin), d)
    with pytest.raises(DistillError) as e:
        Teacher.load(teacher_ckpt, task)
    assert f"(size {len(d)}) differs from the student's (size {len(d)} but other symbols)" in str(e.value)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# criterion and model options
# ---------------------------------------------------------------------------------------------
def test_missing_arch(data_bin, tmp_path):
    """fairseq itself raises a bare RuntimeError() here (compat._explain_missing_arch)."""
    save = tmp_path / "ckpt"
    proc = run([cli("fairseq-train"), data_bin, *TRAIN_COMMON, "--save-dir", save, "--max-update", "1"],
               check=False)
    assert_no_checkpoint(save)
    assert_one_line_error(proc, "no --arch given", "kd_gpt2_tiny", "hf_causal_lm")


def test_kd_criterion_without_teacher(data_bin, tmp_path):
    proc = train_fails(data_bin, tmp_path / "ckpt", "--criterion", "reverse_kl")
    assert_one_line_error(proc, "needs a teacher", "--teacher-path")


@pytest.mark.parametrize(
    "criterion, option, value, needle",
    [
        ("skew_kl", "--skew-alpha", "1.5", "--skew-alpha must be in [0, 1], got 1.5"),
        ("kd", "--kd-ratio", "-0.1", "--kd-ratio must be in [0, 1], got -0.1"),
        ("js", "--temperature", "0", "--temperature must be > 0, got 0"),
    ],
)
def test_out_of_range_option(criterion, option, value, needle, data_bin, teacher_ckpt, tmp_path):
    proc = train_fails(data_bin, tmp_path / "ckpt", "--criterion", criterion, "--teacher-path", teacher_ckpt,
                       option, value)
    assert_one_line_error(proc, needle)


# ---------------------------------------------------------------------------------------------
# instruction jsonl (distill-prepare)
# ---------------------------------------------------------------------------------------------
GOOD = {"instruction": "Repeat: sun tree", "input": "", "output": "sun tree"}


@pytest.mark.parametrize(
    "lines, needle",
    [
        ([json.dumps(GOOD), json.dumps({"instruction": "Repeat: sun", "input": ""})], ":2: missing field 'output'"),
        ([json.dumps(GOOD), json.dumps(GOOD), "{'instruction': 'single quotes'}"], ":3: not valid JSON"),
        ([], "no examples (the file is empty)"),
    ],
    ids=["no_output", "not_json", "empty"],
)
def test_bad_jsonl(lines, needle, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    bad = inputs / "train.jsonl"
    bad.write_text("".join(line + "\n" for line in lines))
    dest = tmp_path / "out" / "bin"
    proc = run([cli("distill-prepare"), "--train", bad, "--destdir", dest, "--vocab-size", "100"], check=False)
    assert_one_line_error(proc, str(bad), needle)
    assert not (tmp_path / "out").exists(), "half-written --destdir (or the parent it made)"
    assert sorted(os.listdir(inputs)) == ["train.jsonl"]


def test_bad_prepare_options(tmp_path):
    good = write_jsonl(tmp_path / "train.jsonl", [GOOD] * 4)
    dest = tmp_path / "out" / "bin"
    proc = run([cli("distill-prepare"), "--train", good, "--destdir", dest, "--workers", "0"], check=False)
    assert_one_line_error(proc, "--workers must be >= 1, got 0")
    assert not (tmp_path / "out").exists(), "half-written --destdir"
    # a total no longer than the prompt cap would leave long prompts no response token
    proc = run([cli("distill-prepare"), "--train", good, "--destdir", dest, "--max-prompt-tokens", "64",
                "--max-total-tokens", "64"], check=False)
    assert_one_line_error(proc, "need 0 < --max-prompt-tokens < --max-total-tokens")
    assert not (tmp_path / "out").exists(), "half-written --destdir"


@pytest.mark.parametrize(
    "row, needle",
    [
        ({"input": "x", "output": "y"}, ":2: missing field 'instruction' (or a rendered 'prompt')"),
        ({"instruction": "x", "output": []}, ":2: missing field 'output'"),
        ({"instruction": "x", "input": 3, "output": "y"}, ":2: field 'input' must be a string"),
        (["instruction", "output"], ":2: expected a JSON object, got list"),
    ],
)
def test_bad_rows_in_process(row, needle, tmp_path):
    """More malformed rows, checked without a subprocess (the reader distill-prepare uses)."""
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DistillError) as e:
        read_instruction_jsonl(str(path))
    assert needle in str(e.value) and str(path) in str(e.value)


def test_text_inputs_that_are_not_utf8(data_bin, tmp_path):
    """Before: a UnicodeDecodeError traceback from every reader of text input."""
    from distill_plugins.chain.config import load_chain
    from distill_plugins.cli import evaluate, miniplm, prepare_lm, score

    binary = tmp_path / "rnd.bin"
    binary.write_bytes(b"\x00\xff\xfe\x81 not text \xc3\x28\n" * 4)
    mixed = tmp_path / "train.jsonl"
    mixed.write_bytes((json.dumps(GOOD) + "\n").encode() + b"\xff\xfe{}\n")
    proc = run([cli("distill-prepare"), "--train", mixed, "--destdir", tmp_path / "out" / "bin"], check=False)
    assert_one_line_error(proc, f"{mixed}:2 is not UTF-8 text", "iconv")
    assert not (tmp_path / "out").exists()
    calls = [
        (lambda: score.main([data_bin, str(binary)]), f"generation file {binary} is not UTF-8"),
        (lambda: evaluate.main([str(binary), "--data", data_bin]), f"generation file {binary} is not UTF-8"),
        (lambda: prepare_lm.main(["--data", data_bin, "--train", str(binary), "--destdir", str(tmp_path / "lm")]),
         f"--train {binary} is not UTF-8"),
        (lambda: load_chain(str(binary)), f"chain file {binary} is not UTF-8"),
        (lambda: miniplm.check_text(str(binary), 4), f"--text {binary} is not UTF-8"),
    ]
    for call, needle in calls:
        with pytest.raises(DistillError) as e:
            call()
        assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert not (tmp_path / "lm").exists()


def test_reverse_kl_options(data_bin, teacher_ckpt, tmp_path):
    """Before: a ValueError traceback for --seeds 1,x or --batch-size 0, and --json replaced any file."""
    from distill_plugins.evaluation import reverse_kl

    common = [data_bin, "--student", teacher_ckpt, "--teacher", teacher_ckpt]
    existing = tmp_path / "r.json"
    existing.write_text("keep")
    for extra, needle in ((["--seeds", "1,x"], "--seeds '1,x': pass comma-separated integers"),
                          (["--seeds", "1,1"], "give distinct seeds"),
                          (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
                          (["--max-len", "1"], "--max-len must be >= 2"),
                          (["--json", str(existing)], "already exists; pass --overwrite"),
                          (["--json", teacher_ckpt, "--overwrite"], "also an input")):
        with pytest.raises(DistillError) as e:
            reverse_kl.main([*common, *extra])
        assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert existing.read_text() == "keep"


def test_prepare_hf_tokenizer_refuses_sentencepiece_options(tmp_path):
    """Before: --spm-model and --vocab-size were ignored silently with --tokenizer hf."""
    from distill_plugins.cli import prepare

    good = write_jsonl(tmp_path / "train.jsonl", [GOOD] * 4)
    for extra, needle in ((["--spm-model", "x.model"], "--spm-model is for the SentencePiece tokenizer"),
                          (["--vocab-size", "50"], "--vocab-size is for the SentencePiece tokenizer"),
                          (["--spm-model", "x.model", "--vocab-size", "50"], "--spm-model and --vocab-size are")):
        with pytest.raises(DistillError) as e:
            prepare.main(["--train", str(good), "--destdir", str(tmp_path / "out"), "--tokenizer", "hf",
                          "--hf-tokenizer", str(tmp_path), *extra])
        assert needle in str(e.value) and "drop" in str(e.value), str(e.value)
    assert not (tmp_path / "out").exists()
