"""Adaptive KL (Wu et al. 2024): FKL and RKL weighted by the head/tail gaps; tail mass --adaptive-kl-alpha."""
from dataclasses import dataclass, field

from fairseq.criterions import register_criterion

from ..divergences import adaptive_kl
from .token_level_kd import TokenLevelKDConfig, TokenLevelKDCriterion


@dataclass
class AdaptiveKLConfig(TokenLevelKDConfig):
    adaptive_kl_alpha: float = field(default=0.5, metadata={"help": "teacher probability mass in [0, 1] that makes up the tail"})


@register_criterion("adaptive_kl", dataclass=AdaptiveKLConfig)
class AdaptiveKLCriterion(TokenLevelKDCriterion):
    unit_interval_options = ("adaptive_kl_alpha",)

    def divergence(self, student_logits, teacher_logits):
        return adaptive_kl(student_logits, teacher_logits, alpha=self.cfg.adaptive_kl_alpha, temperature=self.temperature)
