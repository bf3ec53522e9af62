"""A MiniLLM run interrupted inside a collection and resumed through fairseq-train (checkpoint_last.pt)
continues that collection (the saved rollout store), draws the next collection's prompts and LM
batches where it left off, and ends with the same losses and parameters as an uninterrupted run."""
import re

import torch

from conftest import train

# 16 rollouts, minibatches of 8, 2 PPO epochs: updates 1-4 replay collection 1, 5 collects anew;
# the interrupted run stops after update 3, inside collection 1's second pass
ARGS = ["--task", "minillm", "--criterion", "minillm", "--lr", "1e-3", "--lr-scheduler", "fixed",
        "--batch-size", "8", "--num-rollouts", "16", "--rollout-batch-size", "8", "--ppo-epochs", "2",
        "--rollout-max-new-tokens", "8", "--tokens-per-sample", "128", "--lm-batch-size", "4", "--disable-validation"]
TIMING = {"rollout_time", "train_time", "wps", "ups", "wall", "gb_free", "train_wall"}


def per_update(log):
    """Every logged statistic of each update but the timings."""
    rows = {}
    for line in log.splitlines():
        fields = dict(re.findall(r"(\w+)=([-\d.e]+)", line))
        if "train_inner" in line and "num_updates" in fields:
            rows[int(fields["num_updates"])] = {k: v for k, v in fields.items() if k not in TIMING}
    return rows


def test_resume_inside_a_collection_matches_an_uninterrupted_run(data_bin, teacher_ckpt, plain_lm_data, tmp_path):
    args = [*ARGS, "--teacher-path", teacher_ckpt, "--lm-data", plain_lm_data]
    whole, split = tmp_path / "whole", tmp_path / "split"
    a = train(data_bin, whole, *args, max_update=5)
    b1 = train(data_bin, split, *args, max_update=3)
    saved = torch.load(split / "checkpoint_last.pt", map_location="cpu", weights_only=False)["task_state"]
    store = saved["minillm"]["store"]
    assert store["epochs_done"] == 2 and len(store["order"]) == 8 and len(store["rollouts"]["ids"]) == 16
    # 16 prompts and 3 x 4 LM blocks (of 129 tokens) drawn so far, from the first epoch of each
    assert saved["minillm"]["prompt_order"] == {"epoch": 1, "pos": 16, "world": 1}
    assert saved["lm_order"] == {"epoch": 1, "pos": 12, "world": 1}
    b2 = train(data_bin, split, *args, max_update=5)
    log2 = b2.stdout + b2.stderr

    whole_rows = per_update(a.stdout + a.stderr)
    split_rows = {**per_update(b1.stdout + b1.stderr), **per_update(log2)}
    assert sorted(whole_rows) == sorted(split_rows) == list(range(1, 6))
    assert {"loss", "pg_loss", "reg_loss", "pt_loss", "reward", "rev_kl", "clip_frac"} <= set(whole_rows[5])
    assert all(float(row["resp_len"]) > 0 and float(row["reg_loss"]) > 0 for row in whole_rows.values())
    assert whole_rows == split_rows
    assert "resumed collection 1: 16 rollouts, pass 2 of 2, 8 left in it" in log2
    assert "collection 2: 16 rollouts" in log2 and "collection 1: 16 rollouts in" not in log2
    end_a = torch.load(whole / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    end_b = torch.load(split / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    for name, value in end_a["model"].items():
        assert torch.equal(value, end_b["model"][name]), name
    assert end_a["task_state"]["minillm"]["prompt_order"] == end_b["task_state"]["minillm"]["prompt_order"]
    assert end_a["task_state"]["lm_order"] == end_b["task_state"]["lm_order"]
