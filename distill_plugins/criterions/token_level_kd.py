"""Base of the token-level distillation criterions: masks, CE/KD mixing, reduction and logging.

    loss = (1 - kd_ratio) * CE(student, labels) + kd_ratio * D(teacher || student)

summed over response tokens (prompt and padding positions are never labels) with
``sample_size = ntokens``; fairseq's trainer divides by the summed sample size of all micro-batches
and workers, so the loss is a token mean over the *global* batch, exact under gradient
accumulation and data parallelism (DSKD's reduction; DistiLLM/MiniLLM average per micro-batch).
D is one of ``distill_plugins.divergences``, always in float32. Logged ``loss``, ``nll_loss`` (the
CE term) and ``kd_loss`` are per-token and in base 2, like fairseq's own criterions.
Subclasses only say which divergence they use and with which extra options.
"""
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from fairseq import utils
from fairseq.criterions import FairseqCriterion
from fairseq.dataclass import FairseqDataclass
from fairseq.logging import metrics

from ..errors import DistillError, check


@dataclass
class TokenLevelKDConfig(FairseqDataclass):
    kd_ratio: float = field(
        default=0.5,
        metadata={"help": "weight of the KD term; CE gets 1 - kd_ratio (MiniLLM KD/DSKD: 0.5, DistiLLM: 1.0)"},
    )
    temperature: float = field(
        default=1.0, metadata={"help": "divides student and teacher logits before the divergence (no T^2)"}
    )


def check_unit_interval(name: str, value: float):
    check(0.0 <= value <= 1.0, f"--{name} must be in [0, 1], got {value}")


class TokenLevelKDCriterion(FairseqCriterion):
    """Needs ``task.teacher``. Subclasses set their config and ``divergence(student, teacher)``;
    options named in ``unit_interval_options`` are checked to lie in [0, 1]."""

    unit_interval_options = ()

    def __init__(self, task, cfg: TokenLevelKDConfig):
        super().__init__(task)
        self.cfg = cfg
        for name in ("kd_ratio",) + tuple(self.unit_interval_options):
            check_unit_interval(name.replace("_", "-"), getattr(cfg, name))
        check(cfg.temperature > 0, f"--temperature must be > 0, got {cfg.temperature}")
        if getattr(task, "teacher", None) is None:
            raise DistillError(
                f"criterion {self.__class__.__name__} needs a teacher: pass --teacher-path "
                "(or use --criterion cross_entropy for supervised fine-tuning)"
            )
        self.kd_ratio, self.temperature = cfg.kd_ratio, cfg.temperature

    def divergence(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def teacher_logits(self, sample) -> torch.Tensor:
        return self.task.teacher.logits(sample["net_input"])

    def forward(self, model, sample, reduce=True):
        logits = model(**sample["net_input"])[0]
        target = sample["target"]
        mask = target.ne(self.padding_idx)
        student = logits[mask]  # [N, V]: only response tokens take part
        labels = target[mask]
        teacher = self.teacher_logits(sample)[mask]
        ce = F.cross_entropy(student.float(), labels, reduction="sum")
        kd = self.divergence(student, teacher).sum()
        loss = (1.0 - self.kd_ratio) * ce + self.kd_ratio * kd
        ntokens = int(mask.sum())
        logging_output = {
            "loss": loss.data,
            "nll_loss": ce.data,
            "kd_loss": kd.data,
            "ntokens": ntokens,
            "nsentences": sample["target"].size(0),
            "sample_size": ntokens,
        }
        return loss, ntokens, logging_output

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        total = lambda key: sum(log.get(key, 0) for log in logging_outputs)  # noqa: E731
        sample_size = total("sample_size")
        denom = max(sample_size, 1) * math.log(2)
        metrics.log_scalar("loss", total("loss") / denom, sample_size, round=3)
        metrics.log_scalar("nll_loss", total("nll_loss") / denom, sample_size, round=3)
        metrics.log_scalar("kd_loss", total("kd_loss") / denom, sample_size, round=3)
        metrics.log_derived("ppl", lambda meters: utils.get_perplexity(meters["nll_loss"].avg))

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True
