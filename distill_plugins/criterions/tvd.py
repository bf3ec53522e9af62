"""Total variation distance, 1/2 sum_v |p - q| (DistiLLM's tv_distance)."""
from dataclasses import dataclass

from fairseq.criterions import register_criterion

from ..divergences import total_variation
from .token_level_kd import TokenLevelKDConfig, TokenLevelKDCriterion


@dataclass
class TotalVariationConfig(TokenLevelKDConfig):
    pass


@register_criterion("tvd", dataclass=TotalVariationConfig)
class TotalVariationCriterion(TokenLevelKDCriterion):
    def divergence(self, student_logits, teacher_logits):
        return total_variation(student_logits, teacher_logits, temperature=self.temperature)
