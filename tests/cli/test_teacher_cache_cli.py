"""distill-cache-teacher and fairseq-train --teacher-cache through the real CLIs: a full-vocabulary
fp32 cache trains exactly like the live teacher, a top-k cache trains, and bad input is refused."""
import json
import os

import numpy as np
import pytest

from test_bad_input import assert_one_line_error, train_fails
from test_kd_impl import updates
from conftest import cli, run, train
from distill_plugins.errors import DistillError


def vocab_size(data_bin):
    return 4 + sum(1 for _ in open(os.path.join(data_bin, "dict.src.txt")))


def cache(data_bin, teacher_ckpt, out, *extra, check=True):
    return run([cli("distill-cache-teacher"), "--data", data_bin, "--teacher", teacher_ckpt, "--out", out,
                "--max-tokens", "512", "--chunk-size", "50", *extra], check=check)


def label_tokens(data_bin, split):
    from distill_plugins.tasks.instruction_distillation import InstructionDistillationConfig, InstructionDistillationTask

    task = InstructionDistillationTask.setup_task(InstructionDistillationConfig(data=data_bin))
    task.load_dataset(split)
    ds = task.dataset(split)
    return sum(int(ds[i]["target"].ne(task.dictionary.pad()).sum()) for i in range(len(ds)))


def test_full_vocabulary_cache_trains_like_the_teacher(data_bin, teacher_ckpt, tmp_path):
    vocab = vocab_size(data_bin)
    proc = cache(data_bin, teacher_ckpt, tmp_path / "full", "--top-k", str(vocab), "--cache-dtype", "fp32")
    assert "cached" in proc.stdout and "tokens/s" in proc.stdout
    meta = json.load(open(tmp_path / "full" / "cache.json"))
    assert meta["top_k"] == vocab and meta["splits"] == {"train": 240, "valid": 24}
    rows = np.load(tmp_path / "full" / "tail.npy", mmap_mode="r").shape[0]
    # every label token once (the toy data has a few duplicate examples, stored once)
    assert rows <= label_tokens(data_bin, "train") + label_tokens(data_bin, "valid")
    assert rows == int(np.load(tmp_path / "full" / "offsets.npy")[-1])
    runs = {}
    for name, teacher in (("live", ["--teacher-path", teacher_ckpt]),
                          ("cache", ["--teacher-cache", str(tmp_path / "full")]),
                          ("cache_plain", ["--teacher-cache", str(tmp_path / "full"), "--kd-impl", "plain"])):
        proc = train(data_bin, tmp_path / name, "--criterion", "kd", *teacher, "--kd-chunk-size", "7",
                     "--no-save", max_update=3)
        runs[name] = updates(proc.stdout + proc.stderr)
        if name != "live":
            assert "teacher cache" in proc.stdout + proc.stderr
    assert sorted(runs["live"]) == [1, 2, 3]
    for name in ("cache", "cache_plain"):
        for update in (1, 2, 3):
            for ours, live in zip(runs[name][update], runs["live"][update]):
                assert abs(ours - live) <= 2e-3 + 1e-3 * abs(live), (name, update, runs[name], runs["live"])


def test_top_k_cache_trains_and_saves_its_record(data_bin, teacher_ckpt, tmp_path):
    cache(data_bin, teacher_ckpt, tmp_path / "top8", "--top-k", "8")
    assert np.load(tmp_path / "top8" / "ids.npy", mmap_mode="r").dtype == np.uint16
    assert np.load(tmp_path / "top8" / "logp.npy", mmap_mode="r").dtype == np.float16
    proc = train(data_bin, tmp_path / "ckpt", "--criterion", "skew_kl", "--teacher-cache", str(tmp_path / "top8"),
                 "--teacher-cache-tail", "none", max_update=3)
    log = updates(proc.stdout + proc.stderr)
    assert sorted(log) == [1, 2, 3] and all(np.isfinite(v).all() for v in log.values())
    import torch

    state = torch.load(tmp_path / "ckpt" / "checkpoint_last.pt", weights_only=False)
    record = state["task_state"]["teachers"][0]
    assert record["cache_top_k"] == 8 and record["path"] == str(tmp_path / "top8")
    from distill_plugins.teacher import sha256_file

    assert record["sha256"] == sha256_file(teacher_ckpt)


def test_bad_input(data_bin, teacher_ckpt, tmp_path):
    # through fairseq-train: a directory that is not a cache; a cache of the valid split only, used for
    # training (refused when the train split is loaded, before any update); nothing saved
    (tmp_path / "empty").mkdir()
    proc = train_fails(data_bin, tmp_path / "c1", "--criterion", "kd", "--teacher-cache", tmp_path / "empty")
    assert_one_line_error(proc, "not a teacher cache", "distill-cache-teacher")
    valid_only = str(tmp_path / "valid_only")
    cache(data_bin, teacher_ckpt, valid_only, "--top-k", "4", "--splits", "valid")
    proc = train_fails(data_bin, tmp_path / "c2", "--criterion", "kd", "--teacher-cache", valid_only)
    assert_one_line_error(proc, "has no entry", "'train' split", "--splits")
    # a criterion that reads the teacher's hidden states: a cache holds logits only (was a traceback)
    proc = train_fails(data_bin, tmp_path / "c3", "--criterion", "dskd", "--teacher-cache", valid_only)
    assert_one_line_error(proc, "--criterion dskd projects the teacher's hidden states", "--teacher-path instead")


def test_bad_options_in_process(data_bin, teacher_ckpt, tmp_path):
    """The task's and the cache CLI's other refusals (one-line DistillError), without a subprocess each."""
    from distill_plugins.cli import cache_teacher
    from distill_plugins.tasks.instruction_distillation import InstructionDistillationConfig, InstructionDistillationTask

    valid_only = str(tmp_path / "valid_only")
    cache_teacher.main(["--data", data_bin, "--teacher", teacher_ckpt, "--out", valid_only, "--top-k", "4",
                        "--splits", "valid"])
    for options, needles in (
        (dict(teacher_path=teacher_ckpt), ("--teacher-path and --teacher-cache",)),
        (dict(tokens_per_sample=64), ("--tokens-per-sample 512", "uses 64")),
        (dict(student_data_mode="mixed"), ("--student-data-mode mixed", "--teacher-path instead")),
        (dict(teacher_sharding="fsdp"), ("--teacher-sharding fsdp", "drop the option")),
        # teacher-model options a cache would ignore (were accepted silently)
        (dict(teacher_dtype="bf16"), ("--teacher-dtype is for a teacher model", "drop the option")),
        (dict(teacher_device="cuda:5"), ("--teacher-device is for a teacher model",)),
        (dict(teacher_compile=True), ("--teacher-compile is for a teacher model",)),
    ):
        task = InstructionDistillationTask.setup_task(
            InstructionDistillationConfig(data=data_bin, teacher_cache=valid_only, seed=1, **options))
        with pytest.raises(DistillError) as e:
            task.load_teachers()
        assert all(n in str(e.value) for n in needles), str(e.value)
    task = InstructionDistillationTask.setup_task(InstructionDistillationConfig(  # and the reverse: ignored before
        data=data_bin, teacher_path=teacher_ckpt, teacher_cache_tail="none", seed=1))
    with pytest.raises(DistillError, match="--teacher-cache-tail is for a --teacher-cache"):
        task.load_teachers()
    # a cache cut short (a kill while copying or deleting it): one line, not a numpy traceback
    import shutil

    for damage, needle in ((lambda d: os.remove(d / "keys.npy"), "incomplete or damaged (keys.npy"),
                           (lambda d: (d / "logp.npy").write_bytes((d / "logp.npy").read_bytes()[:-64]),
                            "incomplete or damaged (logp.npy"),
                           (lambda d: shutil.copy(d / "keys.npy", d / "tail.npy"), "its arrays disagree in size")):
        damaged = tmp_path / "damaged"
        shutil.rmtree(damaged, ignore_errors=True)
        shutil.copytree(valid_only, damaged)
        damage(damaged)
        task = InstructionDistillationTask.setup_task(
            InstructionDistillationConfig(data=data_bin, teacher_cache=str(damaged), seed=1))
        with pytest.raises(DistillError, match=needle.replace("(", r"\(")):
            task.load_teachers()
    for argv, needles in (([ "--out", valid_only], ("already exists", "--overwrite")),
                          (["--out", str(tmp_path / "big_k"), "--top-k", "100000"], ("--top-k 100000", "vocabulary"))):
        with pytest.raises(DistillError) as e:
            cache_teacher.main(["--data", data_bin, "--teacher", teacher_ckpt, *argv])
        assert all(n in str(e.value) for n in needles), str(e.value)
    assert not (tmp_path / "big_k").exists()
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".teacher-cache-")]
