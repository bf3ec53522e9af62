"""Base of the token-level distillation criterions: masks, CE/KD mixing, reduction and logging.

    loss = (1 - kd_ratio) * CE(student, labels) + kd_ratio * D(teacher || student)

summed over response tokens (prompt and padding positions are never labels) with
``sample_size = ntokens``; fairseq's trainer divides by the summed sample size of all micro-batches
and workers, so the loss is a token mean over the *global* batch, exact under gradient
accumulation and data parallelism (DSKD's reduction; DistiLLM/MiniLLM average per micro-batch).
D is one of ``distill_plugins.divergences``, always in float32. Logged ``loss``, ``nll_loss`` (the
CE term) and ``kd_loss`` are per-token and in base 2, like fairseq's own criterions.
Subclasses only say which divergence they use and with which extra options.

With ``--lm-data`` (the task adds a pre-training batch ``sample["lm"]`` to every training batch)
DistiLLM's extra LM term is added (Ko et al. 2024, spec section 3; ``--lm-coef``, default 1):

    loss = (1 - kd_ratio) * CE + kd_ratio * D + lm_coef * N * LM / N_lm

where LM is the summed CE of the student on the LM batch's N_lm labels and N the batch's response
tokens: after fairseq divides by ``sample_size`` = N the term is lm_coef times the per-token LM CE,
as DistiLLM adds the two means per micro-batch. ``lm_loss`` (per LM token, base 2) is logged. The
LM batch's CE is chunked and fused like the main term (``--kd-impl``).

``--kd-impl`` picks how the sum is computed (same value and gradients, tests/test_chunked_divergences.py):
``plain`` materialises float32 [tokens, vocab] tensors for both models; ``chunked``
(``chunked_divergences.chunked_kd_loss``) takes ``--kd-chunk-size`` tokens at a time, so only the
student's logits and their gradient are full-size; ``fused`` also fuses the output projection for
the student (and the teacher, when it has one), so neither model's logits exist beyond a chunk.
Default ``fused``: in ``benchmarks/kd_step.py`` (CPU, 2,048 tokens x 8k vocab) fused and chunked
steps took 0.8x the CPU time of plain, and fused the least memory (0.24x plain's peak); a student
whose logits are more than ``hidden @ weight.T`` (``output_projection.fusable_output``) falls back
to chunked.
A subclass that overrides ``kd_term`` (and not ``chunk_teachers``) always takes the plain path.
On a CUDA device the chunks of forward KL, reverse KL, skew (reverse) KL, JS and TVD go through one
Triton kernel (``triton_kd.py``: 2-3 passes over the vocabulary, within 3x of the bytes floor for
forward KL on an H100); elsewhere, or for adaptive KL, through ``chunked_divergences``.
"""
import logging
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from fairseq import utils
from fairseq.criterions import FairseqCriterion
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.logging import metrics

from ..chunked_divergences import (
    DEFAULT_CHUNK_SIZE, KDLoss, chunked_kd_loss, cross_entropy_loss_and_grad, dense_rows, fused_kd_loss,
)
from ..errors import DistillError, check
from ..output_projection import fusable_output, unwrap

logger = logging.getLogger(__name__)


# registered criterion -> (triton_kd divergence, config field of its coefficient)
TRITON_KERNELS = {
    "kd": ("forward_kl", None),
    "reverse_kl": ("reverse_kl", None),
    "skew_kl": ("skew_kl", "skew_alpha"),
    "skew_reverse_kl": ("skew_reverse_kl", "skew_alpha"),
    "js": ("js", "js_beta"),
    "tvd": ("tvd", None),
}


@dataclass
class TokenLevelKDConfig(FairseqDataclass):
    kd_ratio: float = field(
        default=0.5,
        metadata={"help": "weight of the KD term; CE gets 1 - kd_ratio (MiniLLM KD/DSKD: 0.5, DistiLLM: 1.0)"},
    )
    temperature: float = field(
        default=1.0, metadata={"help": "divides student and teacher logits before the divergence (no T^2)"}
    )
    kd_impl: ChoiceEnum(["plain", "chunked", "fused"]) = field(
        default="fused",
        metadata={"help": "how the loss is computed: plain (full fp32 [tokens, vocab] tensors), chunked "
                          "(--kd-chunk-size tokens at a time), fused (chunked with the output projection "
                          "fused in: no full logits); same results"},
    )
    kd_chunk_size: int = field(
        default=DEFAULT_CHUNK_SIZE, metadata={"help": "tokens per chunk for --kd-impl chunked/fused"}
    )
    lm_coef: float = field(
        default=1.0, metadata={"help": "weight of the extra LM term on the task's --lm-data batches (DistiLLM: 1); "
                                       "unused without --lm-data"}
    )


def student_side_loss(model, net_input, mask, labels, out, teachers, **kwargs) -> KDLoss:
    """``chunked_kd_loss`` on the student's logits at ``mask``, or ``fused_kd_loss`` on its hidden
    states when ``out`` (its ``output_projection.FusedOutput``) is given; ``kwargs`` go to either."""
    if out is None:
        return chunked_kd_loss(model(**net_input)[0][mask], labels, teachers, **kwargs)
    hidden = model(**net_input, features_only=True)[0][mask]
    return fused_kd_loss(hidden, out.weight, labels, teachers, fixed_columns=out.fixed, **kwargs)


def triton_chunk_kernel(device, divergence: str, temperature: float = 1.0, coef: float = 0.0):
    """``triton_kd``'s kernel as a chunk ``loss_and_grad`` for ``divergence`` on ``device``, or None
    (not CUDA, no triton, or a divergence it lacks)."""
    if torch.device(device).type != "cuda":
        return None
    from .. import triton_kd  # here: importing triton costs every CPU process 0.25 s at start-up

    if not triton_kd.available(device, divergence):
        return None

    def loss_and_grad(s, t, labels, r, need_grad):
        kd, ce, grad = triton_kd.kd_rows_and_grad(s, t, labels, divergence, r, temperature, coef,
                                                  grad_dtype=torch.float32)
        return ce.sum(), kd.sum(), grad if need_grad else None

    return loss_and_grad


def log_token_means(logging_outputs, keys, base2: bool = True, round: int = 3) -> None:
    """Log each of ``keys`` summed over the logging outputs per student label (``ntokens``), in base 2
    (nats / ln 2) unless ``base2`` is False; ``keys`` may map logged names to logging-output keys."""
    n = sum(log.get("ntokens", 0) for log in logging_outputs)
    if n > 0:
        scale = n * (math.log(2) if base2 else 1.0)
        for name, key in (keys.items() if isinstance(keys, dict) else zip(keys, keys)):
            metrics.log_scalar(name, sum(log.get(key, 0) for log in logging_outputs) / scale, n, round=round)


def check_unit_interval(name: str, value: float):
    check(0.0 <= value <= 1.0, f"--{name} must be in [0, 1], got {value}")


class TokenLevelKDCriterion(FairseqCriterion):
    """Needs ``task.teacher``. Subclasses set their config and ``divergence(student, teacher)``;
    options named in ``unit_interval_options`` are checked to lie in [0, 1] (``check_options``, which
    distill-chain also runs on every stage before training)."""

    unit_interval_options = ()
    trains_on_lm_batch = True  # the task may pass --lm-data batches (sample["lm"])
    teachers_taken = 1  # how many --teacher-path/--teacher-cache entries it reads (None: any number)

    @classmethod
    def check_options(cls, cfg, teachers: int):
        """One-line errors for option values out of range (``teachers``: how many are given)."""
        for name in ("kd_ratio",) + tuple(cls.unit_interval_options):
            check_unit_interval(name.replace("_", "-"), getattr(cfg, name))
        check(cfg.temperature > 0, f"--temperature must be > 0, got {cfg.temperature}")
        check(cfg.kd_chunk_size >= 1, f"--kd-chunk-size must be >= 1, got {cfg.kd_chunk_size}")
        check(cfg.lm_coef >= 0, f"--lm-coef must be >= 0, got {cfg.lm_coef}")

    def __init__(self, task, cfg: TokenLevelKDConfig):
        super().__init__(task)
        self.cfg = cfg
        self.check_options(cfg, len(getattr(task, "teachers", None) or ()))
        name = getattr(cfg, "_name", None) or type(self).__name__
        if not hasattr(task, "teacher"):  # another task (e.g. fairseq's language_modeling) has no teacher
            task_name = getattr(getattr(task, "cfg", None), "_name", type(task).__name__)
            raise DistillError(f"--criterion {name} needs a teacher, which --task {task_name} cannot load: use "
                               "--task instruction_distillation with --teacher-path")
        if getattr(task, "teacher", None) is None:
            raise DistillError(
                f"--criterion {name} needs a teacher: pass --teacher-path "
                "(or use --criterion cross_entropy for supervised fine-tuning)"
            )
        self.kd_ratio, self.temperature = cfg.kd_ratio, cfg.temperature

    def divergence(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def kd_term(self, student: torch.Tensor, sample, mask: torch.Tensor):
        """Summed KD term over the response tokens (``student`` = their logits [N, V]) and extra
        logging entries (summed over micro-batches); multi-teacher criterions override this."""
        teacher = dense_rows(self.task.teacher.rows(sample["net_input"], mask, fused=False))
        return self.divergence(student, teacher).sum(), {}

    def plain_terms(self, model, sample, mask):
        """The plain form: the student's logits at ``mask`` [N, V], the summed KD term and extra
        logging entries; criterions that need more of the student than its logits override this."""
        student = model(**sample["net_input"])[0][mask]
        kd, extra = self.kd_term(student, sample, mask)
        return student, kd, extra

    def chunk_loss_and_grad(self):
        """Optional analytic form of a chunk's loss for --kd-impl chunked/fused (see
        ``chunked_divergences.forward_kl_loss_and_grad``); None: autograd through ``divergence``."""
        return None

    def chunk_teachers(self, sample, mask):
        """What ``divergence`` gets, a chunk of rows at a time, for --kd-impl chunked/fused: the
        teacher's logits at ``mask``; for fused made chunk by chunk from its hidden states when it has
        a plain output projection (``ProjectedLogits``), or rebuilt chunk by chunk from a
        ``--teacher-cache``. A list gives ``divergence`` a list of chunks."""
        return self.task.teacher.rows(sample["net_input"], mask, fused=self.cfg.kd_impl == "fused")

    def chunk_divergence(self):
        """(divergence, part_weights) for --kd-impl chunked/fused: ``divergence`` by default; a
        criterion with several KD parts returns a divergence giving [n, K] columns D_k and their
        weights w_k (``chunked_divergences``), and logs the parts' sums with ``part_logs``."""
        return self.divergence, None

    def part_logs(self, parts: torch.Tensor) -> dict:
        return {}

    def triton_loss_and_grad(self, device):
        """The chunk kernel of ``triton_kd`` for this criterion on ``device``, or None."""
        spec = TRITON_KERNELS.get(getattr(self.cfg, "_name", None))
        if spec is None:
            return None
        return triton_chunk_kernel(device, spec[0], self.temperature, getattr(self.cfg, spec[1]) if spec[1] else 0.0)

    def memory_efficient_loss(self, model, sample, mask, labels, teachers):
        """``KDLoss`` (loss, ce, kd, parts) of --kd-impl chunked/fused (``chunked_divergences``) with
        ``teachers`` = ``chunk_teachers(sample, mask)``."""
        divergence, part_weights = self.chunk_divergence()
        loss_and_grad = None
        if part_weights is None:
            loss_and_grad = self.triton_loss_and_grad(labels.device) or self.chunk_loss_and_grad()
        kwargs = dict(divergence=divergence, kd_ratio=self.kd_ratio, chunk_size=self.cfg.kd_chunk_size,
                      loss_and_grad=loss_and_grad, part_weights=part_weights)
        out = self.fusable_output_projection(model) if self.cfg.kd_impl == "fused" else None
        return student_side_loss(model, sample["net_input"], mask, labels, out, teachers, **kwargs)

    def fusable_output_projection(self, model):
        """The student's ``output_projection.FusedOutput`` for --kd-impl fused, or None (adaptive
        softmax, a bias, logits beyond ``hidden @ weight.T``): then chunked, with a notice."""
        out = fusable_output(model)
        if out is None and not getattr(self, "_told_unfusable", False):
            logger.info(f"--kd-impl fused: the logits of {type(unwrap(model)).__name__} are more than "
                        "hidden @ weight.T; using --kd-impl chunked")
            self._told_unfusable = True
        return out

    def uses_memory_efficient_loss(self) -> bool:
        cls = type(self)
        own_kd_term = cls.kd_term is TokenLevelKDCriterion.kd_term
        return self.cfg.kd_impl != "plain" and (own_kd_term or cls.chunk_teachers is not TokenLevelKDCriterion.chunk_teachers)

    def loss_terms(self, model, sample, mask, labels):
        """(loss, CE sum, KD sum, extra logging entries) over the response tokens at ``mask``:
        ``memory_efficient_loss`` for --kd-impl chunked/fused, else ``plain_terms``. Criterions whose
        loss is more than this mix override it (dual-space KD)."""
        if self.uses_memory_efficient_loss():
            teachers = self.chunk_teachers(sample, mask)
            loss, ce, kd, parts = self.memory_efficient_loss(model, sample, mask, labels, teachers)
            # a teacher source may carry logging entries of its own (cross-tokenizer: ``aligned_tokens``)
            return loss, ce, kd, {**(self.part_logs(parts) if parts is not None else {}), **getattr(teachers, "logs", {})}
        student, kd, extra = self.plain_terms(model, sample, mask)
        ce = F.cross_entropy(student.float(), labels, reduction="sum")
        return (1.0 - self.kd_ratio) * ce + self.kd_ratio * kd, ce, kd, extra

    def forward(self, model, sample, reduce=True):
        target = sample["target"]
        mask = target.ne(self.padding_idx)  # only response tokens (and their EOS) take part
        labels = target[mask]
        loss, ce, kd, extra = self.loss_terms(model, sample, mask, labels)
        ntokens = labels.numel()  # known since target[mask]; int(mask.sum()) would wait for the GPU here
        lm = sample.get("lm")
        if lm is not None:
            lm_sum, lm_tokens = self.lm_term(model, lm)
            if self.cfg.lm_coef > 0 and lm_tokens > 0:
                loss = loss + (self.cfg.lm_coef * ntokens / lm_tokens) * lm_sum
            extra = {**extra, "lm_loss": lm_sum.data, "lm_ntokens": lm_tokens}
        logging_output = {
            "loss": loss.data,
            "nll_loss": ce.data,
            "kd_loss": kd.data,
            "ntokens": ntokens,
            "nsentences": target.size(0),
            "sample_size": ntokens,
            **extra,
        }
        return loss, ntokens, logging_output

    def lm_term(self, model, lm):
        """Summed CE of the student on an --lm-data batch and its number of labels; chunked and fused
        as the main term (``--kd-impl``), so the LM batch's logits are never full-size with fused."""
        target = lm["target"]
        mask = target.ne(self.padding_idx)
        labels = target[mask]
        if self.cfg.kd_impl == "plain":
            logits = model(**lm["net_input"])[0][mask]
            return F.cross_entropy(logits.float(), labels, reduction="sum"), labels.numel()
        out = self.fusable_output_projection(model) if self.cfg.kd_impl == "fused" else None
        ce = student_side_loss(model, lm["net_input"], mask, labels, out, None, divergence=None, kd_ratio=0.0,
                               chunk_size=self.cfg.kd_chunk_size, loss_and_grad=cross_entropy_loss_and_grad)
        return ce.loss, labels.numel()

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        total = lambda key: sum(log.get(key, 0) for log in logging_outputs)  # noqa: E731
        sample_size = total("sample_size")
        denom = max(sample_size, 1) * math.log(2)
        metrics.log_scalar("loss", total("loss") / denom, sample_size, round=3)
        metrics.log_scalar("nll_loss", total("nll_loss") / denom, sample_size, round=3)
        metrics.log_scalar("kd_loss", total("kd_loss") / denom, sample_size, round=3)
        lm_tokens = total("lm_ntokens")
        if lm_tokens > 0:
            metrics.log_scalar("lm_loss", total("lm_loss") / lm_tokens / math.log(2), lm_tokens, round=3)
        if any("aligned_tokens" in log for log in logging_outputs) and total("ntokens") > 0:
            # cross-tokenizer criterions: the share of the student's labels that the teacher's logits taught
            metrics.log_scalar("aligned", total("aligned_tokens") / total("ntokens"), total("ntokens"), round=3)
        metrics.log_derived("ppl", lambda meters: utils.get_perplexity(meters["nll_loss"].avg))

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True
