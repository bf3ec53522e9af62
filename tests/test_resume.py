"""The checkpoint a resumed run reads its task state from is the one fairseq-train restores, and
every worker continues its own --lm-data share."""
import os
from types import SimpleNamespace

import torch

import distill_plugins.data.sharded_order as sharded_order
import distill_plugins.tasks.instruction_distillation as task_module
from distill_plugins.resume import restore_path, restored_task_state
from distill_plugins.tasks.instruction_distillation import InstructionDistillationConfig, InstructionDistillationTask


def cfg(tmp_path, **kw):
    base = dict(save_dir=str(tmp_path), restore_file="checkpoint_last.pt", checkpoint_suffix="", continue_once=None,
                load_checkpoint_on_all_dp_ranks=False, ddp_backend="pytorch_ddp", use_sharded_state=False)
    return SimpleNamespace(**{**base, **kw})


def test_restore_path_follows_fairseqs_rules(tmp_path):
    assert restore_path(cfg(tmp_path)) == os.path.join(tmp_path, "checkpoint_last.pt")
    assert restore_path(cfg(tmp_path, checkpoint_suffix="_s")) == os.path.join(tmp_path, "checkpoint_last_s.pt")
    sharded = cfg(tmp_path, ddp_backend="fully_sharded", use_sharded_state=True)
    assert restore_path(sharded, rank=1) == os.path.join(tmp_path, "checkpoint_last-shard1.pt")
    assert restore_path(cfg(tmp_path, restore_file="/x/ck.pt", checkpoint_suffix="_s")) == "/x/ck_s.pt"
    # --continue-once only on a first launch (no checkpoint_last yet)
    once = cfg(tmp_path, continue_once="/x/start.pt")
    assert restore_path(once) == "/x/start.pt"
    (tmp_path / "checkpoint_last.pt").write_bytes(b"")
    assert restore_path(once) == os.path.join(tmp_path, "checkpoint_last.pt")


def test_task_state_of_a_suffixed_checkpoint_is_restored(tmp_path):
    torch.save({"task_state": {"marker": 7}}, tmp_path / "checkpoint_last_s.pt")
    torch.save({"task_state": {"marker": 1}}, tmp_path / "checkpoint_last.pt")  # another run's: not read
    assert restored_task_state(cfg(tmp_path, checkpoint_suffix="_s"), update_num=3) == {"marker": 7}
    assert restored_task_state(cfg(tmp_path, checkpoint_suffix="_s"), update_num=0) == {}


def test_each_worker_restores_its_own_lm_order(data_bin, plain_lm_data, monkeypatch):
    for module in (task_module, sharded_order):
        monkeypatch.setattr(module, "rank_and_world", lambda: (1, 2))
    task = InstructionDistillationTask.setup_task(
        InstructionDistillationConfig(data=data_bin, lm_data=plain_lm_data, seed=1, tokens_per_sample=128))
    task.load_lm_corpus().batch(3)
    assert task.worker_state()["lm_order"] == {"epoch": 1, "pos": 3, "world": 2}
    saved = {"lm_order": {"epoch": 1, "pos": 5, "world": 2},  # rank 0's position
             "workers": [None, {"lm_order": {"epoch": 2, "pos": 1, "world": 2}}]}  # rank 1's own
    monkeypatch.setattr(task_module, "restored_task_state", lambda cfg, update_num: saved)
    monkeypatch.setattr(task, "load_state_dict", lambda state: None)
    task.restored_state = None
    task.restore_training_state(update_num=4)
    assert task.lm_corpus.order.state_dict() == {"epoch": 2, "pos": 1, "world": 2}


def test_resume_with_another_world_size_uses_the_checkpoints_own_state(monkeypatch):
    """a worker's own saved state only when the worker count is the checkpoint's; else rank 0's"""
    from distill_plugins.tasks import instruction_distillation as task_module

    saved = {"lm_order": {"epoch": 1, "pos": 5, "world": 2},
             "workers": [None, {"lm_order": {"epoch": 2, "pos": 1, "world": 2}}]}
    me = SimpleNamespace(restored_state=saved)
    own = task_module.InstructionDistillationTask.own_restored_state
    monkeypatch.setattr(task_module, "rank_and_world", lambda: (1, 2))
    assert own(me, "lm_order") == {"epoch": 2, "pos": 1, "world": 2}
    monkeypatch.setattr(task_module, "rank_and_world", lambda: (1, 3))
    assert own(me, "lm_order") == saved["lm_order"]


def test_task_state_is_restored_once(monkeypatch):
    """the checkpoint's task state is read at the first step only (not re-applied every update)"""
    from distill_plugins.tasks import instruction_distillation as task_module

    calls = []
    monkeypatch.setattr(task_module, "restored_task_state", lambda cfg, n: calls.append(n) or {"x": 1})
    me = SimpleNamespace(restored_state=None, cfg=None, lm_corpus=None, load_state_dict=lambda s: None,
                               own_restored_state=lambda key: None)
    for update in (4, 5, 6):
        task_module.InstructionDistillationTask.restore_training_state(me, update)
    assert calls == [4]
