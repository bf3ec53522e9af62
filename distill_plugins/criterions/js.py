"""Generalized JSD, b KL(q || m) + (1 - b) KL(p || m), m = (1 - b) p + b q (GKD, Agarwal et al. 2024)."""
from dataclasses import dataclass, field

from fairseq.criterions import register_criterion

from ..divergences import js_divergence
from .token_level_kd import TokenLevelKDConfig, TokenLevelKDCriterion


@dataclass
class JSConfig(TokenLevelKDConfig):
    js_beta: float = field(default=0.5, metadata={"help": "b in [0, 1]; 0.5 is the classic JS divergence, 0.9 DistiLLM's GKD baseline"})


@register_criterion("js", dataclass=JSConfig)
class JSCriterion(TokenLevelKDCriterion):
    unit_interval_options = ("js_beta",)

    def divergence(self, student_logits, teacher_logits):
        return js_divergence(student_logits, teacher_logits, beta=self.cfg.js_beta, temperature=self.temperature)
