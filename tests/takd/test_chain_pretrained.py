"""distill-chain with a pretrained (externally trained) stage and Rouge-L evaluation of every stage,
through the real CLIs (distill-chain -> fairseq-train, distill-evaluate) on the tiny data."""
import json
import os
import shutil

import pytest
import torch

from chain_helpers import DEFAULTS, bad, manifest, write_chain
from conftest import cli, run
from distill_plugins.teacher import sha256_file


def pretrained_chain(data, teacher, evaluate=None):
    """An externally trained teacher (pretrained:) -> a student distilled from it, scored by Rouge-L."""
    chain = {
        "name": "pre",
        "data": data,
        "defaults": dict(DEFAULTS, **{"max-update": 4}),
        "stages": [
            {"name": "teacher", "pretrained": teacher},
            {"name": "student", "arch": "kd_gpt2_tiny", "teacher": "teacher",
             "args": {"criterion": "kd", "decoder-embed-dim": 32}},
        ],
    }
    if evaluate is not None:
        chain["evaluate"] = evaluate
    return chain


def test_pretrained_teacher_and_rouge_in_manifest(data_bin, teacher_ckpt, tmp_path):
    teacher = str(tmp_path / "teacher.pt")
    shutil.copy(teacher_ckpt, teacher)
    eval_file = tmp_path / "evalset" / "test.jsonl"  # a copy: edited below
    eval_file.parent.mkdir()
    shutil.copy(os.path.join(data_bin, "test.jsonl"), eval_file)
    config = write_chain(tmp_path / "chain.yaml", pretrained_chain(
        data_bin, teacher, evaluate={"seeds": [1], "batch-size": 16, "max-length": 96, "max-prompt-tokens": 64,
                                     "eval-files": ["evalset/test.jsonl"]}))  # relative to the chain file
    out = str(tmp_path / "out")
    first = run([cli("distill-chain"), config, "--output-dir", out]).stdout
    m = manifest(out)
    rec_t, rec_s = m["stages"]["teacher"], m["stages"]["student"]
    assert rec_t["status"] == "pretrained" and rec_t["checkpoint"]["sha256"] == sha256_file(teacher)
    assert rec_s["status"] == "done" and rec_s["teachers"][0]["sha256"] == sha256_file(teacher)
    assert not os.path.exists(os.path.join(out, "teacher", "checkpoint_best.pt"))  # never trained
    assert rec_t["parameters"] > rec_s["parameters"] > 0
    for rec, name in ((rec_t, "teacher"), (rec_s, "student")):
        score = rec["evaluation"]["sets"]["test"]
        assert score["examples"] == 16 and score["seeds"] == 1 and 0.0 <= score["rouge_l"] <= 100.0
        with open(os.path.join(out, rec["evaluation"]["path"])) as f:  # the distill-evaluate report itself
            assert json.load(f)["runs"][0]["files"][0]["rouge_l"] == score["rouge_l"]
    assert "Rouge-L per stage" in first and first.count("evaluating") == 2

    # rerun: nothing trains and nothing is re-evaluated
    again = run([cli("distill-chain"), config, "--output-dir", out]).stdout
    assert "skipped" in again and "evaluating" not in again
    assert manifest(out)["stages"]["student"]["checkpoint"] == rec_s["checkpoint"]

    # the evaluation set changes: both stages are scored again, nothing trains
    rows = eval_file.read_text().splitlines()
    eval_file.write_text("\n".join(rows[:-1]) + "\n")
    edited = run([cli("distill-chain"), config, "--output-dir", out]).stdout
    assert edited.count("evaluating") == 2 and "student: skipped" in edited
    assert manifest(out)["stages"]["student"]["evaluation"]["sets"]["test"]["examples"] == len(rows) - 1

    # the pretrained teacher is replaced: the change is reported, the student retrains, both re-evaluate
    state = torch.load(teacher, map_location="cpu", weights_only=False)
    state["model"]["decoder.embed_tokens.weight"].mul_(1.01)
    torch.save(state, teacher)
    third = run([cli("distill-chain"), config, "--output-dir", out]).stdout
    assert "changed since the last run" in third and "retrain" in third
    m = manifest(out)
    assert m["stages"]["teacher"]["checkpoint"]["sha256"] == sha256_file(teacher)
    assert m["stages"]["student"]["teachers"][0]["sha256"] == sha256_file(teacher)
    assert third.count("evaluating") == 2


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["stages"][0].update({"args": {"lr": 1}}), "is pretrained: it is not trained, so it takes no args"),
    (lambda c: c["stages"][0].update({"pretrained": "/nonexistent.pt"}), "pretrained checkpoint /nonexistent.pt does not exist"),
    (lambda c: c.update({"evaluate": {"seeds": ["x"]}}), "distill-evaluate rejects the options"),
    (lambda c: c.update({"evaluate": {"json": "a.json"}}), "evaluate: sets --json, which the chain sets itself"),
    (lambda c: c.update({"evaluate": {"top-p": 2.0}}),  # a value, caught before the first stage trains
     "evaluate: distill-evaluate rejects the options: --top-p 2.0: must be in (0, 1]"),
    (lambda c: c.update({"evaluate": {"eval-files": ["nowhere.jsonl"]}}),  # was found after the stages trained
     "nowhere.jsonl does not exist; eval-files are relative to the chain file"),
])
def test_bad_pretrained_or_evaluate(data_bin, teacher_ckpt, tmp_path, edit, message):
    chain = pretrained_chain(data_bin, teacher_ckpt)
    edit(chain)
    assert message in bad(chain, tmp_path)
