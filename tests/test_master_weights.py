"""master_weights.py in process: the flat masters of fairseq's --fp16 (one tensor per device, as on a
GPU) and the per-parameter masters of --bf16, saved and restored through a stand-in trainer."""
import types

import torch

from distill_plugins import master_weights


def trainer_with(flat: bool, seed=0):
    g = torch.Generator().manual_seed(seed)
    masters = [torch.randn(3, 4, generator=g), torch.randn(5, generator=g)]
    half = [torch.nn.Parameter(m.to(torch.float16)) for m in masters]
    fp32 = {0: torch.nn.Parameter(torch.cat([m.reshape(-1) for m in masters]))} if flat else \
        [torch.nn.Parameter(m.clone()) for m in masters]
    opt = types.SimpleNamespace(fp32_params=fp32, fp16_params=half)
    trainer = types.SimpleNamespace(_optimizer=opt, optimizer=opt)
    trainer.state_dict = lambda: {"model": {}, "extra_state": {"metrics": {}}}
    return trainer


def masters_of(trainer):
    fp32 = trainer._optimizer.fp32_params
    return [p.data for p in (fp32.values() if isinstance(fp32, dict) else fp32)]


def test_saved_masters_are_restored_into_rebuilt_ones():
    for flat in (True, False):
        saved_from = trainer_with(flat)
        with master_weights.masters_in_state_dict(saved_from):
            state = saved_from.state_dict()
        assert master_weights.KEY not in saved_from.state_dict()["extra_state"]  # only while saving
        saved = state["extra_state"][master_weights.KEY]
        assert state["extra_state"]["metrics"] == {} and len(saved) == (1 if flat else 2)
        # what a resume builds: masters copied from the fp16-rounded model
        resumed = trainer_with(flat)
        for p in masters_of(resumed):
            p.copy_(p.to(torch.float16).float())
        assert not all(torch.equal(a, b) for a, b in zip(masters_of(resumed), saved))
        assert master_weights.restore(resumed, {master_weights.KEY: saved})
        assert all(torch.equal(a, b) for a, b in zip(masters_of(resumed), saved))


def test_masters_of_another_model_are_refused():
    for flat in (True, False):
        other = trainer_with(flat, seed=1)
        with master_weights.masters_in_state_dict(other):
            saved = other.state_dict()["extra_state"][master_weights.KEY]
        target = trainer_with(flat, seed=2)
        before = [m.clone() for m in masters_of(target)]
        assert not master_weights.restore(target, {master_weights.KEY: saved})
        assert all(torch.equal(a, b) for a, b in zip(masters_of(target), before))
        assert not master_weights.restore(target, {master_weights.KEY: saved[:1] if not flat else [saved[0][:-1]]})


def test_nothing_to_do_without_master_weights():
    trainer = types.SimpleNamespace(_optimizer=types.SimpleNamespace(), state_dict=lambda: {"extra_state": {}})
    with master_weights.masters_in_state_dict(trainer):
        assert master_weights.KEY not in trainer.state_dict()["extra_state"]
    assert not master_weights.restore(trainer, {master_weights.KEY: [torch.zeros(1)]})
    assert not master_weights.restore(trainer_with(True), {})


def test_no_masters_without_the_optimizer_state():
    trainer = trainer_with(flat=False)
    trainer.cfg = types.SimpleNamespace(checkpoint=types.SimpleNamespace(no_save_optimizer_state=True))
    with master_weights.masters_in_state_dict(trainer):
        assert master_weights.KEY not in trainer.state_dict()["extra_state"]
    trainer.cfg.checkpoint.no_save_optimizer_state = False
    with master_weights.masters_in_state_dict(trainer):
        assert len(trainer.state_dict()["extra_state"][master_weights.KEY]) == 2
