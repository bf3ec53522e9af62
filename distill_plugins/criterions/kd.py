"""Forward KL, KL(p || q): word-level KD (Hinton et al. 2015; Kim & Rush 2016)."""
from dataclasses import dataclass

from fairseq.criterions import register_criterion

from ..divergences import forward_kl
from .token_level_kd import TokenLevelKDConfig, TokenLevelKDCriterion


@dataclass
class ForwardKLConfig(TokenLevelKDConfig):
    pass


@register_criterion("kd", dataclass=ForwardKLConfig)
class ForwardKLCriterion(TokenLevelKDCriterion):
    def divergence(self, student_logits, teacher_logits):
        return forward_kl(student_logits, teacher_logits, temperature=self.temperature)
