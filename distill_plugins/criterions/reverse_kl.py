"""Reverse KL, KL(q || p), per token (the exact per-step term of MiniLLM, Gu et al. 2024)."""
from dataclasses import dataclass
from functools import partial

from fairseq.criterions import register_criterion

from ..chunked_divergences import reverse_kl_loss_and_grad
from ..divergences import reverse_kl
from .token_level_kd import TokenLevelKDConfig, TokenLevelKDCriterion


@dataclass
class ReverseKLConfig(TokenLevelKDConfig):
    pass


@register_criterion("reverse_kl", dataclass=ReverseKLConfig)
class ReverseKLCriterion(TokenLevelKDCriterion):
    def divergence(self, student_logits, teacher_logits):
        return reverse_kl(student_logits, teacher_logits, temperature=self.temperature)

    def chunk_loss_and_grad(self):
        return partial(reverse_kl_loss_and_grad, temperature=self.temperature)
