"""fairseq-train mistakes that used to train silently on nothing or without the teacher: one-line
errors, non-zero exit, no checkpoint (see test_bad_input.py for the helpers)."""
import logging

import pytest

from test_bad_input import assert_one_line_error, train_fails


@pytest.mark.parametrize("extra, needles", [
    # --criterion forgotten: fairseq's default cross_entropy would train without the teacher it loaded
    ((), ("--criterion cross_entropy does not use a teacher", "--teacher-path")),
    (("--criterion", "kd", "--teacher-path", "{t},{t}"), ("--criterion kd takes one teacher", "gives 2",
                                                        "multi_teacher_kd")),
    (("--criterion", "kd", "--tokens-per-sample", "0"), ("--tokens-per-sample must be >= 1, got 0",)),
    # every tiny prompt is longer than 4 tokens: no response label anywhere (was loss 0, wpb 0, exit 0)
    (("--criterion", "kd", "--tokens-per-sample", "4"), ("no 'valid' example keeps a response token",
                                                       "--tokens-per-sample 4", "longest prompt")),
], ids=["teacher-without-kd-criterion", "two-teachers-for-kd", "tokens-per-sample-0", "prompts-fill-the-window"])
def test_teacher_and_window_mistakes(extra, needles, data_bin, teacher_ckpt, tmp_path):
    extra = [e.format(t=teacher_ckpt) for e in extra]
    if "--teacher-path" not in extra:
        extra += ["--teacher-path", teacher_ckpt]
    proc = train_fails(data_bin, tmp_path / "ckpt", *extra)
    assert_one_line_error(proc, *needles)


def test_some_prompts_filling_the_window_are_counted_in_a_warning(data_bin, caplog):
    from distill_plugins.tasks.instruction_distillation import (
        InstructionDistillationConfig, InstructionDistillationTask)

    task = InstructionDistillationTask.setup_task(InstructionDistillationConfig(data=data_bin))
    task.load_dataset("train")
    prompts = task.datasets["train"].prompt_sizes
    limit = int(sorted(prompts)[len(prompts) // 2])  # about half the prompts fill this window
    task = InstructionDistillationTask.setup_task(InstructionDistillationConfig(data=data_bin, tokens_per_sample=limit))
    with caplog.at_level(logging.WARNING):
        task.load_dataset("train")
    empty = int((task.datasets["train"].label_counts() == 0).sum())
    assert 0 < empty < len(prompts) and empty == int((prompts >= limit).sum())
    assert f"{empty} of {len(prompts)} 'train' examples keep no response token" in caplog.text


def test_teacher_path_to_a_save_directory_names_its_checkpoint_file(data_bin, teacher_ckpt, tmp_path):
    """A fairseq --save-dir instead of its checkpoint_best.pt (was: a message about HF tokenizers)."""
    import os

    save_dir = os.path.dirname(teacher_ckpt)
    proc = train_fails(data_bin, tmp_path / "ckpt", "--criterion", "kd", "--teacher-path", save_dir)
    assert_one_line_error(proc, "no config.json", f"--teacher-path {teacher_ckpt}")


def test_resuming_with_another_teacher_warns(data_bin, teacher_ckpt, tmp_path):
    """fairseq never hands the task its saved state on a resume; the first step compares the teachers."""
    import shutil

    from conftest import train

    save = tmp_path / "ckpt"
    train(data_bin, save, "--criterion", "kd", "--teacher-path", teacher_ckpt, max_update=1)
    same = train(data_bin, save, "--criterion", "kd", "--teacher-path", teacher_ckpt, max_update=2)
    assert "resuming with different teachers" not in same.stdout + same.stderr
    other = str(tmp_path / "other.pt")  # another model of the same vocabulary: the student so far
    shutil.copy(save / "checkpoint_last.pt", other)
    resumed = train(data_bin, save, "--criterion", "kd", "--teacher-path", other, max_update=3)
    log = resumed.stdout + resumed.stderr
    assert "WARNING" in log and "resuming with different teachers" in log and other in log


def test_fairseq_own_failures_end_in_one_line(data_bin, teacher_ckpt, tmp_path):
    """fairseq's tracebacks in the documented pipeline become one-line errors (fairseq_errors.py)."""
    import shutil

    from conftest import USER_DIR, cli, run

    proc = train_fails(data_bin, tmp_path / "a", "--criterion", "kd", "--teacher-path", teacher_ckpt, "--bf16")
    assert_one_line_error(proc, "fairseq-train --bf16", "distill-train")
    other = tmp_path / "other"  # a save dir holding another architecture's checkpoint (the wider teacher)
    other.mkdir()
    shutil.copy(teacher_ckpt, other / "checkpoint_last.pt")
    proc = train_fails(data_bin, tmp_path / "b", "--criterion", "kd", "--teacher-path", teacher_ckpt,
                       "--restore-file", other / "checkpoint_last.pt")
    assert_one_line_error(proc, "Cannot load model parameters from checkpoint", "another model")
    proc = run([cli("fairseq-generate"), data_bin, "--user-dir", USER_DIR, "--task", "instruction_distillation",
                "--cpu", "--path", tmp_path / "nope.pt", "--gen-subset", "test"], check=False)
    assert_one_line_error(proc, "Model file not found", "check --path")


@pytest.mark.parametrize("device, needle", [("gpu", "is not a device this command runs on"),
                                            ("cuda:99", "--teacher-device cuda:99")])
def test_bad_teacher_device(device, needle, data_bin, teacher_ckpt, tmp_path):
    proc = train_fails(data_bin, tmp_path / "ckpt", "--criterion", "kd", "--teacher-path", teacher_ckpt,
                       "--teacher-device", device)
    assert_one_line_error(proc, "--teacher-device", needle)


def test_a_teacher_with_fewer_positions_is_refused_before_training(data_bin, tmp_path):
    """Before: an IndexError traceback from the teacher's position embedding at the first long batch."""
    from conftest import train

    short = tmp_path / "short"
    train(data_bin, short, "--criterion", "cross_entropy", "--max-target-positions", "96", "--tokens-per-sample", "96",
          max_update=1)
    teacher = short / "checkpoint_last.pt"
    proc = train_fails(data_bin, tmp_path / "a", "--criterion", "kd", "--teacher-path", teacher,
                       "--tokens-per-sample", "128")
    assert_one_line_error(proc, "has 96 positions", "up to 128 tokens", "--tokens-per-sample 96")
    # a student with no more positions than the teacher only ever gives it sequences that fit
    train(data_bin, tmp_path / "b", "--criterion", "kd", "--teacher-path", teacher, "--tokens-per-sample", "128",
          "--max-target-positions", "96", "--skip-invalid-size-inputs-valid-test", max_update=1)


def test_a_teacher_that_cannot_be_built_is_one_line(data_bin, teacher_ckpt, tmp_path):
    """Before: a 39-line traceback ending in KeyError for an architecture no plugin registers."""
    import torch

    state = torch.load(teacher_ckpt, map_location="cpu", weights_only=False)
    state["cfg"]["model"]["_name"] = state["cfg"]["model"]["arch"] = "no_such_arch"
    bad = tmp_path / "foreign.pt"
    torch.save(state, bad)
    proc = train_fails(data_bin, tmp_path / "ckpt", "--criterion", "kd", "--teacher-path", bad)
    assert_one_line_error(proc, f"teacher {bad} cannot be built from its checkpoint", "--teacher-path")


def test_a_forgotten_batch_size_is_one_line(data_bin, tmp_path):
    from conftest import TINY_MODEL, TRAIN_COMMON, cli, run

    i = TRAIN_COMMON.index("--max-tokens")
    common = TRAIN_COMMON[:i] + TRAIN_COMMON[i + 2:]
    proc = run([cli("fairseq-train"), data_bin, *common, *TINY_MODEL, "--criterion", "cross_entropy",
                "--save-dir", tmp_path / "ckpt", "--max-update", "1"], check=False)
    assert_one_line_error(proc, "needs a batch size", "--max-tokens", "--batch-size")


def test_a_teacher_without_dictionary_or_embeddings_is_named(data_bin, teacher_ckpt, tmp_path):
    """Before: 'teacher dictionary (size None) differs from the student's'."""
    import torch

    from distill_plugins.errors import DistillError
    from distill_plugins.tasks.instruction_distillation import InstructionDistillationConfig, InstructionDistillationTask
    from distill_plugins.teacher import Teacher

    state = torch.load(teacher_ckpt, map_location="cpu", weights_only=False)
    state.pop("task_state", None)
    state["model"]["decoder.embed_tokens_renamed.weight"] = state["model"].pop("decoder.embed_tokens.weight")
    bad = tmp_path / "renamed.pt"
    torch.save(state, bad)
    task = InstructionDistillationTask.setup_task(InstructionDistillationConfig(data=data_bin))
    with pytest.raises(DistillError, match="records no dictionary and has no decoder.embed_tokens.weight"):
        Teacher.load(str(bad), task)


def test_the_position_check_counts_the_prepared_length_and_bad_response_caps(data_bin, tiny_jsonl, tmp_path):
    """Inputs are cut to distill-prepare's --max-total-tokens, so a teacher needs only that many positions
    (the check first asked for --tokens-per-sample); a negative --max-response-tokens is refused."""
    import os

    from conftest import train
    from distill_plugins.cli import prepare
    from distill_plugins.errors import DistillError
    from distill_plugins.tasks.instruction_distillation import InstructionDistillationConfig, InstructionDistillationTask

    short = tmp_path / "short"
    train(data_bin, short, "--criterion", "cross_entropy", "--max-target-positions", "96", "--tokens-per-sample", "96",
          max_update=1)
    data = str(tmp_path / "bin64")
    prepare.main(["--train", tiny_jsonl["train"], "--valid", tiny_jsonl["valid"], "--destdir", data, "--spm-model",
                  os.path.join(data_bin, "spm.model"), "--max-prompt-tokens", "48", "--max-total-tokens", "64"])
    proc = train(data, tmp_path / "kd", "--criterion", "kd", "--teacher-path", short / "checkpoint_last.pt",
                 max_update=1)  # --tokens-per-sample 512, but no input is over 64 tokens
    assert "done training" in proc.stdout + proc.stderr
    with pytest.raises(DistillError, match="--max-response-tokens must be >= 0"):
        InstructionDistillationTask.setup_task(InstructionDistillationConfig(data=data_bin, max_response_tokens=-1))
