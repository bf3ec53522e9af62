"""A checkpoint records its data's tokenizer, not only dict.txt: dict.txt of an HF tokenizer holds ids,
so two tokenizers of one size have the same dictionary while their ids mean other text. A fairseq
teacher, distill-export-hf and fairseq-generate refuse data of another tokenizer."""
import json
import os
import shutil

import pytest

pytest.importorskip("transformers", reason="needs the hf extra (transformers)")

import hf_fixtures as F  # noqa: E402
from conftest import cli, run  # noqa: E402
from distill_plugins.errors import DistillError  # noqa: E402
from distill_plugins.teacher import Teacher  # noqa: E402

ARCH = ["--arch", "kd_gpt2_tiny", "--decoder-layers", "1", "--decoder-embed-dim", "32",
        "--decoder-ffn-embed-dim", "64", "--decoder-attention-heads", "2"]


def swapped_tokenizer_data(tmp_path):
    """Data of a tokenizer like gpt2's with two (non-special) tokens' ids exchanged."""
    from distill_plugins.cli import prepare

    tok_dir = tmp_path / "swapped-tokenizer"
    tok_dir.mkdir()
    src = F.hf_dir("gpt2")
    for name in os.listdir(src):
        if name.startswith("tokenizer") or name.endswith(("map.json", "config.json")):
            shutil.copy(os.path.join(src, name), tok_dir)
    spec = json.loads((tok_dir / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = [t for t in vocab if t.startswith("Ġ")][:2]  # frequent word-initial pieces
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (tok_dir / "tokenizer.json").write_text(json.dumps(spec))
    files = F.jsonl_files()
    dest = tmp_path / "data-swapped"
    prepare.main(["--train", files["train"], "--valid", files["valid"], "--test", files["test"], "--destdir",
                  str(dest), "--tokenizer", "hf", "--hf-tokenizer", str(tok_dir), "--max-total-tokens", "96",
                  "--max-prompt-tokens", "64"])
    return str(dest)


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tokenizer-identity")
    data = F.prepared("gpt2")
    other = swapped_tokenizer_data(tmp)
    task, model, cfg = F.build(data, *ARCH)
    ckpt = F.save_checkpoint(tmp / "checkpoint.pt", model, cfg, task)
    return tmp, data, other, ckpt


def test_same_dictionary_other_tokenizer(setting):
    _, data, other, _ = setting
    for name in ("dict.src.txt", "dict.tgt.txt"):  # the premise: dict.txt cannot tell them apart
        with open(os.path.join(data, name)) as f, open(os.path.join(other, name)) as g:
            assert f.read() == g.read()


def test_fairseq_teacher_of_another_tokenizer_is_refused(setting):
    _, data, other, ckpt = setting
    task, _, _ = F.build(other, *ARCH)
    with pytest.raises(DistillError, match="trained on data of another tokenizer than .*cross-tokenizer|"
                                           "trained on data of another tokenizer than .*distil across tokenizers"):
        Teacher.load(ckpt, task)
    own_task, _, _ = F.build(data, *ARCH)
    assert Teacher.load(ckpt, own_task).sha256  # its own data's tokenizer: loads


def test_export_with_data_of_another_tokenizer_is_refused(setting):
    tmp, data, other, ckpt = setting
    out = tmp / "hf-other"
    proc = run([cli("distill-export-hf"), ckpt, str(out), "--data", other], check=False)
    assert proc.returncode != 0
    err = proc.stderr.strip().splitlines()[-1]
    assert err.startswith("fairseq-distill: error: this checkpoint was trained on data of another tokenizer"), err
    assert "pass the data directory it was trained on" in err and "Traceback" not in proc.stderr
    assert not out.exists()
    run([cli("distill-export-hf"), ckpt, str(tmp / "hf-own"), "--data", data])
    assert (tmp / "hf-own" / "model.safetensors").is_file()


def test_position_check_counts_the_bos_column_hf_models_skip():
    """An HF teacher never reads the BOS column, so its n positions take n + 1 fairseq columns (the check
    refused n + 1 first)."""
    from distill_plugins.tasks.instruction_distillation import InstructionDistillationConfig, InstructionDistillationTask

    task = InstructionDistillationTask.setup_task(InstructionDistillationConfig(data=F.prepared("gpt2")))
    teacher = Teacher.load(F.hf_dir("gpt2"), task)
    assert teacher.model.max_positions() == 128
    teacher.check_positions(129, "--tokens-per-sample 129")
    with pytest.raises(DistillError, match="has 128 positions, but sequences of up to 130 tokens"):
        teacher.check_positions(130, "--tokens-per-sample 130")
