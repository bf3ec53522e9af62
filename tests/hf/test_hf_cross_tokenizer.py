"""Cross-tokenizer KD from a Hugging Face teacher with its own byte-level BPE tokenizer ("Ġ" word
markers) to a kd_gpt2 student on a SentencePiece vocabulary ("▁"): distill-prepare
--teacher-hf-tokenizer, the vocabulary mapping across the two marker conventions, and fairseq-train
with --criterion uld / min_ed / multi_cost_ot (DSKD-CMA + OT: the teacher's hidden states and embeddings)."""
import json
import os
import re

import pytest

pytest.importorskip("transformers", reason="needs the hf extra (transformers)")

import hf_fixtures as F  # noqa: E402
from conftest import TINY_MODEL, TRAIN_COMMON, cli, run  # noqa: E402


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    files = F.jsonl_files()
    dest = tmp_path_factory.mktemp("cross") / "bin"
    run([cli("distill-prepare"), "--train", files["train"], "--valid", files["valid"], "--destdir", dest,
         "--vocab-size", "300", "--teacher-hf-tokenizer", F.hf_dir("gpt2")])
    return dest


def test_hf_teacher_tokenization_and_mapping(data):
    from transformers import AutoTokenizer

    from distill_plugins.data.tokenizers import load_tokenizer

    meta = json.load(open(data / "teacher" / "tokenizer.json"))
    assert meta["type"] == "hf"
    alignment = json.load(open(data / "teacher" / "alignment.json"))
    hf = AutoTokenizer.from_pretrained(F.hf_dir("gpt2"))
    tok = load_tokenizer(str(data / "teacher"))
    # the teacher's token strings are the HF tokenizer's own (byte-level, with "Ġ")
    from fairseq.data import Dictionary

    strings = alignment["teacher_tokens"]
    symbols = Dictionary.load(str(data / "teacher" / "dict.src.txt")).symbols
    assert len(strings) == len(symbols)
    for sym, s in zip(symbols, strings):
        hf_id = tok.vocab.hf_id(sym)
        assert s == (sym if hf_id is None else hf.convert_ids_to_tokens(hf_id))
    assert sum(s.startswith("Ġ") for s in strings) > 20
    student = alignment["student_tokens"]
    mapping = alignment["teacher_to_student"]
    pieces = set(student[4:])
    matched = 0
    for i, s in enumerate(strings[4:], 4):  # "Ġapple" maps to "▁apple", "ing" to "ing", where the student has it
        if s.replace("Ġ", "▁") in pieces:
            assert student[mapping[i]] == s.replace("Ġ", "▁")
            matched += 1
    assert matched > 30


@pytest.mark.parametrize("criterion", ["uld", "min_ed", "multi_cost_ot"])
def test_hf_teacher_trains_a_student_of_another_tokenizer(criterion, data, tmp_path):
    proc = run([cli("fairseq-train"), data, *TRAIN_COMMON, *TINY_MODEL, "--save-dir", tmp_path / "ckpt",
                "--max-update", "3", "--criterion", criterion, "--teacher-path", F.hf_dir("gpt2"),
                "--teacher-data", data / "teacher", "--tokens-per-sample", "128"])  # the fixture's 128 positions
    log = proc.stdout + proc.stderr
    kd = [float(x) for x in re.findall(r"(?<![a-z_])kd_loss=([0-9.]+)", log)]
    assert len(kd) == 3 and all(k > 0 for k in kd), log[-2000:]
    assert "Hugging Face" in log and os.path.isfile(tmp_path / "ckpt" / "checkpoint_last.pt")
