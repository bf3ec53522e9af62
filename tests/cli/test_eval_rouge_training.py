"""fairseq-train --eval-rouge: dev Rouge-L is logged at every validation and checkpoint_best.pt is
the checkpoint with the highest one (--best-checkpoint-metric rouge_l --maximize-best-checkpoint-metric)."""
import re

import pytest
import torch

from conftest import train

EVAL_ROUGE = ["--criterion", "cross_entropy", "--eval-rouge", "--eval-rouge-args", '{"max_len_b": 128}',
              "--eval-rouge-max-examples", "12", "--validate-interval-updates", "3", "--save-interval-updates", "3",
              "--best-checkpoint-metric", "rouge_l", "--maximize-best-checkpoint-metric"]


def test_eval_rouge_logs_and_selects_the_best_checkpoint(data_bin, tmp_path):
    proc = train(data_bin, tmp_path, *EVAL_ROUGE, max_update=9)
    log = proc.stdout + proc.stderr
    valid_lines = [line for line in log.splitlines() if "valid on 'valid' subset" in line]
    scores = [float(re.search(r"\| rouge_l ([\d.]+)", line).group(1)) for line in valid_lines]
    updates = [int(re.search(r"num_updates (\d+)", line).group(1)) for line in valid_lines]
    assert updates == [3, 6, 9] and all(0.0 <= s <= 100.0 for s in scores)
    best = torch.load(tmp_path / "checkpoint_best.pt", map_location="cpu", weights_only=False)
    assert best["extra_state"]["val_loss"] == pytest.approx(max(scores), abs=1e-4)  # the metric fairseq kept
    # checkpoint_best holds the weights of the update with the best score
    best_update = updates[scores.index(max(scores))]
    kept = torch.load(tmp_path / f"checkpoint_1_{best_update}.pt", map_location="cpu", weights_only=False)
    assert all(torch.equal(best["model"][k], kept["model"][k]) for k in kept["model"])
    assert "best_rouge_l" in valid_lines[-1]


def test_eval_rouge_rejects_several_valid_subsets(data_bin, tmp_path):
    proc = train(data_bin, tmp_path, *EVAL_ROUGE, "--valid-subset", "valid,test", max_update=1, check=False)
    assert proc.returncode != 0
    assert "--eval-rouge scores one validation subset" in proc.stdout + proc.stderr
