"""The chain's fingerprint covers the content of everything a stage reads: files in subdirectories
of the data directory (--teacher-data) and the paths of --lm-data / --teacher-data / --teacher-cache."""
import os
import shutil

from chain_helpers import DEFAULTS, write_chain
from conftest import cli, run
from distill_plugins.chain.manifest import sha256_dir, stage_data_sha256


def test_sha256_dir_covers_subdirectories_but_not_scratch(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.bin").write_bytes(b"a")
    (tmp_path / "sub" / "b.bin").write_bytes(b"b")
    first = sha256_dir(tmp_path)
    (tmp_path / ".staged-x").mkdir()  # another command's scratch directory
    (tmp_path / ".staged-x" / "half").write_bytes(b"?")
    assert sha256_dir(tmp_path) == first
    # what training never reads: test.jsonl (distill-evaluate's), logs (each retrained everything)
    (tmp_path / "test.jsonl").write_text("{}\n")
    (tmp_path / "preprocess.log").write_text("log")
    assert sha256_dir(tmp_path) == first
    (tmp_path / "valid.jsonl").write_text("{}\n")  # read: --eval-rouge's references
    assert sha256_dir(tmp_path) != first
    os.remove(tmp_path / "valid.jsonl")
    (tmp_path / "prepare_report.json").write_text("{}")  # read: its --max-total-tokens cuts the examples
    assert sha256_dir(tmp_path) != first
    os.remove(tmp_path / "prepare_report.json")
    (tmp_path / "sub" / "b.bin").write_bytes(b"B")
    assert sha256_dir(tmp_path) != first


def test_input_options_enter_the_stage_data_hash(tmp_path):
    lm = tmp_path / "lm"
    lm.mkdir()
    (lm / "train.bin").write_bytes(b"1")
    assert stage_data_sha256("d" * 64, {"lr": "3e-3"}) == "d" * 64  # no other inputs: the data dir's own
    with_lm = stage_data_sha256("d" * 64, {"lm-data": str(lm)})
    assert with_lm != "d" * 64
    (lm / "train.bin").write_bytes(b"2")  # re-prepared in place: same path, new content
    assert stage_data_sha256("d" * 64, {"lm-data": str(lm)}) != with_lm
    cache = tmp_path / "c1"
    cache.mkdir()
    both = stage_data_sha256("d" * 64, {"teacher-cache": f"{cache},{lm}"})
    (cache / "cache.json").write_text("{}")
    assert stage_data_sha256("d" * 64, {"teacher-cache": f"{cache},{lm}"}) != both


def test_a_changed_file_in_a_data_subdirectory_retrains(data_bin, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(data_bin, data)
    (data / "teacher").mkdir()
    (data / "teacher" / "dict.txt").write_text("x 1\n")
    chain = {"name": "one", "data": str(data), "defaults": {**DEFAULTS, "max-update": 2},
             "stages": [{"name": "sft", "arch": "kd_gpt2_tiny", "args": {"criterion": "cross_entropy",
                                                                         "decoder-embed-dim": 32}}]}
    config = write_chain(tmp_path / "chain.yaml", chain)
    out = str(tmp_path / "out")
    run([cli("distill-chain"), config, "--output-dir", out])
    assert "sft  skip" in run([cli("distill-chain"), config, "--output-dir", out, "--dry-run"]).stdout
    (data / "teacher" / "dict.txt").write_text("y 1\n")
    plan = run([cli("distill-chain"), config, "--output-dir", out, "--dry-run"]).stdout
    assert "sft  retrain  the content of its data changed" in plan, plan
    assert os.path.isfile(os.path.join(out, "sft", "checkpoint_best.pt"))


def test_the_init_checkpoints_content_enters_the_fingerprint():
    from distill_plugins.chain.command import fingerprint

    stage = {"arch": "a", "args": {}, "teachers": [], "checkpoint": "best"}
    assert fingerprint(stage, [], "1" * 64, "d") != fingerprint(stage, [], "2" * 64, "d")
