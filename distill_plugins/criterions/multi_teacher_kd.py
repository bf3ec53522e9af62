"""Distillation from several teachers at once, each with its own weight and divergence.

    loss = (1 - kd_ratio) * CE(student, labels) + kd_ratio * sum_k w_k D_k(teacher_k || student)

Teachers are the comma-separated ``--teacher-path`` checkpoints, in order; ``--teacher-weights``
gives w_k (>= 0, not renormalised) and ``--teacher-divergences`` D_k (names of
``distill_plugins.divergences.DIVERGENCES``, ``kd`` = ``forward_kl``). Mixing the teacher and its
teaching assistant this way is the multi-teacher variant of TAKD (Mirzadeh et al. 2020; the LLM
replication in ``../shared/specs/methods.md`` section 4 chains single teachers). Masking, reduction
and the CE term are those of ``TokenLevelKDCriterion``; ``kd_loss`` logs the weighted sum and
``kd_loss_<k>`` the unweighted D_k of teacher k (0-based, in ``--teacher-path`` order).
"""
import math
from dataclasses import dataclass, field
from typing import Callable, List

import torch
from fairseq.criterions import register_criterion
from fairseq.logging import metrics

from ..chunked_divergences import dense_rows
from ..divergences import DIVERGENCES
from ..errors import DistillError, check
from .token_level_kd import TokenLevelKDConfig, TokenLevelKDCriterion

ALIASES = {"kd": "forward_kl"}  # criterion name -> divergence name
# divergence name -> (keyword of the divergence function, config option giving it)
DIVERGENCE_OPTIONS = {
    "skew_kl": ("alpha", "skew_alpha"),
    "skew_reverse_kl": ("alpha", "skew_alpha"),
    "js": ("beta", "js_beta"),
    "adaptive_kl": ("alpha", "adaptive_kl_alpha"),
}


def divergence_names() -> List[str]:
    return sorted(set(DIVERGENCES) | set(ALIASES))


@dataclass
class MultiTeacherKDConfig(TokenLevelKDConfig):
    teacher_weights: str = field(
        default="", metadata={"help": "comma-separated weight >= 0 per --teacher-path checkpoint (default: 1/K each)"}
    )
    teacher_divergences: str = field(
        default="", metadata={"help": "comma-separated divergence per teacher, e.g. kd,skew_kl (default: forward_kl each)"}
    )
    skew_alpha: float = field(default=0.1, metadata={"help": "skew a in [0, 1] of skew_kl / skew_reverse_kl"})
    js_beta: float = field(default=0.5, metadata={"help": "b in [0, 1] of js"})
    adaptive_kl_alpha: float = field(default=0.5, metadata={"help": "tail mass in [0, 1] of adaptive_kl"})


def _split(text: str) -> List[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def parse_weights(text: str, n_teachers: int) -> List[float]:
    if not text.strip():
        return [1.0 / n_teachers] * n_teachers
    try:
        weights = [float(x) for x in _split(text)]
    except ValueError:
        raise DistillError(f"--teacher-weights {text!r} is not a comma-separated list of numbers, e.g. 0.5,0.5") from None
    check(
        len(weights) == n_teachers,
        f"--teacher-weights gives {len(weights)} weight(s) for {n_teachers} teacher(s) in --teacher-path; give one per teacher",
    )
    check(all(math.isfinite(w) and w >= 0 for w in weights), f"--teacher-weights must be finite and >= 0, got {text}")
    check(sum(weights) > 0, "--teacher-weights are all 0; give at least one teacher a positive weight")
    return weights


def parse_divergences(text: str, n_teachers: int) -> List[str]:
    names = _split(text) or ["forward_kl"] * n_teachers
    check(
        len(names) == n_teachers,
        f"--teacher-divergences gives {len(names)} name(s) for {n_teachers} teacher(s) in --teacher-path; give one per teacher",
    )
    for name in names:
        check(
            name in DIVERGENCES or name in ALIASES,
            f"unknown divergence {name!r} in --teacher-divergences; choose from {', '.join(divergence_names())}",
        )
    return [ALIASES.get(n, n) for n in names]


@register_criterion("multi_teacher_kd", dataclass=MultiTeacherKDConfig)
class MultiTeacherKDCriterion(TokenLevelKDCriterion):
    unit_interval_options = ("skew_alpha", "js_beta", "adaptive_kl_alpha")
    teachers_taken = None  # any number

    @classmethod
    def check_options(cls, cfg, teachers: int):
        super().check_options(cfg, teachers)
        if teachers:  # none: the teacher check names the problem
            parse_weights(cfg.teacher_weights, teachers)
            parse_divergences(cfg.teacher_divergences, teachers)

    def __init__(self, task, cfg: MultiTeacherKDConfig):
        super().__init__(task, cfg)  # checks the options and that a teacher exists
        n = len(task.teachers)
        self.weights = parse_weights(cfg.teacher_weights, n)
        self.divergence_names = parse_divergences(cfg.teacher_divergences, n)
        self.divergences = [self._bind(name) for name in self.divergence_names]

    def _bind(self, name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        fn = DIVERGENCES[name]
        kwargs = {"temperature": self.temperature}
        if name in DIVERGENCE_OPTIONS:
            keyword, option = DIVERGENCE_OPTIONS[name]
            kwargs[keyword] = getattr(self.cfg, option)
        return lambda student, teacher: fn(student, teacher, **kwargs)

    def kd_term(self, student, sample, mask):
        total, logs = 0.0, {}
        for k, (teacher, weight, divergence) in enumerate(zip(self.task.teachers, self.weights, self.divergences)):
            d_k = divergence(student, dense_rows(teacher.rows(sample["net_input"], mask, fused=False))).sum()
            logs[f"kd_loss_{k}"] = d_k.data
            total = total + weight * d_k
        return total, logs

    # --kd-impl chunked/fused: every chunk gets each teacher's rows; the D_k are [n, K] columns
    def chunk_teachers(self, sample, mask):
        fused = self.cfg.kd_impl == "fused"
        return [teacher.rows(sample["net_input"], mask, fused) for teacher in self.task.teachers]

    def chunk_divergence(self):
        divergences = self.divergences

        def per_teacher(student, teachers):
            return torch.stack([d(student, t) for d, t in zip(divergences, teachers)], dim=-1)

        return per_teacher, self.weights

    def part_logs(self, parts):
        return {f"kd_loss_{k}": parts[k] for k in range(parts.numel())}

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        super().reduce_metrics(logging_outputs)
        keys = sorted({k for log in logging_outputs for k in log if k.startswith("kd_loss_")})
        sample_size = sum(log.get("sample_size", 0) for log in logging_outputs)
        denom = max(sample_size, 1) * math.log(2)
        for key in keys:
            metrics.log_scalar(key, sum(log.get(key, 0) for log in logging_outputs) / denom, sample_size, round=3)
