"""ULD: universal logit distillation across tokenizers (Boizard et al. 2024), DSKD's form (spec 1d).

Both sequences are read from their first response label: the k-th response label of the student is
paired with the k-th of the teacher, for k below the shorter of the two responses (EOS included),
and D = sum over those pairs of ``divergences.universal_logit_distance`` (L1 between the sorted
probabilities). ``aligned_tokens`` logs how many student labels had a teacher partner.
"""
import torch
from fairseq.criterions import register_criterion

from ..divergences import universal_logit_distance
from .cross_tokenizer_kd import CrossTokenizerKDCriterion, row_ranks
from .token_level_kd import TokenLevelKDConfig


def paired_positions(mask, teacher_mask):
    """Boolean selections of ``x[mask]`` and ``y[teacher_mask]`` keeping, row by row, the first
    min(labels of the student, labels of the teacher) labels of each; the kept rows pair up in order."""
    s_rows, s_ranks = row_ranks(mask)
    t_rows, t_ranks = row_ranks(teacher_mask)
    k = mask.sum(1).minimum(teacher_mask.sum(1))
    return s_ranks < k[s_rows], t_ranks < k[t_rows]


@register_criterion("uld", dataclass=TokenLevelKDConfig)
class UniversalLogitDistillationCriterion(CrossTokenizerKDCriterion):
    def teacher_index(self, mask, target, teacher_mask, teacher_target):
        keep_s, keep_t = paired_positions(mask, teacher_mask)
        index = torch.full((keep_s.numel(),), -1, dtype=torch.long, device=mask.device)
        index[keep_s] = keep_t.nonzero(as_tuple=True)[0]
        return index

    def divergence(self, student_logits, taught):
        teacher_logits, taught, _labels = taught
        d = universal_logit_distance(student_logits, teacher_logits, temperature=self.temperature)
        return d * taught
