"""Cross-tokenizer KD through the real CLIs: distill-prepare with the teacher's own SentencePiece
model, a teacher trained on its tokenization, ULD and MinED students (fairseq-train --teacher-data),
fairseq-generate with the student, and bad input."""
import json
import os
import re

import pytest
import torch
from fairseq.data import Dictionary, data_utils

from conftest import USER_DIR, built_once, cli, run, train
from distill_plugins.data.tokenizers import load_tokenizer
from test_bad_input import assert_no_checkpoint, assert_one_line_error


@pytest.fixture(scope="module")
def cross_data(tiny_jsonl, tmp_path_factory):
    """DATA (student SentencePiece, 400 pieces) with DATA/teacher (another SentencePiece model, 300
    pieces, trained on the same rows by a first distill-prepare run), and a teacher trained on it."""
    def build(d):
        run([cli("distill-prepare"), "--train", tiny_jsonl["train"], "--destdir", d / "spm300", "--vocab-size", "300"])
        run([cli("distill-prepare"), "--train", tiny_jsonl["train"], "--valid", tiny_jsonl["valid"],
             "--test", tiny_jsonl["test"], "--destdir", d / "bin", "--vocab-size", "400",
             "--teacher-spm-model", d / "spm300" / "spm.model"])
        train(d / "bin" / "teacher", d / "teacher", "--criterion", "cross_entropy", "--decoder-embed-dim", "48",
              max_update=30)

    d = built_once(tmp_path_factory, "cross_tokenizer", build)
    return {"data": str(d / "bin"), "teacher_data": str(d / "bin" / "teacher"),
            "teacher": str(d / "teacher" / "checkpoint_best.pt")}


def read_split(data_dir, split):
    d = Dictionary.load(os.path.join(data_dir, "dict.src.txt"))
    sides = [data_utils.load_indexed_dataset(os.path.join(data_dir, f"{split}.src-tgt.{s}"), d) for s in ("src", "tgt")]
    return d, sides


def test_prepare_writes_the_same_rows_in_both_tokenizations(cross_data, tiny_jsonl):
    data, teacher_data = cross_data["data"], cross_data["teacher_data"]
    for split in ("train", "valid", "test"):
        assert open(os.path.join(data, f"{split}.jsonl")).read() == open(os.path.join(teacher_data, f"{split}.jsonl")).read()
    s_tok, t_tok = load_tokenizer(data), load_tokenizer(teacher_data)
    (s_dict, s_sides), (t_dict, t_sides) = read_split(data, "valid"), read_split(teacher_data, "valid")
    assert len(s_dict) != len(t_dict) and len(s_sides[0]) == len(t_sides[0]) == 24
    longer = 0
    for i in range(24):  # the same text, tokenized differently
        s = [s_tok.decode([s_dict[x] for x in side[i][:-1].tolist()]) for side in s_sides]
        t = [t_tok.decode([t_dict[x] for x in side[i][:-1].tolist()]) for side in t_sides]
        assert s == t
        longer += len(t_sides[0][i]) > len(s_sides[0][i])
    assert longer > 12  # the 300-piece teacher needs more tokens
    alignment = json.load(open(os.path.join(teacher_data, "alignment.json")))
    assert alignment["student_tokens"] == s_dict.symbols and alignment["teacher_tokens"] == t_dict.symbols
    mapping = alignment["teacher_to_student"]
    assert len(mapping) == len(t_dict) and all(0 <= j < len(s_dict) for j in mapping)
    student_pieces = set(s_dict.symbols[4:])
    shared = [i for i in range(4, len(t_dict)) if t_dict[i] in student_pieces]
    assert len(shared) > 100
    for i in shared:  # a piece both vocabularies have (marker included) maps to itself
        assert s_dict[mapping[i]] == t_dict[i]


def logged(log, key):
    """``key`` of every per-update log line (fairseq's simple format: ``key=value``)."""
    return [float(x) for x in re.findall(rf"(?<![a-z_]){key}=([0-9.]+)", log)]


@pytest.mark.parametrize("criterion", ["uld", "min_ed", "dskd_cma", "multi_cost_ot"])
def test_cross_tokenizer_student_trains_and_generates(criterion, cross_data, tmp_path):
    save = tmp_path / "ckpt"
    # multi_cost_ot: MCW-KD's cost weights re-solved every 10 updates
    extra = ["--ot-weight-update-interval", "10"] if criterion == "multi_cost_ot" else []
    proc = train(cross_data["data"], save, "--criterion", criterion, "--kd-ratio", "1.0",
                 "--teacher-path", cross_data["teacher"], "--teacher-data", cross_data["teacher_data"],
                 "--lr", "1e-2", *extra, max_update=40)
    log = proc.stdout + proc.stderr
    kd, aligned = logged(log, "kd_loss"), logged(log, "aligned")
    assert len(kd) == len(aligned) == 40, log[-3000:]
    assert sum(kd[-5:]) < sum(kd[:5]), kd  # the divergence to the teacher goes down
    if criterion == "multi_cost_ot":
        ot_logit, ot_hidden, w_kl = logged(log, "ot_logit"), logged(log, "ot_hidden"), logged(log, "w_logit_kl")
        assert len(ot_logit) == len(ot_hidden) == len(w_kl) == 40
        assert sum(ot_hidden[-5:]) < sum(ot_hidden[:5]), ot_hidden  # the OT terms are trained too
        assert set(w_kl[:10]) == {0.5} and len(set(w_kl[10:])) > 1, w_kl  # fixed until update 10, then re-solved
    if criterion == "uld":
        assert all(a > 0.5 for a in aligned)  # the teacher's responses are mostly the longer
    elif criterion == "dskd_cma":  # aligned: where argmax t2s is the label; the projections learn
        assert sum(aligned[-5:]) > sum(aligned[:5]), aligned
    else:
        assert 0 < sum(aligned) / len(aligned) < 1 and all(0 <= a <= 1 for a in aligned), aligned
    state = torch.load(save / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    assert state["task_state"]["teachers"][0]["path"] == os.path.abspath(cross_data["teacher"])
    assert not any("teacher" in k for k in state["model"])
    if criterion in ("dskd_cma", "multi_cost_ot"):  # the projections are the criterion's, saved with it
        want = [f"projectors.{p}.{w}" for p in ("t2s", "s2t", "query") for w in ("weight", "bias")]
        if criterion == "multi_cost_ot":
            want += [f"ot.{p}.{w}" for p in ("teacher", "salience") for w in ("weight", "bias")]
            want += ["logit_cost_weights", "hidden_cost_weights", "cost_sums", "cost_batches"]
            weights = state["criterion"]["logit_cost_weights"]
            assert weights.sum().item() == pytest.approx(1.0) and weights.tolist() == pytest.approx(
                [w_kl[-1] if i == 1 else weights[i].item() for i in range(3)], abs=1e-3)
        assert sorted(state["criterion"]) == sorted(want)
    if criterion == "multi_cost_ot":  # resumed at update 40: first the re-solve due there, from the saved cost sums
        from distill_plugins.optimal_transport import simplex_weights

        sums, batches = state["criterion"]["cost_sums"], state["criterion"]["cost_batches"]
        assert batches == 10  # updates 31-40
        due = simplex_weights(sums[:3] / batches, 0.7)
        proc = train(cross_data["data"], save, "--criterion", criterion, "--kd-ratio", "1.0",
                     "--teacher-path", cross_data["teacher"], "--teacher-data", cross_data["teacher_data"],
                     "--lr", "1e-2", *extra, max_update=42)
        resumed = logged(proc.stdout + proc.stderr, "w_logit_kl")
        assert len(resumed) == 2 and resumed[0] == pytest.approx(due[1].item(), abs=1e-3), (resumed, due)
    # the student generates with its own data alone (no --teacher-data, no teacher)
    out = tmp_path / "gen"
    run([cli("fairseq-generate"), cross_data["data"], "--user-dir", USER_DIR,
         "--task", "instruction_distillation", "--path", save / "checkpoint_last.pt", "--gen-subset", "test",
         "--beam", "1", "--sampling", "--max-len-b", "200", "--batch-size", "8", "--cpu", "--results-path", out])
    assert sum(line.startswith("H-") for line in (out / "generate-test.txt").read_text().splitlines()) == 16


def test_bad_cross_tokenizer_input(cross_data, data_bin, teacher_ckpt, tiny_jsonl, tmp_path):
    data, teacher_data, teacher = cross_data["data"], cross_data["teacher_data"], cross_data["teacher"]
    cases = [
        (["--criterion", "uld", "--teacher-path", teacher], ["needs --teacher-data"]),
        (["--criterion", "kd", "--teacher-path", teacher, "--teacher-data", teacher_data],
         ["--teacher-data is for cross-tokenizer criterions", "drop --teacher-data"]),
        # a teacher of the student's dictionary given with the teacher's tokenization
        (["--criterion", "uld", "--teacher-path", teacher_ckpt, "--teacher-data", teacher_data],
         ["dictionary", f"differs from that of --teacher-data {teacher_data}", "trained on that tokenization"]),
        (["--criterion", "multi_cost_ot", "--teacher-path", teacher, "--teacher-data", teacher_data, "--ot-top-k", "0"],
         ["--ot-top-k must be >= 1"]),
    ]
    for n, (extra, needles) in enumerate(cases):
        save = tmp_path / f"ckpt{n}"
        proc = train(data, save, *extra, max_update=1, check=False)
        assert_one_line_error(proc, *needles)
        assert_no_checkpoint(save)

    # rows that do not pair up: a teacher tokenization of fewer rows
    fewer = tmp_path / "fewer.jsonl"
    fewer.write_text("".join(open(tiny_jsonl["train"]).readlines()[:100]))
    run([cli("distill-prepare"), "--train", fewer, "--valid", tiny_jsonl["valid"], "--destdir", tmp_path / "few",
         "--spm-model", os.path.join(teacher_data, "spm.model")])
    proc = train(data, tmp_path / "ckpt_rows", "--criterion", "uld", "--teacher-path", teacher,
                 "--teacher-data", tmp_path / "few", max_update=1, check=False)
    assert_one_line_error(proc, "100 'train' examples", "240", "one distill-prepare run")
    assert_no_checkpoint(tmp_path / "ckpt_rows")

    # distill-prepare: two teacher tokenizers, a missing model; nothing written
    for extra, needle in ((["--teacher-spm-model", os.path.join(teacher_data, "spm.model"), "--teacher-hf-tokenizer",
                            tmp_path], "both given"),
                          (["--teacher-spm-model", tmp_path / "none.model"], "does not exist")):
        dest = tmp_path / "prep"
        proc = run([cli("distill-prepare"), "--train", tiny_jsonl["train"], "--destdir", dest, *extra], check=False)
        assert_one_line_error(proc, needle)
        assert not dest.exists()


def test_dskd_same_tokenizer_trains_and_resumes(data_bin, teacher_ckpt, tmp_path):
    """dskd with the one-tokenizer teacher; a resumed run restores the projections (fairseq loads the
    criterion's state strictly) and continues."""
    save = tmp_path / "ckpt"
    common = ("--criterion", "dskd", "--teacher-path", teacher_ckpt, "--dskd-divergence", "skew_kl")
    proc = train(data_bin, save, *common, max_update=4)
    log = proc.stdout + proc.stderr
    first = torch.load(save / "checkpoint_last.pt", map_location="cpu", weights_only=False)["criterion"]
    assert first["projectors.t2s.weight"].shape == (32, 48)  # teacher 48 dims -> student 32
    assert len(logged(log, "s2t_kl")) == 4
    proc = train(data_bin, save, *common, max_update=6)
    log = proc.stdout + proc.stderr
    assert re.search(r"[Ll]oaded checkpoint .*\(epoch \d+ @ 4 updates\)", log), log[-2000:]
    assert logged(log, "s2t_kl") and "num_updates 6" in log
    second = torch.load(save / "checkpoint_last.pt", map_location="cpu", weights_only=False)["criterion"]
    assert not torch.equal(first["projectors.t2s.weight"], second["projectors.t2s.weight"])
