"""Each --student-data-mode through the real fairseq-train: data-source metrics in the log, decisions
that follow the rule, tau adapted at validation, resume, and bad input caught before training."""
import json
import math
import os

import pytest
import torch

from conftest import train
from distill_plugins.generated import schedule

GEN = ["--gen-max-new-tokens", "6", "--replay-buffer-size", "16"]


def trace(prefix, rank=0):
    with open(f"{prefix}.rank{rank}.jsonl") as f:
        return [json.loads(line) for line in f]


def inner_logs(log):
    """{metric: value} of every train_inner line."""
    rows = []
    for line in log.splitlines():
        if "| train_inner |" in line:
            fields = line.split("|")[-1].split(",")
            rows.append(dict(f.strip().split("=", 1) for f in fields if "=" in f))
    return rows


def test_always_imitkd(data_bin, teacher_ckpt, tmp_path):
    """ImitKD: every update generates, pushes, and trains FKL on a buffer batch."""
    proc = train(data_bin, tmp_path, "--criterion", "kd", "--kd-ratio", "1.0", "--teacher-path", teacher_ckpt,
                 "--student-data-mode", "always", *GEN, "--student-data-trace", tmp_path / "t", max_update=2)
    rows = inner_logs(proc.stdout + proc.stderr)
    assert len(rows) == 2
    assert all(r["src_gen"] == "1" and r["src_gt"] == "0" and float(r["gen_s"]) > 0 for r in rows)
    assert all(0 < float(r["gen_tok"]) <= 7 * float(r["gen_seqs"]) for r in rows)  # <= 6 new tokens (+EOS) a row
    assert float(rows[1]["buf"]) > float(rows[0]["buf"]) > 0
    steps = trace(tmp_path / "t")
    assert [s["source"] for s in steps] == [schedule.GENERATE_REPLAY] * 2


def test_mixed_gkd_follows_lambda(data_bin, teacher_ckpt, tmp_path):
    proc = train(data_bin, tmp_path, "--criterion", "js", "--js-beta", "0.9", "--kd-ratio", "1.0",
                 "--teacher-path", teacher_ckpt, "--student-data-mode", "mixed", "--student-data-lambda", "0.6",
                 *GEN, "--student-data-trace", tmp_path / "t", max_update=3)
    rows = inner_logs(proc.stdout + proc.stderr)
    steps = trace(tmp_path / "t")
    assert len(steps) == len(rows) == 3
    # lambda 0.6, not GKD's 0.5: one of the three draws lies between them, so the option must reach the rule
    assert any(0.5 <= s["r"] < 0.6 for s in steps)
    for s, row in zip(steps, rows):
        assert s["r"] == schedule.decision_random(1, s["update"], 0)
        expected = schedule.GENERATE_REPLAY if s["r"] < 0.6 else schedule.GROUND_TRUTH
        assert s["source"] == expected
        assert row["src_gen"] == ("1" if expected == schedule.GENERATE_REPLAY else "0")
        assert row["src_gt"] == ("0" if expected == schedule.GENERATE_REPLAY else "1")


def test_adaptive_distillm_then_resume(data_bin, teacher_ckpt, tmp_path):
    args = ["--criterion", "skew_kl", "--kd-ratio", "1.0", "--teacher-path", teacher_ckpt,
            "--student-data-mode", "adaptive", "--adaptive-tau-init", "0.6", *GEN, "--replay-buffer-size", "12",
            "--validate-interval-updates", "2", "--student-data-trace", tmp_path / "t"]
    proc = train(data_bin, tmp_path, *args, max_update=4)
    log = proc.stdout + proc.stderr
    rows = inner_logs(log)
    events = trace(tmp_path / "t")
    steps = [e for e in events if "update" in e]
    assert events[0]["event"] == "initial_dev_loss" and events[0]["dev_loss"] > 0
    assert len(steps) == len(rows) == 4
    fill = 0
    for s, row in zip(steps, rows):
        assert s["s"] == pytest.approx(schedule.replay_share(s["tau"], s["update"] + 1, 4, "decreasing"))
        full = fill >= 12
        assert s["source"] == schedule.choose_source("adaptive", s["r"], tau=s["tau"], s=s["s"], buffer_full=full)
        fill = s["fill"]
        src = {schedule.GENERATE: "src_gen", schedule.REPLAY: "src_buf", schedule.GROUND_TRUTH: "src_gt"}[s["source"]]
        assert row[src] == "1" and float(row["tau"]) == pytest.approx(s["tau"])
    # tau adapts on fairseq's all-reduced dev CE (base 2 in the log, nats here)
    valids = [e for e in events if e.get("event") == "valid"]
    logged = [float(line.split("| nll_loss ")[1].split()[0]) for line in log.splitlines() if "valid on 'valid'" in line]
    assert len(valids) == len(logged) == 2
    prev = events[0]["dev_loss"]
    tau = 0.6
    for v, bits in zip(valids, logged):
        assert v["dev_loss"] == pytest.approx(bits * math.log(2), abs=2e-3)
        if v["dev_loss"] >= prev + 0.1:
            tau, prev = min(tau + 0.1, 1.0), v["dev_loss"]
        assert v["tau"] == pytest.approx(tau)
    state = torch.load(tmp_path / "checkpoint_last.pt", map_location="cpu", weights_only=False)["task_state"]
    assert state["student_data"]["tau"] == pytest.approx(tau)
    assert state["student_data"]["prev_loss"] == pytest.approx(prev)
    assert state["student_data"]["buffer_fill"] == steps[-1]["fill"]

    # resume: tau, the reference loss and the buffer come back (no new initial measurement)
    proc = train(data_bin, tmp_path, *args, max_update=6)
    log = proc.stdout + proc.stderr
    assert f"resumed with tau={tau}" in log and f"replay buffer restored with {steps[-1]['fill']} sequences" in log
    later = trace(tmp_path / "t")[len(events):]
    assert not any(e.get("event") == "initial_dev_loss" for e in later)
    resumed = [e for e in later if "update" in e]
    assert [e["update"] for e in resumed] == [4, 5] and resumed[0]["tau"] == pytest.approx(tau)


@pytest.mark.parametrize("extra,message", [
    (["--student-data-mode", "mixed", "--student-data-lambda", "1.5"], "--student-data-lambda must be in [0, 1]"),
    (["--student-data-mode", "adaptive", "--gen-max-new-tokens", "4000"], "does not fit the model's 512 positions"),
])
def test_bad_input_stops_before_training(extra, message, data_bin, teacher_ckpt, tmp_path):
    proc = train(data_bin, tmp_path, "--criterion", "kd", "--teacher-path", teacher_ckpt, *extra,
                 max_update=2, check=False)
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if "fairseq-distill: error" in ln]
    assert len(lines) == 1 and message in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not os.path.exists(tmp_path / "checkpoint_last.pt")
