"""Skew KL, KL(p || a p + (1 - a) q) (DistiLLM, Ko et al. 2024), a = --skew-alpha."""
from dataclasses import dataclass, field

from fairseq.criterions import register_criterion

from ..divergences import skew_kl
from .token_level_kd import TokenLevelKDConfig, TokenLevelKDCriterion


@dataclass
class SkewKLConfig(TokenLevelKDConfig):
    skew_alpha: float = field(default=0.1, metadata={"help": "skew a in [0, 1]; 0 gives forward KL"})


@register_criterion("skew_kl", dataclass=SkewKLConfig)
class SkewKLCriterion(TokenLevelKDCriterion):
    unit_interval_options = ("skew_alpha",)

    def divergence(self, student_logits, teacher_logits):
        return skew_kl(student_logits, teacher_logits, alpha=self.cfg.skew_alpha, temperature=self.temperature)
