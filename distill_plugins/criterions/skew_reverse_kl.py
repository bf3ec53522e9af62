"""Skew reverse KL, KL(q || (1 - a) p + a q) (DistiLLM, Ko et al. 2024), a = --skew-alpha."""
from dataclasses import dataclass, field

from fairseq.criterions import register_criterion

from ..divergences import skew_reverse_kl
from .token_level_kd import TokenLevelKDConfig, TokenLevelKDCriterion


@dataclass
class SkewReverseKLConfig(TokenLevelKDConfig):
    skew_alpha: float = field(default=0.1, metadata={"help": "skew a in [0, 1]; 0 gives reverse KL"})


@register_criterion("skew_reverse_kl", dataclass=SkewReverseKLConfig)
class SkewReverseKLCriterion(TokenLevelKDCriterion):
    unit_interval_options = ("skew_alpha",)

    def divergence(self, student_logits, teacher_logits):
        return skew_reverse_kl(student_logits, teacher_logits, alpha=self.cfg.skew_alpha, temperature=self.temperature)
