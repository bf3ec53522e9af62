"""MiniLLM on 2 CPU workers, interrupted inside a collection and resumed on 2 workers: every worker's
rollout store is in the checkpoint, each worker finishes its own saved collection and the run
completes (the packed rollouts travel in fairseq's broadcast of the checkpoint, which takes neither
int16 on gloo nor on NCCL)."""
import torch

from dist_helpers import train_two

# 16 rollouts split 8/8, minibatches of 4 (dist_helpers.EXACT), 2 PPO epochs: 4 updates a collection
ARGS = ["--task", "minillm", "--criterion", "minillm", "--lr", "1e-3", "--lr-scheduler", "fixed",
        "--num-rollouts", "16", "--rollout-batch-size", "8", "--ppo-epochs", "2",
        "--rollout-max-new-tokens", "8", "--tokens-per-sample", "128", "--disable-validation"]


def test_two_workers_resume_inside_a_collection(data_bin, teacher_ckpt, tmp_path):
    args = [*ARGS, "--teacher-path", teacher_ckpt]
    train_two(data_bin, tmp_path, *args, max_update=2)
    state = torch.load(tmp_path / "checkpoint_last.pt", map_location="cpu", weights_only=False)["task_state"]
    assert state["minillm"]["world"] == 2 and state["minillm"]["store"]["epochs_done"] == 1
    assert state["workers"][0] is None  # rank 0's store is the checkpoint's own (stored once)
    saved = [state["minillm"]] + [w["minillm"] for w in state["workers"][1:]]  # every worker's own, by rank
    assert [w["rank"] for w in saved] == [0, 1] and [w["store"]["epochs_done"] for w in saved] == [1, 1]
    proc = train_two(data_bin, tmp_path, *args, max_update=3)
    log = proc.stdout + proc.stderr
    assert "training on 2 devices" in log and "num_updates=3" in log
    assert "resumed collection 1: 8 rollouts, pass 1 of 2, 0 left in it" in log  # rank 0 (other ranks log warnings only)
    end = torch.load(tmp_path / "checkpoint_last.pt", map_location="cpu", weights_only=False)["task_state"]
    # both workers finished their saved collection (a worker that started anew would be at collection 2, pass 1)
    for m in [end["minillm"]] + [w["minillm"] for w in end["workers"][1:]]:
        assert m["collections"] == 1 and m["store"]["epochs_done"] == 2 and m["prompt_order"]["pos"] == 8, m
