"""distill-chain end to end through the real CLIs (distill-chain -> fairseq-train) on the tiny data:
a three-stage chain, resume after a kill, invalidation by an edited setting or a replaced
checkpoint, dry run, and bad chain files."""
import json
import os
import shutil
import signal
import subprocess
import time

import pytest
import torch
import yaml

from chain_helpers import DEFAULTS, bad, manifest, write_chain
from conftest import cli, run
from distill_plugins.cli.chain import main as chain_main
from distill_plugins.teacher import sha256_file

def chain_dict(data, assistant_args=None, student=None):
    """teacher (SFT, dim 48) -> assistant (kd, dim 40) -> student (dim 32, from teacher and assistant)."""
    return {
        "name": "tiny",
        "data": data,
        "defaults": dict(DEFAULTS),
        "stages": [
            {"name": "teacher", "arch": "kd_gpt2_tiny", "args": {"criterion": "cross_entropy", "decoder-embed-dim": 48}},
            {"name": "assistant", "arch": "kd_gpt2_tiny", "teacher": "teacher",
             "args": {"criterion": "kd", "decoder-embed-dim": 40, **(assistant_args or {})}},
            student or {"name": "student", "arch": "kd_gpt2_tiny", "teacher": ["teacher", "assistant"],
                        "args": {"criterion": "multi_teacher_kd", "teacher-weights": [0.3, 0.7],
                                 "teacher-divergences": "kd,skew_kl", "decoder-embed-dim": 32}},
        ],
    }


def fingerprint_files(out, stages=("teacher", "assistant", "student")):
    """(sha256, mtime_ns) of each stage's checkpoint_best.pt."""
    res = {}
    for s in stages:
        p = os.path.join(out, s, "checkpoint_best.pt")
        res[s] = (sha256_file(p), os.stat(p).st_mtime_ns)
    return res


@pytest.fixture(scope="module")
def finished_chain(data_bin, tmp_path_factory):
    d = tmp_path_factory.mktemp("chain")
    config = write_chain(d / "chain.yaml", chain_dict(data_bin))
    out = str(d / "out")
    proc = run([cli("distill-chain"), config, "--output-dir", out])
    return {"dir": d, "config": config, "out": out, "log": proc.stdout + proc.stderr}


def test_three_stage_chain_end_to_end(finished_chain):
    out, log = finished_chain["out"], finished_chain["log"]
    m = manifest(out)
    assert list(m["stages"]) == ["teacher", "assistant", "student"]
    for name, rec in m["stages"].items():
        ckpt = os.path.join(out, rec["checkpoint"]["path"])
        assert rec["status"] == "done" and rec["checkpoint"]["path"] == f"{name}/checkpoint_best.pt"
        assert rec["checkpoint"]["sha256"] == sha256_file(ckpt)
        assert rec["checkpoints"]["checkpoint_last.pt"]["sha256"] == sha256_file(os.path.join(out, name, "checkpoint_last.pt"))
        assert rec["wall_time_s"] > 0 and rec["attempts"] == 1 and len(rec["fingerprint"]) == 64
        assert rec["metrics"]["num_updates"] == 6 and rec["metrics"]["valid"]["loss"] > 0
        assert rec["metrics"]["best_val_loss"] == pytest.approx(rec["metrics"]["valid"]["loss"], abs=1e-3)
        assert f"--save-dir {os.path.join(out, name)}" in rec["command"]
    p = {k: m["stages"][k]["parameters"] for k in m["stages"]}
    assert p["teacher"] > p["assistant"] > p["student"]
    # each stage's selected checkpoint was the next stages' teacher (recorded by the task itself)
    sha = {k: m["stages"][k]["checkpoint"]["sha256"] for k in m["stages"]}
    load = lambda s: torch.load(os.path.join(out, s, "checkpoint_best.pt"), map_location="cpu", weights_only=False)  # noqa: E731
    assert [t["sha256"] for t in load("assistant")["task_state"]["teachers"]] == [sha["teacher"]]
    assert [t["sha256"] for t in load("student")["task_state"]["teachers"]] == [sha["teacher"], sha["assistant"]]
    assert load("teacher")["task_state"]["teachers"] == []
    assert [t["stage"] for t in m["stages"]["student"]["teachers"]] == ["teacher", "assistant"]
    # multi-teacher criterion: per-teacher terms logged, kd_loss = 0.3 kd_loss_0 + 0.7 kd_loss_1
    valid = m["stages"]["student"]["metrics"]["valid"]
    assert valid["kd_loss"] == pytest.approx(0.3 * valid["kd_loss_0"] + 0.7 * valid["kd_loss_1"], abs=2e-3)
    # progress output per stage
    for i, s in enumerate(["teacher", "assistant", "student"], 1):
        assert f"[{i}/3] {s}: train" in log and f"[{i}/3] {s}: done in" in log
        assert f"  {s}: update 6 | valid loss" in log


def test_edit_retrains_that_stage_and_successors_only(finished_chain, tmp_path):
    out = str(tmp_path / "out")
    shutil.copytree(finished_chain["out"], out)  # moved chain directory: nothing needs retraining for that
    before = fingerprint_files(out)
    config = write_chain(tmp_path / "chain.yaml", chain_dict(yaml.safe_load(open(finished_chain["config"]))["data"],
                                                            assistant_args={"lr": "2e-3"}))
    manifest_bytes = open(os.path.join(out, "manifest.json"), "rb").read()
    dry = run([cli("distill-chain"), config, "--output-dir", out, "--dry-run"]).stdout
    assert open(os.path.join(out, "manifest.json"), "rb").read() == manifest_bytes  # dry run writes nothing
    assert fingerprint_files(out) == before

    log = run([cli("distill-chain"), config, "--output-dir", out]).stdout
    plan_line = log.index("assistant  retrain  settings changed: --lr 3e-3 -> 2e-3")
    assert "student    retrain  its teacher 'assistant' is (re)trained" in log
    assert plan_line < log.index("[2/3] assistant: retrain")  # said before running
    assert "[1/3] teacher: skipped (done, checkpoint_best.pt verified" in log
    after = fingerprint_files(out)
    assert after["teacher"] == before["teacher"]  # same hash, same mtime: not retrained
    assert after["assistant"][0] != before["assistant"][0] and after["student"][0] != before["student"][0]
    assert os.path.isfile(os.path.join(out, "assistant.stale", "checkpoint_best.pt"))
    m = manifest(out)
    assert m["stages"]["assistant"]["settings"]["args"]["lr"] == "2e-3"
    assert m["stages"]["student"]["teachers"][1]["sha256"] == after["assistant"][0]
    # the dry run printed exactly the commands that ran
    for stage in ("assistant", "student"):
        assert m["stages"][stage]["command"] in dry.splitlines()


def test_selecting_the_other_checkpoint_retrains_only_the_students(finished_chain, tmp_path):
    """checkpoint: best -> last on a finished stage records its checkpoint_last.pt (no retraining);
    only the stages it teaches retrain (their teacher's checkpoint is another file)."""
    out = str(tmp_path / "out")
    shutil.copytree(finished_chain["out"], out)
    before = fingerprint_files(out)
    data = yaml.safe_load(open(finished_chain["config"]))["data"]
    chain = chain_dict(data)
    chain["stages"][2]["checkpoint"] = "last"  # the student teaches no one: nothing trains at all
    config = write_chain(tmp_path / "chain.yaml", chain)
    log = run([cli("distill-chain"), config, "--output-dir", out]).stdout
    assert "student    reselect  checkpoint best -> last: records checkpoint_last.pt of its finished training" in log
    assert "[1/3] teacher: skipped" in log and "[2/3] assistant: skipped" in log and "fairseq" not in log.lower()
    assert fingerprint_files(out) == before
    rec = manifest(out)["stages"]["student"]
    last = os.path.join(out, "student", "checkpoint_last.pt")
    assert rec["checkpoint"] == {"path": "student/checkpoint_last.pt", "sha256": sha256_file(last)}
    assert rec["settings"]["checkpoint"] == "last" and rec["status"] == "done"
    again = run([cli("distill-chain"), config, "--output-dir", out]).stdout
    assert "[3/3] student: skipped (done, checkpoint_last.pt verified" in again

    chain["stages"][0]["checkpoint"] = "last"  # the teacher: its students' teacher changes
    config = write_chain(tmp_path / "chain2.yaml", chain)
    dry = run([cli("distill-chain"), config, "--output-dir", out, "--dry-run"]).stdout
    assert "teacher    reselect  checkpoint best -> last" in dry
    rec = manifest(out)["stages"]["teacher"]
    if rec["checkpoints"]["checkpoint_last.pt"]["sha256"] != rec["checkpoint"]["sha256"]:
        assert "assistant  retrain  teacher 'teacher' checkpoint differs from the one it was trained with" in dry


def test_replaced_teacher_checkpoint_is_detected(finished_chain, tmp_path):
    out = str(tmp_path / "out")
    shutil.copytree(finished_chain["out"], out)
    teacher = os.path.join(out, "teacher", "checkpoint_best.pt")
    recorded = manifest(out)["stages"]["teacher"]["checkpoint"]["sha256"]
    shutil.copyfile(os.path.join(out, "assistant", "checkpoint_best.pt"), teacher)  # behind the chain's back
    proc = run([cli("distill-chain"), finished_chain["config"], "--output-dir", out, "--dry-run"])
    assert (f"teacher    retrain  checkpoint_best.pt was replaced outside the chain (sha256 recorded "
            f"{recorded[:12]}, file now {sha256_file(teacher)[:12]})") in proc.stdout
    assert "assistant  retrain  its teacher 'teacher' is (re)trained" in proc.stdout
    assert "student    retrain  its teachers 'teacher', 'assistant' are (re)trained" in proc.stdout


def test_interrupted_stage_resumes_without_retraining_finished_ones(data_bin, tmp_path):
    chain = chain_dict(data_bin, assistant_args={"max-update": 60, "save-interval-updates": 10,
                                                 "keep-interval-updates": 1})
    config = write_chain(tmp_path / "chain.yaml", chain)
    out = str(tmp_path / "out")
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    first_log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen([cli("distill-chain"), config, "--output-dir", out], stdout=first_log,
                            stderr=subprocess.STDOUT, env=env, start_new_session=True)
    train_log = os.path.join(out, "assistant", "train.log")
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            if os.path.isfile(train_log) and "Saved checkpoint" in open(train_log).read():
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the chain ended before stage 2 saved a checkpoint"
        assert os.path.isfile(os.path.join(out, "assistant", "checkpoint_last.pt"))
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the chain and its fairseq-train, mid-training of stage 2
        proc.wait()
    m = manifest(out)
    assert m["stages"]["teacher"]["status"] == "done" and m["stages"]["assistant"]["status"] == "running"
    teacher_before = fingerprint_files(out, ["teacher"])
    killed_at = torch.load(os.path.join(out, "assistant", "checkpoint_last.pt"), map_location="cpu",
                           weights_only=False)["optimizer_history"][-1]["num_updates"]
    assert 10 <= killed_at < 60

    log = run([cli("distill-chain"), config, "--output-dir", out]).stdout
    assert "[1/3] teacher: skipped" in log
    assert f"assistant  resume   running; resumes from checkpoint_last.pt (update {killed_at})" in log
    assert f"@ {killed_at} updates" in log  # fairseq's "Loaded checkpoint ..." line
    assert fingerprint_files(out, ["teacher"]) == teacher_before
    m = manifest(out)
    assert all(m["stages"][s]["status"] == "done" for s in ("teacher", "assistant", "student"))
    assert m["stages"]["teacher"]["attempts"] == 1 and m["stages"]["assistant"]["attempts"] == 2
    assert m["stages"]["assistant"]["metrics"]["num_updates"] == 60
    assert "Loaded checkpoint" in open(train_log).read()


# -- bad input ---------------------------------------------------------------------------------------
def test_cycle_is_an_error(data_bin, tmp_path):
    chain = chain_dict(data_bin)
    chain["stages"][0]["teacher"] = "student"
    chain["stages"][0]["args"]["criterion"] = "kd"
    msg = bad(chain, tmp_path)
    assert msg.startswith("stages form a cycle: ") and "teacher -> student" in msg
    chain = chain_dict(data_bin)
    chain["stages"][1]["teacher"] = "assistant"
    assert "assistant -> assistant" in bad(chain, tmp_path)


def test_missing_stage_reference_is_an_error(data_bin, tmp_path):
    chain = chain_dict(data_bin)
    chain["stages"][1]["teacher"] = "techer"
    assert bad(chain, tmp_path) == ("stage 'assistant' names teacher 'techer', which is not a stage; "
                                    "stages: teacher, assistant, student")


def test_unknown_criterion_is_an_error(data_bin, tmp_path):
    chain = chain_dict(data_bin)
    chain["stages"][1]["args"]["criterion"] = "kd_bogus"
    msg = bad(chain, tmp_path)
    assert msg.startswith("stage 'assistant': unknown criterion 'kd_bogus'; use cross_entropy or one of ")
    assert "multi_teacher_kd" in msg and "skew_kl" in msg


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["stages"][1].pop("teacher"), "criterion kd distills from a teacher"),
    (lambda c: c["stages"][1]["args"].update({"save-dir": "x"}), "sets --save-dir"),
    (lambda c: c["stages"][2]["args"].update({"teacher-weights": "1"}), "gives 1 weight(s) for 2 teacher(s)"),
    (lambda c: c.update({"stage": []}), "unknown key(s) stage"),
    (lambda c: c["stages"][2].update({"name": "teacher"}), "two stages are named 'teacher'"),
    # names of the chain's own files: a stage 'a.stale' was deleted when stage 'a' retrained
    (lambda c: c["stages"][2].update({"name": "assistant.stale"}), "may not be named manifest.json or end in .stale"),
    (lambda c: c["stages"][2].update({"name": "manifest.json"}), "may not be named manifest.json or end in .stale"),
    (lambda c: c["stages"][1].update({"init": os.path.join(c["data"], "dict.src.txt")}),  # beside its arch:
     "dict.src.txt is not a fairseq checkpoint (no readable model config"),
    (lambda c: c.update({"data": "/nonexistent"}), "has no dict.src.txt"),
    # option names, types and values: fairseq-train's parser, the task's and the criterion's checks
    (lambda c: c["stages"][1]["args"].update({"skew-alpa": 0.1}),
     "stage 'assistant': fairseq-train rejects its options: unrecognized arguments: --skew-alpa 0.1"),
    (lambda c: c["stages"][1]["args"].update({"kd-ratio": "half"}),
     "stage 'assistant': fairseq-train rejects its options: argument --kd-ratio: invalid float value: 'half'"),
    (lambda c: c["defaults"].update({"optimizer": "adamw"}), "stage 'teacher': fairseq-train rejects its options: "
                                                           "argument --optimizer: invalid choice: 'adamw'"),
    (lambda c: c["stages"][1]["args"].update({"kd-ratio": 1.5}), "stage 'assistant': --kd-ratio must be in [0, 1], got 1.5"),
    (lambda c: c["stages"][2]["args"].update({"temperature": 0}), "stage 'student': --temperature must be > 0, got 0.0"),
    (lambda c: c["stages"][1]["args"].update({"student-data-mode": "mixed", "student-data-lambda": 2}),
     "stage 'assistant': --student-data-lambda must be in [0, 1]"),
    # the teachers a stage's criterion takes (were found only after the earlier stages had trained)
    (lambda c: c["stages"][1]["args"].update({"criterion": "cross_entropy"}),
     "stage 'assistant': --criterion cross_entropy does not use a teacher"),
    (lambda c: c["stages"][2].update({"args": {"criterion": "kd", "decoder-embed-dim": 32}}),
     "stage 'student': --criterion kd takes one teacher, --teacher-path gives 2"),
])
def test_other_bad_chain_files(data_bin, tmp_path, edit, message):
    chain = chain_dict(data_bin)
    edit(chain)
    assert message in bad(chain, tmp_path)


def test_output_dir_that_is_a_file_is_refused(data_bin, tmp_path):
    from distill_plugins.errors import DistillError

    config = write_chain(tmp_path / "chain.yaml", chain_dict(data_bin))
    (tmp_path / "out").write_text("not a directory")
    with pytest.raises(DistillError, match="output directory .*out is a file; pass another --output-dir"):
        chain_main([config, "--output-dir", str(tmp_path / "out")])
    assert (tmp_path / "out").read_text() == "not a directory"


def test_cli_error_is_one_line_with_nonzero_exit(data_bin, tmp_path):
    chain = chain_dict(data_bin)
    chain["stages"][1]["teacher"] = "nobody"
    config = write_chain(tmp_path / "chain.yaml", chain)
    proc = run([cli("distill-chain"), config, "--output-dir", tmp_path / "out"], check=False)
    assert proc.returncode == 1 and not (tmp_path / "out").exists()
    errors = [ln for ln in proc.stderr.splitlines() if "error" in ln.lower()]
    assert errors == ["fairseq-distill: error: stage 'assistant' names teacher 'nobody', which is not a stage; "
                      "stages: teacher, assistant, student"]


def test_assistant_larger_than_teacher_is_a_warning(data_bin, tmp_path, capsys):
    chain = chain_dict(data_bin, assistant_args={"decoder-embed-dim": 64})
    config = write_chain(tmp_path / "chain.yaml", chain)
    chain_main([config, "--output-dir", str(tmp_path / "out"), "--dry-run"])  # no error
    out, err = capsys.readouterr()
    assert "distill-chain: warning: stage 'assistant' (" in err and "is larger than its teacher 'teacher' (" in err
    assert "--decoder-embed-dim 64" in out and not (tmp_path / "out").exists()


def test_plan_for_started_stages(finished_chain, tmp_path, capsys):
    """A stage recorded as started resumes from a readable checkpoint_last.pt and starts over from a
    truncated one (killed while fairseq copied it)."""
    out = str(tmp_path / "out")
    shutil.copytree(finished_chain["out"], out)
    m = manifest(out)
    m["stages"]["assistant"]["status"] = "interrupted"
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(m, f)
    chain_main([finished_chain["config"], "--output-dir", out, "--dry-run"])
    plan = capsys.readouterr().out
    assert "teacher    skip" in plan and "assistant  resume   interrupted; resumes from checkpoint_last.pt (update 6)" in plan
    last = os.path.join(out, "assistant", "checkpoint_last.pt")
    with open(last, "r+b") as f:
        f.truncate(os.path.getsize(last) // 2)
    chain_main([finished_chain["config"], "--output-dir", out, "--dry-run"])
    plan = capsys.readouterr().out
    assert "assistant  retrain  interrupted, and its checkpoint_last.pt is unreadable" in plan
    assert "student    retrain  its teacher 'assistant' is (re)trained" in plan


def test_output_dir_inside_the_data_directory_is_refused(data_bin, tmp_path):
    """Before: accepted, and every rerun retrained every stage (the data's fingerprint covered the chain's own files)."""
    from distill_plugins.errors import DistillError

    config = write_chain(tmp_path / "chain.yaml", chain_dict(data_bin))
    for out in (data_bin, os.path.join(data_bin, "chain")):
        with pytest.raises(DistillError, match="is inside the data directory .*pass an --output-dir outside it"):
            chain_main([config, "--output-dir", out])
    assert not os.path.exists(os.path.join(data_bin, "chain"))


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["stages"][2].update({"teacher": ["assistant", "assistant"]}), "teacher lists a stage twice"),
    (lambda c: c["stages"][1].update({"teachr": "teacher"}), "stage 'assistant' has unknown key(s) teachr"),
    (lambda c: c["stages"][0].update({"checkpoint": "final"}), "checkpoint must be best or last, got 'final'"),
    (lambda c: c.update({"evaluate": {"json": "x.json"}}), "evaluate: sets --json, which the chain sets itself"),
])
def test_bad_stage_keys(data_bin, tmp_path, monkeypatch, edit, message):
    monkeypatch.chdir(tmp_path)  # a mutant that lets evaluate: json through writes x.json to the cwd
    chain = chain_dict(data_bin)
    edit(chain)
    assert message in bad(chain, tmp_path)
