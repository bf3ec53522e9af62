"""Student-generated training batches inside fairseq-train (ImitKD, GKD, DistiLLM; spec section 3).

``StudentData`` is held by the task; ``prepare(...)`` is called by the task's ``train_step`` before
the criterion sees the batch and may replace it by fresh student generations or a replay-buffer
batch (see ``schedule`` for the decision rule). It adds counters to the logging output that
``reduce_metrics`` turns into the per-update log: ``src_gen``/``src_buf``/``src_gt`` (fraction of
micro-batches that generated / replayed / used ground truth), ``tau``, ``buf`` (buffer fill),
``gen_s`` (seconds of generation per micro-batch and worker), ``gen_tok`` (generated response
tokens per micro-batch and worker, EOS included) and ``gen_seqs`` (generated sequences, likewise;
the trained batch, ``bsz``, can be smaller: see the token budget).

Data parallelism: each worker generates for its own prompts and keeps its own buffer; r is drawn
from (seed, update, micro-batch) so every worker takes the same branch; "buffer full" is
all-reduced (only when it decides); tau moves only on the all-reduced validation loss.

Token budget: a generated or replayed batch holds other sequences than the batch it replaces, so
it keeps only the first n of its (randomly drawn) examples with n * longest <= ``--max-tokens``
(fairseq's own padded-batch measure; at least one example), and at most ``--batch-size``.

Resume: tau, the reference dev loss and the replay buffer's contents (token tensors, see
``replay_buffer``) and sampling state are saved in the task state, and restored from the resumed
checkpoint at the first step (``distill_plugins/resume.py``).
With several data-parallel workers every worker's buffer is saved (fairseq writes the checkpoint on
rank 0 alone; the task gathers the workers' states first, ``distributed_compat.py``): resumed on as
many workers, each gets its own buffer and sampling state back, as if uninterrupted. Resumed on
another number of workers, every worker starts from a copy of rank 0's buffer and samples it with
its own random stream; workers that restored the same copy may replay the same sequence in one
update while the copies age out.
"""
import json
import logging
import math
import time
from typing import Dict, List, Optional

import torch
from fairseq import utils
from fairseq.distributed import utils as dist_utils
from fairseq.logging import metrics

from ..data.prompt_response_dataset import collate_examples
from ..data.sharded_order import rank_and_world
from ..errors import DistillError, check
from . import schedule
from .replay_buffer import ReplayBuffer
from .responses import examples_from_responses, sample_responses

logger = logging.getLogger(__name__)

LOG_KEYS = ("sd_steps", "sd_gen", "sd_buf", "sd_gt", "sd_tau", "sd_fill", "sd_time", "sd_gen_seqs", "sd_gen_toks")


def validate_options(cfg):
    """One-line errors for impossible settings, before anything is built."""
    mode = getattr(cfg, "student_data_mode", "off")
    if mode == "off":
        return
    check(0.0 <= cfg.student_data_lambda <= 1.0,
          f"--student-data-lambda must be in [0, 1], got {cfg.student_data_lambda}")
    check(0.0 <= cfg.adaptive_tau_init <= 1.0, f"--adaptive-tau-init must be in [0, 1], got {cfg.adaptive_tau_init}")
    check(cfg.adaptive_loss_eps >= 0, f"--adaptive-loss-eps must be >= 0, got {cfg.adaptive_loss_eps}")
    check(cfg.replay_buffer_size >= 1,
          f"--replay-buffer-size must be at least 1, got {cfg.replay_buffer_size}")
    check(cfg.gen_max_new_tokens >= 1, f"--gen-max-new-tokens must be >= 1, got {cfg.gen_max_new_tokens}")
    check(0.0 < cfg.gen_top_p <= 1.0, f"--gen-top-p must be in (0, 1], got {cfg.gen_top_p}")
    check(cfg.gen_temperature > 0, f"--gen-temperature must be > 0, got {cfg.gen_temperature}")
    if mode == "adaptive" and cfg.replay_ratio != "constant":
        check(isinstance(cfg.max_update, int) and cfg.max_update > 0,
              f"--replay-ratio {cfg.replay_ratio} needs the total number of updates: pass --max-update")


def check_model_positions(cfg, model):
    """A one-token prompt plus the generation budget must fit the model's and the task's positions."""
    if getattr(cfg, "student_data_mode", "off") == "off":
        return
    positions = min(int(model.max_positions()), int(cfg.tokens_per_sample))
    if cfg.gen_max_new_tokens + 1 > positions:
        raise DistillError(
            f"--gen-max-new-tokens {cfg.gen_max_new_tokens} does not fit the model's {positions} positions "
            f"(the smaller of the model's and --tokens-per-sample) after a prompt; use at most {positions - 1}"
        )


def unwrap(model):
    """The fairseq model inside DDP/proxy wrappers (generation calls its decoder directly)."""
    while isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return model


class StudentData:
    def __init__(self, cfg, task):
        validate_options(cfg)
        self.cfg, self.task = cfg, task
        self.mode = str(cfg.student_data_mode)  # a fairseq StrEnum: plain str for pickling
        self.seed = int(cfg.seed)
        self.rank, self.world = rank_and_world()
        self.buffer = ReplayBuffer(cfg.replay_buffer_size, seed=self.seed * 1000 + self.rank)
        self.threshold = schedule.AdaptiveThreshold(cfg.adaptive_tau_init, cfg.adaptive_loss_eps)
        self.restored_fill: Optional[int] = None
        self._started = False
        self._valid_pending = False
        self._update, self._micro = -1, 0
        self._trace = None

    # -- state ---------------------------------------------------------------------------------
    def _pad(self) -> int:
        return self.task.dictionary.pad() if self.task is not None else 1

    def state_dict(self) -> dict:
        """This worker's threshold, buffer and sampling state (rank 0's is the checkpoint's own; every
        worker's goes into its ``workers`` list)."""
        return {**self.threshold.state_dict(), "buffer_fill": len(self.buffer), "mode": self.mode,
                "buffer": self.buffer.state_dict(self._pad()), "buffer_rank": self.rank, "world": self.world}

    def load_state_dict(self, state: dict):
        self.threshold.load_state_dict(state)
        self.restored_fill = int(state.get("buffer_fill", 0))
        saved = state.get("buffer")
        if saved is None:  # a checkpoint of an older version: the buffer refills
            logger.info(f"student data: resumed with tau={self.threshold.tau} prev dev loss={self.threshold.prev_loss}; "
                        f"the checkpoint has no replay buffer contents, it refills")
            return
        same_worker = int(state.get("buffer_rank", 0)) == self.rank
        self.buffer.load_state_dict(saved, restore_rng=same_worker)
        logger.info(f"student data: resumed with tau={self.threshold.tau} prev dev loss={self.threshold.prev_loss}; "
                    f"replay buffer restored with {len(self.buffer)} sequences"
                    + ("" if same_worker and int(state.get("world", 1)) == self.world
                       else f" (rank {state.get('buffer_rank', 0)}'s buffer of {state.get('world', 1)} workers, "
                            f"now rank {self.rank} of {self.world})"))

    def _start(self, task, model, criterion, update_num: int):
        """First step: restore the state of a resumed run (read by the task), or measure the initial
        model's dev loss."""
        self._started = True
        saved = task.own_restored_state("student_data")
        if saved:
            self.load_state_dict(saved)
            return
        if self.mode == "adaptive" and self.threshold.prev_loss is None:
            loss = self.initial_dev_loss(task, model, criterion)
            if loss is not None:
                self.threshold.prev_loss = loss
                logger.info(f"student data: dev CE of the initial model {loss:.4f} nats/token (reference for tau)")
                self._write_trace({"event": "initial_dev_loss", "dev_loss": loss, "tau": self.threshold.tau})

    def initial_dev_loss(self, task, model, criterion) -> Optional[float]:
        """Teacher-forced dev CE (nats/token) of the model before training, as DistiLLM measures at step 0."""
        subset = str(getattr(self.cfg, "valid_subset", "valid")).split(",")[0]
        if subset not in task.datasets:
            return None
        device = next(unwrap(model).parameters()).device
        itr = task.get_batch_iterator(
            task.dataset(subset), max_tokens=self.cfg.max_tokens_valid, max_sentences=self.cfg.batch_size_valid,
            max_positions=task.max_positions(), num_shards=self.world, shard_id=self.rank, seed=self.seed,
            disable_iterator_cache=True,
        ).next_epoch_itr(shuffle=False)
        ce, ntok, first = 0.0, 0, None
        model.eval()  # the criterion directly, not task.valid_step: no validation extras (Rouge-L)
        with torch.no_grad():
            for sample in itr:
                # a worker whose share is a batch short gets {}: it still runs the criterion (result
                # dropped), as fairseq's valid_step does, since a sharded teacher's or student's
                # forward is a collective that every worker must call equally often
                dummy = not sample
                if dummy:
                    sample = first or task.dataset(subset).collater([task.dataset(subset)[0]])
                first = first or sample
                sample = utils.apply_to_sample(lambda t: t.to(device), sample)
                _, _, log = criterion(model, sample)
                if not dummy:
                    ce += float(log["nll_loss"] if "nll_loss" in log else log["loss"])
                    ntok += int(log["ntokens"])
        model.train()
        totals = torch.tensor([ce, float(ntok)], dtype=torch.float64, device=device)
        if self.world > 1:
            dist_utils.all_reduce(totals, group=dist_utils.get_data_parallel_group())
        return float(totals[0] / totals[1]) if totals[1] > 0 else None

    # -- validation -> tau -----------------------------------------------------------------------
    def begin_valid(self):
        self._valid_pending = True

    def after_valid(self, stats: dict, agg=None):
        """Adapt tau on the first validation subset's CE (all-reduced by fairseq, identical on all workers)."""
        if not self._valid_pending or self.mode != "adaptive":
            return
        self._valid_pending = False
        loss = None
        for key in ("nll_loss", "loss"):
            if agg is not None and key in agg:
                loss = float(agg[key].avg)
            elif key in stats:
                loss = float(stats[key])
            if loss is not None:
                break
        if loss is None:
            return
        loss *= math.log(2)  # fairseq logs base 2; DistiLLM's eps is in nats
        before = self.threshold.tau
        raised = self.threshold.observe(loss)
        logger.info(f"student data: dev CE {loss:.4f} nats, tau {before:.1f} -> {self.threshold.tau:.1f}"
                    + (" (raised)" if raised else ""))
        self._write_trace({"event": "valid", "dev_loss": loss, "tau": self.threshold.tau, "raised": raised})

    # -- one training step ---------------------------------------------------------------------------
    def _all_full(self, device) -> bool:
        not_full = torch.tensor([0.0 if self.buffer.full else 1.0], device=device)
        if self.world > 1:
            dist_utils.all_reduce(not_full, group=dist_utils.get_data_parallel_group(), op="max")
        return bool(not_full.item() == 0.0)

    def prepare(self, task, sample, model, criterion, update_num: int, dummy: bool = False):
        """Returns the batch to train on and this step's logging counters. ``dummy``: fairseq's
        stand-in batch of a worker that ran out of data (trained with its gradient ignored): the
        decision is still drawn (and any collective of it joined), but nothing is generated for it
        or put in the buffer, which holds generations of batches actually trained on."""
        if not self._started:
            self._start(task, model, criterion, update_num)
        if update_num != self._update:
            self._update, self._micro = update_num, 0
        else:
            self._micro += 1
        device = sample["target"].device
        tau = self.threshold.tau
        r = schedule.decision_random(self.seed, update_num, self._micro)
        s = schedule.replay_share(tau, update_num + 1, self.cfg.max_update or 0, str(self.cfg.replay_ratio)) \
            if self.mode == "adaptive" else 0.0
        full = None
        if self.mode == "adaptive" and s <= r < tau:
            full = self._all_full(device)
        source = schedule.choose_source(self.mode, r, lam=1.0 if self.mode == "always" else self.cfg.student_data_lambda,
                                        tau=tau, s=s, buffer_full=full)
        if dummy:
            source = schedule.GROUND_TRUTH
        log = {k: 0.0 for k in LOG_KEYS}
        log["sd_steps"] = 1.0
        bsz = int(sample["target"].size(0))
        if source in (schedule.GENERATE, schedule.GENERATE_REPLAY):
            examples, seconds = self._generate(task, model, sample, device)
            pad = task.dictionary.pad()
            log.update(sd_gen=1.0, sd_time=seconds, sd_gen_seqs=float(len(examples)),
                       sd_gen_toks=float(sum(int(e["target"].ne(pad).sum()) for e in examples)))
            self.buffer.push(examples)
            if source == schedule.GENERATE_REPLAY:
                examples = self.buffer.sample(bsz)
            sample = self._to_batch(self._fit(examples), device)
        elif source == schedule.REPLAY:
            sample = self._to_batch(self._fit(self.buffer.sample(bsz)), device)
            log["sd_buf"] = 1.0
        else:
            log["sd_gt"] = 1.0
        log["sd_tau"], log["sd_fill"] = float(tau), float(len(self.buffer))
        self._write_trace({"update": update_num, "micro": self._micro, "r": r, "s": s, "tau": tau,
                           "source": source, "fill": len(self.buffer), "bsz": int(sample["target"].size(0)),
                           "width": int(sample["target"].size(1)), "ids": [int(i) for i in sample["id"]]})
        return sample, log

    def _generate(self, task, model, sample, device):
        student = unwrap(model)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        responses = sample_responses(
            task, student, sample, self.cfg.gen_max_new_tokens, top_p=self.cfg.gen_top_p,
            temperature=self.cfg.gen_temperature, max_total=self.cfg.tokens_per_sample,
        )
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
        pad, eos = task.dictionary.pad(), task.dictionary.eos()
        return examples_from_responses(sample, responses, pad, eos, self.cfg.tokens_per_sample), seconds

    def _fit(self, examples: List[Dict]) -> List[Dict]:
        limits = [getattr(self.cfg, k, None) for k in ("max_tokens", "batch_size")]
        return within_token_budget(examples, *[v if isinstance(v, int) else None for v in limits])

    def _to_batch(self, examples: List[Dict], device):
        batch = collate_examples(examples, self.task.dictionary.pad())
        return utils.apply_to_sample(lambda t: t.to(device), batch)

    def _write_trace(self, record: dict):
        if not getattr(self.cfg, "student_data_trace", None):
            return
        if self._trace is None:
            self._trace = open(f"{self.cfg.student_data_trace}.rank{self.rank}.jsonl", "a")
        self._trace.write(json.dumps(record) + "\n")
        self._trace.flush()


def within_token_budget(examples: List[Dict], max_tokens: Optional[int], max_sentences: Optional[int] = None):
    """The longest prefix of ``examples`` whose padded batch, n * max(len(source)), fits ``max_tokens``
    (and n <= ``max_sentences``); at least one example. None/0 means no limit."""
    n, longest = 0, 0
    for ex in examples:
        length = max(longest, len(ex["source"]))
        if n > 0 and ((max_tokens and (n + 1) * length > max_tokens) or (max_sentences and n + 1 > max_sentences)):
            break
        n, longest = n + 1, length
    return examples[:n]


def reduce_metrics(logging_outputs):
    """Log the per-update data source, tau, buffer fill and generation time (summed over workers)."""
    steps = sum(float(log.get("sd_steps", 0)) for log in logging_outputs)
    if steps <= 0:
        return
    total = lambda k: sum(float(log.get(k, 0)) for log in logging_outputs)  # noqa: E731
    metrics.log_scalar("src_gen", total("sd_gen") / steps, steps, round=3)
    metrics.log_scalar("src_buf", total("sd_buf") / steps, steps, round=3)
    metrics.log_scalar("src_gt", total("sd_gt") / steps, steps, round=3)
    metrics.log_scalar("tau", total("sd_tau") / steps, steps, round=2)
    metrics.log_scalar("buf", total("sd_fill") / steps, steps, round=1)
    metrics.log_scalar("gen_s", total("sd_time") / steps, steps, round=3)
    metrics.log_scalar("gen_tok", total("sd_gen_toks") / steps, steps, round=1)
    metrics.log_scalar("gen_seqs", total("sd_gen_seqs") / steps, steps, round=1)
