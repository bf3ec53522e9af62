"""Forward KL, KL(p || q): word-level KD (Hinton et al. 2015; Kim & Rush 2016)."""
from dataclasses import dataclass, field
from functools import partial

from fairseq.criterions import register_criterion

from ..chunked_divergences import forward_kl_loss_and_grad
from ..divergences import forward_kl
from .token_level_kd import TokenLevelKDConfig, TokenLevelKDCriterion


@dataclass
class ForwardKLConfig(TokenLevelKDConfig):
    kd_compile: bool = field(
        default=False,
        metadata={"help": "torch.compile the per-chunk forward-KL kernel of --kd-impl chunked/fused (compiles "
                          "on the first batches; about 2x faster loss on CPU)"},
    )


@register_criterion("kd", dataclass=ForwardKLConfig)
class ForwardKLCriterion(TokenLevelKDCriterion):
    def divergence(self, student_logits, teacher_logits):
        return forward_kl(student_logits, teacher_logits, temperature=self.temperature)

    def chunk_loss_and_grad(self):
        return partial(forward_kl_loss_and_grad, temperature=self.temperature, compiled=self.cfg.kd_compile)
