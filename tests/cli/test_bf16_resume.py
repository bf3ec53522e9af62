"""--bf16 checkpoints hold the fp32 master weights, so that a resumed run continues exactly like an
uninterrupted one (distill_plugins/master_weights.py), through the real distill-train."""
import re

import torch

from conftest import TINY_MODEL, TRAIN_COMMON, cli, run

BF16_SFT = [*TRAIN_COMMON, *TINY_MODEL, "--criterion", "cross_entropy", "--bf16", "--save-interval-updates", "1"]


def train_bf16(data, save_dir, max_update):
    proc = run([cli("distill-train"), data, *BF16_SFT, "--save-dir", save_dir, "--max-update", str(max_update)])
    return proc.stdout + proc.stderr


def losses(log):
    """{update: (loss, gnorm) as logged} of fairseq's per-update lines."""
    found = re.findall(r"train_inner\b.*? loss=([-\d.]+),.*?num_updates=(\d+),.*?gnorm=([-\d.]+)", log)
    return {int(u): (loss, gnorm) for loss, u, gnorm in found}


def test_resumed_bf16_run_continues_exactly(data_bin, tmp_path):
    straight = train_bf16(data_bin, tmp_path / "straight", 4)
    # distill-train imports this package before fairseq_cli.train sets its log format: still fairseq's
    assert " | INFO | fairseq_cli.train | " in straight
    assert not [line for line in straight.splitlines() if line.startswith(("INFO:", "DEBUG:"))]
    first = train_bf16(data_bin, tmp_path / "resumed", 2)
    resumed = train_bf16(data_bin, tmp_path / "resumed", 4)
    assert "restored the fp32 master weights of" in resumed and "@ 2 updates" in resumed
    assert sorted(losses(straight)) == [1, 2, 3, 4] and sorted(losses(resumed)) == [3, 4]
    assert {u: losses(straight)[u] for u in (1, 2)} == losses(first)
    assert {u: losses(straight)[u] for u in (3, 4)} == losses(resumed)

    a = torch.load(tmp_path / "straight" / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    b = torch.load(tmp_path / "resumed" / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    masters_a, masters_b = a["extra_state"]["fp32_master_params"], b["extra_state"]["fp32_master_params"]
    assert all(m.dtype == torch.float32 for m in masters_a) and len(masters_a) == len(masters_b) == 20
    assert all(torch.equal(x, y) for x, y in zip(masters_a, masters_b))
    # the checkpoint's model stays the bf16 model (fairseq stores it as fp32 on the CPU), the masters
    # rounded: what fairseq-generate and export load; the masters carry the bits that it lost
    model = [v for k, v in a["model"].items() if k not in ("decoder.version", "decoder.output_projection.weight")]
    assert [v.shape for v in model] == [m.shape for m in masters_a]
    assert all(torch.equal(m.to(torch.bfloat16).float(), v) for m, v in zip(masters_a, model))
    assert any(not torch.equal(m, v) for m, v in zip(masters_a, model))


def test_masters_of_a_changed_model_are_not_restored(data_bin, tmp_path):
    train_bf16(data_bin, tmp_path, 2)
    path = tmp_path / "checkpoint_last.pt"
    state = torch.load(path, map_location="cpu", weights_only=False)
    state["model"]["decoder.layer_norm.weight"].mul_(2)  # edited after saving
    torch.save(state, path)
    log = train_bf16(data_bin, tmp_path, 3)
    assert "fp32 master weights are not its model's weights" in log and "restored the fp32" not in log
    assert sorted(losses(log)) == [3]
