"""Bad input is refused with one line naming the problem and the fix."""
import json
import os
import shutil

import pytest

pytest.importorskip("transformers", reason="needs the hf extra (transformers)")

import hf_fixtures as F  # noqa: E402
from conftest import TRAIN_COMMON, cli, run  # noqa: E402
from distill_plugins.errors import DistillError  # noqa: E402
from distill_plugins.teacher import Teacher  # noqa: E402


def task_of(family):
    task, _, _ = F.build(F.prepared(family), "--arch", "hf_causal_lm", "--hf-model-dir", F.hf_dir(family))
    return task


def test_directory_that_is_not_a_checkpoint(tmp_path):
    task = task_of("gpt2")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DistillError, match="no config.json, so it is not a Hugging Face checkpoint"):
        Teacher.load(str(tmp_path), task)
    weightless = tmp_path / "w"
    weightless.mkdir()
    shutil.copy(os.path.join(F.hf_dir("gpt2"), "config.json"), weightless)
    with pytest.raises(DistillError, match="has no weights"):
        Teacher.load(str(weightless), task)


def test_unsupported_architecture_lists_supported(tmp_path):
    task = task_of("gpt2")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": 10}))
    with pytest.raises(DistillError) as e:
        Teacher.load(str(tmp_path), task)
    assert "'bert' is not supported; supported: gpt2, llama, mistral, opt, qwen2" in str(e.value)


def test_teacher_with_another_tokenizer_points_to_cross_tokenizer_kd(tmp_path):
    data = F.prepared("llama")
    proc = run([cli("fairseq-train"), data, *TRAIN_COMMON, "--save-dir", tmp_path, "--max-update", "1",
                "--arch", "hf_causal_lm", "--hf-model-dir", F.hf_dir("llama"), "--criterion", "kd",
                "--teacher-path", F.hf_dir("opt")], check=False)
    assert proc.returncode != 0
    err = proc.stderr.strip().splitlines()[-1]
    assert err.startswith("fairseq-distill: error: the teacher") and "cross-tokenizer KD" in err, err
    assert "Traceback" not in proc.stderr
    assert not os.path.exists(tmp_path / "checkpoint_last.pt")


def test_dictionary_of_another_tokenizer(tmp_path, data_bin):
    # data prepared with SentencePiece
    with pytest.raises(DistillError, match="prepared with the sentencepiece tokenizer"):
        F.build(data_bin, "--arch", "hf_causal_lm", "--hf-model-dir", F.hf_dir("gpt2"))
    # data prepared with another HF tokenizer than the student's
    with pytest.raises(DistillError, match="different tokenizer than the data"):
        F.build(F.prepared("opt"), "--arch", "hf_causal_lm", "--hf-model-dir", F.hf_dir("gpt2"))
    # a dictionary that is not the recorded tokenizer's permutation
    bad = tmp_path / "data"
    shutil.copytree(F.prepared("gpt2"), bad)
    shutil.copy(os.path.join(F.prepared("opt"), "dict.src.txt"), bad / "dict.src.txt")
    with pytest.raises(DistillError, match="was not built from this Hugging Face tokenizer"):
        F.build(str(bad), "--arch", "hf_causal_lm", "--hf-model-dir", F.hf_dir("gpt2"))


def test_pickle_weights_need_allow_pickle():
    data = F.prepared("gpt2")
    pkl = F.hf_dir("gpt2", pickle=True)
    with pytest.raises(DistillError, match="loading a pickle can run arbitrary code.*--allow-pickle"):
        F.build(data, "--arch", "hf_causal_lm", "--hf-model-dir", pkl)
    _, model, _ = F.build(data, "--arch", "hf_causal_lm", "--hf-model-dir", pkl, "--allow-pickle")
    _, safe, _ = F.build(data, "--arch", "hf_causal_lm", "--hf-model-dir", F.hf_dir("gpt2"))
    a, b = model.state_dict(), safe.state_dict()
    assert all((a[k] == b[k]).all() for k in a)


def test_prepare_refuses_a_directory_without_tokenizer(tmp_path):
    files = F.jsonl_files()
    proc = run([cli("distill-prepare"), "--train", files["train"], "--destdir", tmp_path / "d", "--tokenizer", "hf",
                "--hf-tokenizer", tmp_path], check=False)
    assert proc.returncode != 0 and "has no tokenizer files" in proc.stderr
    assert not os.path.exists(tmp_path / "d")
