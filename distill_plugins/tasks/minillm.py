"""Task ``minillm``: on-policy rollouts for MiniLLM (Gu et al. 2024; spec section 2), with
``--criterion minillm``.

How PPO maps onto fairseq's update loop: the task keeps a rollout store. Whenever it is exhausted,
the next ``train_step`` collects a new collection: ``--num-rollouts`` prompts (split over the
data-parallel workers) drawn from the training split in a seeded random order, one response each
sampled from the current student mixed with the teacher, (1 - a) q + a p per token
(``--teacher-mixed-alpha``, 0 = pure student), in chunks of ``--rollout-batch-size`` prompts, and
scored without gradient (log q_old, log p, importance weight; ``distill_plugins/rollouts.py``).
Every ``train_step`` (each micro-batch of each fairseq update) then takes the next minibatch of the
store, as many rollouts as the fairseq batch has prompts (``--batch-size``, MiniLLM: 16 per GPU),
and runs forward/backward with the criterion; the fairseq batch itself only sets that size (the
prompts come from the store). The store is replayed for ``--ppo-epochs`` passes in a fresh random
order each, then cleared, so one collection lasts about ppo_epochs * num_rollouts / batch_size
micro-batches. A pass never spills into the next; the last minibatch of a pass may be smaller.
The store is not checkpointed: a resumed run starts with a fresh collection.

The student is in eval mode (no dropout) during rollouts and training (MiniLLM model.py). With
``--lm-data`` each minibatch also gets a language-modelling batch for the criterion's L_pt term
(``--lm-batch-size``, default the rollout minibatch size) from a second data directory with the
student's dictionary, in one of two formats:

* ``distill-prepare`` output (``train.src-tgt.{src,tgt}``, made with ``--spm-model`` of the main
  data so the dictionary matches): the LM loss covers the responses;
* plain text binarized by ``fairseq-preprocess --only-source --srcdict DATA/dict.src.txt``
  (``train.bin/.idx``; ``python -m distill_plugins.cli.prepare_lm`` writes it): cut into contiguous blocks
  of ``--tokens-per-sample`` tokens, loss on every token (MiniLLM's OpenWebText term).

Sampling is plain ancestral sampling (top-k 0, top-p 1, temperature 1, as in MiniLLM): anything
else would make the stored log q_old differ from the sampling distribution.
"""
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
from fairseq.data import Dictionary, TokenBlockDataset, data_utils
from fairseq.distributed import utils as distributed_utils
from fairseq.models import BaseFairseqModel
from fairseq.optim.amp_optimizer import AMPOptimizer
from fairseq.tasks import register_task

from ..data.prompt_response_dataset import PromptResponseDataset, collate_examples
from ..errors import DistillError, check
from ..rollouts import RolloutStore, collect_rollouts, rollout_batch, sampler_model, to_device
from ..sampling import generation_args
from ..teacher import dictionary_fingerprint
from .instruction_distillation import InstructionDistillationConfig, InstructionDistillationTask

logger = logging.getLogger(__name__)
_STREAMS = {"prompt": 1, "lm": 2}  # separate random orders for rollout prompts and LM batches


@dataclass
class MiniLLMTaskConfig(InstructionDistillationConfig):
    num_rollouts: int = field(default=256, metadata={"help": "rollouts per collection (split over workers)"})
    rollout_batch_size: int = field(default=16, metadata={"help": "prompts per generation call"})
    ppo_epochs: int = field(default=4, metadata={"help": "passes over each collection of rollouts"})
    teacher_mixed_alpha: float = field(
        default=0.2, metadata={"help": "sample from (1 - a) student + a teacher per token (0: student only)"}
    )
    rollout_max_len: Optional[int] = field(
        default=None, metadata={"help": "max prompt + response tokens of a rollout (default --tokens-per-sample)"}
    )
    rollout_max_new_tokens: Optional[int] = field(
        default=None, metadata={"help": "max response tokens of a rollout (default: only --rollout-max-len)"}
    )
    lm_data: Optional[str] = field(
        default=None, metadata={"help": "data directory for the LM/KD term (distill-prepare or fairseq-preprocess "
                                        "--only-source output with the student's dictionary)"}
    )
    lm_batch_size: Optional[int] = field(
        default=None, metadata={"help": "sequences per LM batch (default: the rollout minibatch size)"}
    )


class _LMBlocks(torch.utils.data.Dataset):
    """Contiguous token blocks as LM examples: source = block[:-1], target = block[1:]."""

    def __init__(self, blocks):
        self.blocks = blocks

    def __len__(self):
        return len(self.blocks)

    def __getitem__(self, index):
        block = self.blocks[index]
        return {"id": index, "source": block[:-1], "target": block[1:], "prompt_length": 0}


@register_task("minillm", dataclass=MiniLLMTaskConfig)
class MiniLLMTask(InstructionDistillationTask):
    cfg: MiniLLMTaskConfig
    provides_rollouts = True

    def __init__(self, cfg: MiniLLMTaskConfig, dictionary: Dictionary):
        super().__init__(cfg, dictionary)
        check(str(getattr(cfg, "student_data_mode", "off")) == "off",
              "--student-data-mode is for --task instruction_distillation; MiniLLM samples its own rollouts")
        check(cfg.num_rollouts >= 1, f"--num-rollouts must be >= 1, got {cfg.num_rollouts}")
        check(cfg.rollout_batch_size >= 1, f"--rollout-batch-size must be >= 1, got {cfg.rollout_batch_size}")
        check(cfg.ppo_epochs >= 1, f"--ppo-epochs must be >= 1, got {cfg.ppo_epochs}")
        check(0.0 <= cfg.teacher_mixed_alpha < 1.0,
              f"--teacher-mixed-alpha must be in [0, 1), got {cfg.teacher_mixed_alpha}")
        check(cfg.rollout_max_len is None or cfg.rollout_max_len >= 2,
              f"--rollout-max-len must be >= 2, got {cfg.rollout_max_len}")
        check(cfg.rollout_max_new_tokens is None or cfg.rollout_max_new_tokens >= 1,
              f"--rollout-max-new-tokens must be >= 1, got {cfg.rollout_max_new_tokens}")
        self.store = RolloutStore(cfg.ppo_epochs, seed=cfg.seed)
        self._prompt_order, self._prompt_pos, self._prompt_epoch = None, 0, 0
        self._lm_dataset = None
        self._lm_order, self._lm_pos, self._lm_epoch = None, 0, 0
        self.collections = 0
        if cfg.lm_data:
            self._lm_dataset = self._load_lm_data(cfg.lm_data)  # fail early on a bad directory

    # -- the LM term's data ----------------------------------------------------------------------
    def _check_dictionary(self, path: str):
        if not os.path.isfile(path):
            raise DistillError(f"--lm-data: {path} does not exist; prepare the LM data with the student's dictionary")
        if dictionary_fingerprint(Dictionary.load(path)) != dictionary_fingerprint(self.dictionary):
            raise DistillError(f"--lm-data: {path} differs from the student's dictionary; binarize the LM data "
                               f"with --srcdict {os.path.join(self.cfg.data, 'dict.src.txt')}")

    def _load_lm_data(self, directory: str):
        if not os.path.isdir(directory):
            raise DistillError(f"--lm-data {directory} is not a directory")
        pairs = os.path.join(directory, "train.src-tgt.src")
        plain = os.path.join(directory, "train")
        if os.path.isfile(pairs + ".bin"):
            self._check_dictionary(os.path.join(directory, "dict.src.txt"))
            src = data_utils.load_indexed_dataset(pairs, self.dictionary)
            tgt = data_utils.load_indexed_dataset(os.path.join(directory, "train.src-tgt.tgt"), self.dictionary)
            ds = PromptResponseDataset(src, tgt, self.dictionary, max_len=self.cfg.tokens_per_sample)
        elif os.path.isfile(plain + ".bin"):
            self._check_dictionary(os.path.join(directory, "dict.txt"))
            tokens = data_utils.load_indexed_dataset(plain, self.dictionary)
            blocks = TokenBlockDataset(tokens, tokens.sizes, self.cfg.tokens_per_sample + 1, pad=self.dictionary.pad(),
                                       eos=self.dictionary.eos(), break_mode="none")
            ds = _LMBlocks(blocks)
        else:
            raise DistillError(f"--lm-data {directory} has neither train.src-tgt.src.bin (distill-prepare) nor "
                               "train.bin (fairseq-preprocess --only-source)")
        if len(ds) == 0:
            raise DistillError(f"--lm-data {directory}: the train split is empty")
        logger.info(f"LM data {directory}: {len(ds)} sequences")
        return ds

    def _next_indices(self, n: int, size: int, kind: str):
        """The next n indices of a seeded random order over ``size`` items, this worker's share."""
        world = max(distributed_utils.get_data_parallel_world_size(), 1) if _distributed() else 1
        rank = distributed_utils.get_data_parallel_rank() if _distributed() else 0
        out = []
        while len(out) < n:
            order, pos, epoch = getattr(self, f"_{kind}_order"), getattr(self, f"_{kind}_pos"), getattr(self, f"_{kind}_epoch")
            if order is None or pos >= len(order):
                perm = np.random.RandomState([self.cfg.seed, epoch, _STREAMS[kind]]).permutation(size)
                order = perm[rank::world] if len(perm) >= world else perm
                pos, epoch = 0, epoch + 1
            take = order[pos: pos + n - len(out)]
            out.extend(int(i) for i in take)
            setattr(self, f"_{kind}_order", order)
            setattr(self, f"_{kind}_pos", pos + len(take))
            setattr(self, f"_{kind}_epoch", epoch)
        return out

    def lm_batch(self, size: int, device):
        ds = self._lm_dataset
        idx = self._next_indices(size, len(ds), "lm")
        examples = [ds[i] for i in idx]
        return to_device(collate_examples(examples, self.dictionary.pad()), device)

    # -- rollouts --------------------------------------------------------------------------------
    def collect(self, model, device):
        """Fill the store with a new collection sampled from ``model`` (eval mode, no gradient)."""
        teacher = self.teacher
        world = max(distributed_utils.get_data_parallel_world_size(), 1) if _distributed() else 1
        n = math.ceil(self.cfg.num_rollouts / world)
        alpha = self.cfg.teacher_mixed_alpha
        first = next(teacher.model.parameters())
        if first.device != device:
            if teacher.device is not None and alpha > 0:
                raise DistillError("teacher-mixed sampling needs the teacher on the student's device; "
                                   "drop --teacher-device or pass --teacher-mixed-alpha 0")
            if teacher.device is None:
                teacher.model.to(device)
        sampler = sampler_model(model, teacher.model, alpha)
        max_len = self.cfg.rollout_max_len or self.cfg.tokens_per_sample
        gen_args = generation_args(max_len=max_len)
        new_tokens = self.cfg.rollout_max_new_tokens
        if new_tokens is not None:  # the longest prompt of a chunk + new_tokens; cut per row below
            gen_args.max_len_a, gen_args.max_len_b = 1, new_tokens
        generator = self.build_generator([sampler], gen_args)
        dataset = self.datasets["train"]
        rollouts = []
        while len(rollouts) < n:
            idx = self._next_indices(min(self.cfg.rollout_batch_size, n - len(rollouts)), len(dataset), "prompt")
            prompts = dataset.collater([dataset[i] for i in idx])
            prompts = to_device(prompts, device)
            rollouts += collect_rollouts(self, model, teacher, sampler, generator, prompts, alpha, max_len, new_tokens)
        self.store.fill(rollouts)
        self.collections += 1

    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False):
        model.eval()  # MiniLLM trains and samples without dropout
        model.set_num_updates(update_num)
        base = unwrapped(model)  # sampling and scoring bypass the DDP wrapper (no gradient)
        device = sample["net_input"]["src_tokens"].device
        rollout_time = 0.0
        if self.store.exhausted():
            t0 = time.time()
            self.collect(base, device)
            rollout_time = time.time() - t0
            logger.info(f"collection {self.collections}: {len(self.store.rollouts)} rollouts in {rollout_time:.1f}s")
        t0 = time.time()
        rollouts = self.store.next_minibatch(max(int(sample["nsentences"]), 1))
        batch = rollout_batch(rollouts, self.dictionary.pad(), device)
        if self._lm_dataset is not None:
            batch["lm"] = self.lm_batch(self.cfg.lm_batch_size or len(rollouts), device)
        with torch.autograd.profiler.record_function("forward"):
            with torch.amp.autocast("cuda", enabled=isinstance(optimizer, AMPOptimizer)):
                loss, sample_size, logging_output = criterion(model, batch)
        if ignore_grad:
            loss *= 0
        with torch.autograd.profiler.record_function("backward"):
            optimizer.backward(loss)
        logging_output["rollout_time"] = rollout_time
        logging_output["train_time"] = time.time() - t0
        return loss, sample_size, logging_output


def unwrapped(model):
    """The fairseq model inside fairseq's/torch's data-parallel wrappers (which nest)."""
    while not isinstance(model, BaseFairseqModel) and hasattr(model, "module"):
        model = model.module
    return model


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()
