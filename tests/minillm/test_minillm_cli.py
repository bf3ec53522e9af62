"""MiniLLM through the real CLIs: SFT student -> fairseq-train --task minillm --criterion minillm
(teacher-mixed rollouts, PPO epochs, LM term on plain text) lowers the student's reverse KL to the
teacher on the held-out prompts, measured on the student's own samples."""

import pytest
import torch
from fairseq.data import Dictionary
from fairseq.models import FairseqIncrementalDecoder, FairseqLanguageModel

from conftest import train
from distill_plugins.errors import DistillError
from distill_plugins.evaluation.reverse_kl import load_frozen, sampled_reverse_kl
from distill_plugins.tasks.instruction_distillation import InstructionDistillationConfig, InstructionDistillationTask
from distill_plugins.tasks.minillm import MiniLLMTask, MiniLLMTaskConfig, unwrapped

MINILLM = ["--task", "minillm", "--criterion", "minillm", "--lr", "1e-3", "--lr-scheduler", "fixed",
           "--batch-size", "8", "--num-rollouts", "16", "--rollout-batch-size", "8", "--ppo-epochs", "2",
           "--rollout-max-len", "128"]


@pytest.fixture(scope="module")
def sft_student(data_bin, tmp_path_factory):
    save = tmp_path_factory.mktemp("sft_student")
    train(data_bin, save, "--criterion", "cross_entropy", max_update=10)
    return str(save / "checkpoint_last.pt")


def minillm_task(data_bin, **kw):
    return MiniLLMTask.setup_task(MiniLLMTaskConfig(data=data_bin, seed=1, **kw))


def test_lm_data_formats_and_errors(data_bin, plain_lm_data, tmp_path):
    pad = None
    for path, response_only in ((plain_lm_data, False), (data_bin, True)):
        task = minillm_task(data_bin, lm_data=path, tokens_per_sample=32)
        pad = task.dictionary.pad()
        batch = task.lm_batch(4, torch.device("cpu"))
        assert batch["target"].size(0) == 4
        if response_only:  # distill-prepare pairs: prompts are not labels
            assert batch["target"][:, 0].eq(pad).all()
        else:  # contiguous blocks behind the BOS column: a label on every other position; shifted by one
            src, tgt = batch["net_input"]["src_tokens"], batch["target"]
            real = src.ne(pad)  # the corpus's last block may be shorter (padded in the batch)
            assert tgt[:, 0].eq(pad).all() and torch.equal(tgt[:, 1:].ne(pad), real[:, 1:]) and tgt.size(1) == 32
            assert src[:, 0].eq(task.dictionary.eos()).all()
            assert torch.equal(src[:, 2:][real[:, 2:]], tgt[:, 1:-1][real[:, 2:]])
    with pytest.raises(DistillError, match="is not a directory"):
        minillm_task(data_bin, lm_data=str(tmp_path / "missing")).load_lm_corpus()
    (tmp_path / "other").mkdir()
    with pytest.raises(DistillError, match="neither"):
        minillm_task(data_bin, lm_data=str(tmp_path / "other")).load_lm_corpus()
    with pytest.raises(DistillError, match="--ppo-epochs"):
        minillm_task(data_bin, ppo_epochs=0)
    # a sharded teacher's forward is a collective: sampling with it would call it unequally often
    with pytest.raises(DistillError, match="--teacher-sharding fsdp cannot sample with the teacher"):
        minillm_task(data_bin, teacher_sharding="fsdp")
    assert minillm_task(data_bin, teacher_sharding="fsdp", teacher_mixed_alpha=0.0).cfg.teacher_mixed_alpha == 0.0


def test_rollouts_use_the_model_inside_nested_data_parallel_wrappers():
    class Wrapper(torch.nn.Module):  # fairseq's ModuleProxyWrapper around torch's DDP, say
        def __init__(self, module):
            super().__init__()
            self.module = module

    model = FairseqLanguageModel(FairseqIncrementalDecoder(Dictionary()))
    assert unwrapped(Wrapper(Wrapper(model))) is model and unwrapped(model) is model


def reverse_kl_on_valid(data_bin, student, teacher):
    task = InstructionDistillationTask.setup_task(InstructionDistillationConfig(data=data_bin))
    task.load_dataset("valid")
    return sampled_reverse_kl(task, load_frozen(student, task), load_frozen(teacher, task), "valid",
                              seeds=(1, 2, 3), max_len=128)


def test_minillm_run_lowers_reverse_kl_on_held_out_prompts(data_bin, teacher_ckpt, sft_student, plain_lm_data,
                                                           tmp_path):
    proc = train(data_bin, tmp_path, *MINILLM, "--teacher-path", teacher_ckpt, "--finetune-from-model", sft_student,
                 "--lm-data", plain_lm_data, max_update=6)
    log = proc.stdout + proc.stderr
    for stat in ("reward=", "return=", "rev_kl=", "stu_len=", "clip_frac=", "rollout_time=", "train_time=", "pg_loss=",
                 "reg_loss=", "pt_loss=", "lm_loss=", "pt_kd_loss="):
        assert stat in log, stat
    # 16 rollouts, minibatches of 8, 2 PPO epochs: 4 updates per collection, the 5th collects anew
    assert "collection 1: 16 rollouts" in log and "collection 2: 16 rollouts" in log
    assert "collection 3" not in log
    ckpt = torch.load(tmp_path / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    assert ckpt["criterion"] is None and ckpt["optimizer_history"][-1]["num_updates"] == 6

    before = reverse_kl_on_valid(data_bin, sft_student, teacher_ckpt)
    after = reverse_kl_on_valid(data_bin, str(tmp_path / "checkpoint_last.pt"), teacher_ckpt)
    print(f"reverse KL on valid prompts: SFT {before}, MiniLLM {after}")
    assert after["seq_rkl"] < 0.8 * before["seq_rkl"]
    assert after["token_rkl"] < before["token_rkl"]
