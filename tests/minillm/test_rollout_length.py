"""MiniLLM's rollouts are capped at 256 response tokens by default, as the reference's (every prompt
left-padded to max_prompt_length 256, generated to max_length 512: spec 2 and 5), however short the
prompt and however long --tokens-per-sample; 0 leaves only --rollout-max-len."""
import math

import pytest
import torch
from fairseq.data import Dictionary
from fairseq.models import FairseqLanguageModel

from distill_plugins.data.prompt_response_dataset import collate_examples, join_prompt_response
from distill_plugins.errors import DistillError
from distill_plugins.tasks.minillm import MiniLLMTask, MiniLLMTaskConfig
from distill_plugins.teacher import Teacher
from test_teacher_mixed_sampling import SYMBOLS, ConstantDecoder

NO_EOS = [1e-30, 0.40, 0.30, 0.20, 0.05, 0.05]  # [eos, a, b, c, d, e]: responses run to the cap


class LongDecoder(ConstantDecoder):
    def max_positions(self):
        return 1024


class Prompts(list):
    """Three-token prompts as the training split's examples."""

    def __init__(self, d, n):
        prompt = torch.tensor([d.index("a"), d.index("c"), d.index("b")])
        super().__init__(join_prompt_response(prompt, torch.tensor([d.eos()]), d.pad(), d.eos(), 600, i)
                         for i in range(n))
        self.pad = d.pad()

    def collater(self, examples):
        return collate_examples(examples, self.pad)


def rollouts(**options):
    d = Dictionary()
    for s in SYMBOLS:
        d.add_symbol(s)
    task = MiniLLMTask(MiniLLMTaskConfig(data="unused", tokens_per_sample=600, num_rollouts=2, rollout_batch_size=2, seed=1, teacher_mixed_alpha=0.0,
                                         **options), d)
    task.datasets["train"] = Prompts(d, 2)
    model = lambda: FairseqLanguageModel(LongDecoder(d, NO_EOS)).eval()  # noqa: E731
    task.teachers = [Teacher(model(), path="crafted", sha256="0" * 64)]
    torch.manual_seed(0)
    task.collect(model(), torch.device("cpu"))
    return [len(r["target"]) - r["prompt_length"] for r in task.store.rollouts]


def test_rollout_responses_stop_at_256_tokens_by_default():
    assert rollouts() == [256] * 2


def test_zero_leaves_only_the_rollout_length():
    lengths = rollouts(rollout_max_new_tokens=0, rollout_max_len=300)
    assert lengths == [300 - 3] * 2  # prompt + response = --rollout-max-len


def test_negative_cap_is_refused():
    with pytest.raises(DistillError, match="--rollout-max-new-tokens must be >= 0"):
        rollouts(rollout_max_new_tokens=-1)
