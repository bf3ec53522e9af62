"""Task ``minillm``: on-policy rollouts for MiniLLM (Gu et al. 2024; spec section 2), with
``--criterion minillm``.

How PPO maps onto fairseq's update loop: the task keeps a rollout store. Whenever it is exhausted,
the next ``train_step`` collects a new collection: ``--num-rollouts`` prompts (split over the
data-parallel workers) drawn from the training split in a seeded random order, one response each
sampled from the current student mixed with the teacher, (1 - a) q + a p per token
(``--teacher-mixed-alpha``, 0 = pure student), in chunks of ``--rollout-batch-size`` prompts, and
scored without gradient (log q_old, log p, importance weight; ``distill_plugins/rollouts.py``).
With a > 0 a second response per prompt is drawn from the student alone, only for the logged
``rev_kl`` (as MiniLLM does; ``--no-student-rev-kl-sample`` skips it).
Every ``train_step`` (each micro-batch of each fairseq update) then takes the next minibatch of the
store, as many rollouts as the fairseq batch has prompts (``--batch-size``, MiniLLM: 16 per GPU),
and runs forward/backward with the criterion; the fairseq batch itself only sets that size (the
prompts come from the store). The store is replayed for ``--ppo-epochs`` passes in a fresh random
order each, then cleared, so one collection lasts about ppo_epochs * num_rollouts / batch_size
micro-batches. A pass never spills into the next; the last minibatch of a pass may be smaller.
Resume: the store (rollouts, the rest of the current pass, the shuffling state), the prompt order
and the --lm-data order are saved in the task state and restored at the first step, so a resumed
single-worker run trains on what an uninterrupted one would (fairseq reseeds torch per update).
With several workers every worker's store is saved too (the task gathers them before rank 0 writes,
``distributed_compat.py``): resumed on as many workers, each continues its own collection; on another
number of workers every worker starts a new collection (a store is one worker's share of one),
all continuing the prompt order at rank 0's position (all take the same number of prompts per
collection).

The student is in eval mode (no dropout) during rollouts and training (MiniLLM model.py). With
``--lm-data`` each minibatch also gets a language-modelling batch for the criterion's L_pt term
(``--lm-batch-size``, default the rollout minibatch size) from a second data directory with the
student's dictionary (``distill_plugins/data/lm_corpus.py``, shared with ``instruction_distillation``):
``distill-prepare`` output (the LM loss covers the responses) or plain text binarized by
``python -m distill_plugins.cli.prepare_lm`` (contiguous blocks of ``--tokens-per-sample`` tokens,
loss on every token: MiniLLM's OpenWebText term).

Sampling is plain ancestral sampling (top-k 0, top-p 1, temperature 1, as in MiniLLM): anything
else would make the stored log q_old differ from the sampling distribution.
"""
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
from fairseq.data import Dictionary
from fairseq.models import BaseFairseqModel
from fairseq.optim.amp_optimizer import AMPOptimizer
from fairseq.tasks import register_task

from ..data.sharded_order import ShardedOrder, rank_and_world
from ..errors import DistillError, check
from ..rollouts import RolloutStore, collect_rollouts, rollout_batch, sampler_model, to_device
from ..sampling import generation_args
from .instruction_distillation import InstructionDistillationConfig, InstructionDistillationTask

logger = logging.getLogger(__name__)
PROMPT_STREAM = 1  # the ShardedOrder stream of rollout prompts (LM batches: data/lm_corpus.py, 2)


@dataclass
class MiniLLMTaskConfig(InstructionDistillationConfig):
    num_rollouts: int = field(default=256, metadata={"help": "rollouts per collection (split over workers)"})
    rollout_batch_size: int = field(default=16, metadata={"help": "prompts per generation call"})
    ppo_epochs: int = field(default=4, metadata={"help": "passes over each collection of rollouts"})
    teacher_mixed_alpha: float = field(
        default=0.2, metadata={"help": "sample from (1 - a) student + a teacher per token (0: student only)"}
    )
    no_student_rev_kl_sample: bool = field(
        default=False, metadata={"help": "with --teacher-mixed-alpha > 0, do not draw the second, pure-student "
                                         "response per prompt that rev_kl is logged on (MiniLLM draws it; it "
                                         "costs one more generation per rollout); rev_kl is then not logged"}
    )
    rollout_max_len: Optional[int] = field(
        default=None, metadata={"help": "max prompt + response tokens of a rollout (default --tokens-per-sample)"}
    )
    rollout_max_new_tokens: int = field(
        default=256, metadata={"help": "max response tokens of a rollout (0: only --rollout-max-len); 256 = "
                                       "MiniLLM's max_length 512 - max_prompt_length 256 (prompts left-padded "
                                       "to 256)"}
    )


@register_task("minillm", dataclass=MiniLLMTaskConfig)
class MiniLLMTask(InstructionDistillationTask):
    cfg: MiniLLMTaskConfig
    provides_rollouts = True
    scores_generated_sequences = True  # rollouts: no --teacher-cache

    def __init__(self, cfg: MiniLLMTaskConfig, dictionary: Dictionary):
        super().__init__(cfg, dictionary)
        check(str(getattr(cfg, "student_data_mode", "off")) == "off",
              "--student-data-mode is for --task instruction_distillation; MiniLLM samples its own rollouts")
        check(cfg.num_rollouts >= 1, f"--num-rollouts must be >= 1, got {cfg.num_rollouts}")
        check(cfg.rollout_batch_size >= 1, f"--rollout-batch-size must be >= 1, got {cfg.rollout_batch_size}")
        check(cfg.ppo_epochs >= 1, f"--ppo-epochs must be >= 1, got {cfg.ppo_epochs}")
        check(0.0 <= cfg.teacher_mixed_alpha < 1.0,
              f"--teacher-mixed-alpha must be in [0, 1), got {cfg.teacher_mixed_alpha}")
        check(str(cfg.teacher_sharding) == "replicated" or cfg.teacher_mixed_alpha == 0.0,
              "--teacher-sharding fsdp cannot sample with the teacher (--teacher-mixed-alpha "
              f"{cfg.teacher_mixed_alpha}): its calls would differ between workers; pass --teacher-sharding "
              "replicated or --teacher-mixed-alpha 0")
        check(cfg.rollout_max_len is None or cfg.rollout_max_len >= 2,
              f"--rollout-max-len must be >= 2, got {cfg.rollout_max_len}")
        check(cfg.rollout_max_new_tokens >= 0,
              f"--rollout-max-new-tokens must be >= 0 (0: no cap but --rollout-max-len), got {cfg.rollout_max_new_tokens}")
        self.store = RolloutStore(cfg.ppo_epochs, seed=cfg.seed)
        self._prompt_order = None  # ShardedOrder over the training prompts, built at the first collection
        self.collections = 0

    # -- checkpoint state ------------------------------------------------------------------------
    def minillm_state(self) -> dict:
        rank, world = rank_and_world()
        return {"store": self.store.state_dict(self.dictionary.pad()), "collections": self.collections,
                "prompt_order": self._prompt_order.state_dict() if self._prompt_order is not None else None,
                "rank": rank, "world": world}

    def state_dict(self):
        return {**super().state_dict(), "minillm": self.minillm_state()}

    def worker_state(self):
        return {**(super().worker_state() or {}), "minillm": self.minillm_state()}

    def restore_training_state(self, update_num: int):
        if self.restored_state is not None:
            return
        super().restore_training_state(update_num)
        saved = self.own_restored_state("minillm")
        if not saved:
            return
        self.collections = int(saved["collections"])
        if saved["prompt_order"] is not None:
            self._prompt_order = ShardedOrder(len(self.datasets["train"]), self.cfg.seed, PROMPT_STREAM)
            self._prompt_order.load_state_dict(saved["prompt_order"])
        if (int(saved["rank"]), int(saved["world"])) == rank_and_world():
            self.store.load_state_dict(saved["store"])
            left = "exhausted" if self.store.exhausted() else (
                f"{len(self.store.rollouts)} rollouts, pass {self.store.epochs_done} of {self.cfg.ppo_epochs}, "
                f"{len(self.store.order)} left in it")
            logger.info(f"resumed collection {self.collections}: {left}")
        else:
            logger.info(f"resumed at collection {self.collections} with rank {saved['rank']} of {saved['world']}'s "
                        f"state; this worker starts a new collection")

    def teacher_input_length(self):
        needed, source = super().teacher_input_length()
        rollout = self.cfg.rollout_max_len
        if rollout is not None and rollout > self.cfg.tokens_per_sample:  # rollouts: capped by the student too
            student = getattr(self, "student_positions", None)
            longest = min(rollout, student) if student is not None else rollout
            if longest > needed:
                needed, source = longest, f"--rollout-max-len {rollout}"
        return needed, source

    # -- rollouts --------------------------------------------------------------------------------
    def collect(self, model, device):
        """Fill the store with a new collection sampled from ``model`` (eval mode, no gradient)."""
        teacher = self.teacher
        world = rank_and_world()[1]
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
        new_tokens = self.cfg.rollout_max_new_tokens or None
        if new_tokens is not None:  # the longest prompt of a chunk + new_tokens; cut per row below
            gen_args.max_len_a, gen_args.max_len_b = 1, new_tokens
        generator = self.build_generator([sampler], gen_args)
        student_generator = None
        if alpha > 0 and not self.cfg.no_student_rev_kl_sample:
            student_generator = self.build_generator([model], gen_args)
        dataset = self.datasets["train"]
        rollouts = []
        while len(rollouts) < n:
            if self._prompt_order is None:
                self._prompt_order = ShardedOrder(len(dataset), self.cfg.seed, PROMPT_STREAM)
            idx = self._prompt_order.take(min(self.cfg.rollout_batch_size, n - len(rollouts)))
            prompts = dataset.collater([dataset[i] for i in idx])
            prompts = to_device(prompts, device)
            rollouts += collect_rollouts(self, model, teacher, sampler, generator, prompts, alpha, max_len, new_tokens,
                                         student_generator)
        self.store.fill(rollouts)
        self.collections += 1

    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False):
        self.restore_training_state(update_num)
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
        if self.lm_corpus is not None:
            batch["lm"] = self.lm_batch(self.cfg.lm_batch_size or len(rollouts), device)
        with torch.autograd.profiler.record_function("forward"):
            with torch.amp.autocast("cuda", enabled=isinstance(optimizer, AMPOptimizer)):
                loss, sample_size, logging_output = criterion(model, batch)
        if ignore_grad:
            loss *= 0
        with torch.autograd.profiler.record_function("backward"):
            optimizer.backward(loss)
        if device.type == "cuda":  # the backward's kernels are asynchronous
            torch.cuda.synchronize(device)
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
