"""Base of the cross-tokenizer criterions (``uld``, ``min_ed``, ``dskd_cma``, ``multi_cost_ot``): teacher and student tokenize the
same example differently, so their label positions and vocabularies differ.

    loss = (1 - kd_ratio) * CE(student, labels) + kd_ratio * D

The teacher runs on its own tokenization (``sample["teacher"]``, from ``--teacher-data``;
``data/paired_tokenizations.py``); a subclass's ``cross_kd`` turns the student's and the teacher's
logits at their response labels into the summed KD term D. CE, ``sample_size`` = the student's
response tokens, the ``--lm-data`` term and the logged ``loss``/``nll_loss``/``kd_loss`` are those
of ``token_level_kd``. The loss is computed in its plain form (full float32 logits of both models at
the response tokens); ``--kd-impl`` does not apply.
"""
import json
import os

import torch

from ..errors import DistillError
from ..token_alignment import ALIGNMENT_FILE
from .token_level_kd import TokenLevelKDCriterion


def row_ranks(mask: torch.Tensor):
    """For the ``True`` entries of ``mask`` [B, T] in row-major order (the order of ``x[mask]``):
    their row and their rank within the row (0 for a row's first label)."""
    rows = mask.nonzero(as_tuple=True)[0]
    ranks = (mask.long().cumsum(1) - 1)[mask]
    return rows, ranks


def rows_by_example(mask: torch.Tensor):
    """Slices of ``x[mask]`` by row of ``mask``: [(start, end)] for every row."""
    ends = mask.sum(1).cumsum(0).tolist()
    return list(zip([0] + ends[:-1], ends))


def padded_rows(x: torch.Tensor, mask: torch.Tensor):
    """``x`` = rows at ``mask`` [B, T] ([N, ...], the order of ``y[mask]``) -> ([B, L, ...] with L the
    most rows of one example, zeros after each example's own; [B, L] True at its rows)."""
    rows, ranks = row_ranks(mask)
    counts = mask.sum(1)
    longest = int(counts.max()) if counts.numel() else 0
    out = x.new_zeros((mask.size(0), longest, *x.shape[1:]))
    out = out.index_put((rows, ranks), x)
    valid = torch.arange(longest, device=mask.device).unsqueeze(0) < counts.unsqueeze(1)
    return out, valid


def load_alignment(task):
    """(student token strings, teacher token strings, teacher -> student id mapping) from the
    ``alignment.json`` of ``--teacher-data`` (written by distill-prepare), checked against the data's
    dictionaries."""
    path = os.path.join(task.cfg.teacher_data, ALIGNMENT_FILE)
    if not os.path.isfile(path):
        raise DistillError(f"{task.cfg.teacher_data} has no {ALIGNMENT_FILE}; prepare the data with distill-prepare "
                           "--teacher-spm-model/--teacher-hf-tokenizer")
    with open(path, encoding="utf-8") as f:
        alignment = json.load(f)
    student, teacher = alignment["student_tokens"], alignment["teacher_tokens"]
    teacher_dict = task.teacher_side_task().dictionary
    if len(student) != len(task.dictionary) or len(teacher) != len(teacher_dict):
        raise DistillError(f"{path} was made for other dictionaries (sizes {len(student)}/{len(teacher)}, the data "
                           f"has {len(task.dictionary)}/{len(teacher_dict)}); prepare the data again")
    return student, teacher, alignment["teacher_to_student"]


class CrossTokenizerKDCriterion(TokenLevelKDCriterion):
    cross_tokenizer = True  # the task feeds the teacher its own tokenization (--teacher-data)

    def __init__(self, task, cfg):  # the task checked that it has --teacher-data (build_criterion)
        super().__init__(task, cfg)
        self.teacher_pad = task.teacher_side_task().dictionary.pad()

    def uses_memory_efficient_loss(self) -> bool:
        return False

    def kd_term(self, student, sample, mask):
        side = sample["teacher"]
        teacher_mask = side["target"].ne(self.teacher_pad)
        teacher = self.task.teacher.logits(side["net_input"])[teacher_mask]  # [N_t, V_t]
        return self.cross_kd(student, mask, sample["target"], teacher, teacher_mask, side["target"])

    def cross_kd(self, student, mask, target, teacher, teacher_mask, teacher_target):
        """Summed KD term and extra logging entries from the student's logits ``student`` [N, V_s]
        at ``mask`` (labels ``target``) and the teacher's ``teacher`` [N_t, V_t] at ``teacher_mask``."""
        raise NotImplementedError

