"""Base of the cross-tokenizer criterions (``uld``, ``min_ed``, ``dskd_cma``, ``multi_cost_ot``): teacher
and student tokenize the same example differently, so their label positions and vocabularies differ.

    loss = (1 - kd_ratio) * CE(student, labels) + kd_ratio * D

The teacher runs on its own tokenization (``sample["teacher"]``, from ``--teacher-data``;
``data/paired_tokenizations.py``). CE, ``sample_size`` = the student's response tokens, the
``--lm-data`` term and the logged ``loss``/``nll_loss``/``kd_loss`` are those of ``token_level_kd``.

A subclass says which teacher label teaches each student label (``teacher_index``) and what the
divergence of a student row and its teacher row is (``divergence(student, (teacher rows, taught,
labels))``; the untaught rows' teacher rows are placeholders). ``--kd-impl`` picks the form, as for the one-tokenizer losses (same
values and gradients): ``plain`` materialises both models' float32 logits at the response tokens
(``kd_term``, the reference form), ``chunked`` takes ``--kd-chunk-size`` student rows at a time,
each with its teacher rows, and ``fused`` also makes the student's and the teacher's logits from
their hidden states a chunk at a time (``TaughtRows``), so neither exists beyond a chunk.
"""
import json
import os
from typing import NamedTuple

import torch

from ..chunked_divergences import ProjectedLogits, TeacherSource, teacher_rows
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


class TaughtRows(NamedTuple):
    """The teacher's rows for the student's label rows, made a chunk at a time: ``rows(start, end)``
    gives (teacher logits [n, V_t] of the teacher label teaching each student row in [start, end)
    (untaught rows get the teacher's first row, to be ignored), taught [n] bool, the student's labels [n])."""

    source: TeacherSource  # the teacher's logits at its labels [N_t, V_t] (tensor or ProjectedLogits)
    index: torch.Tensor  # [N_s]: the teacher row teaching each student row, -1 for none
    labels: torch.Tensor  # [N_s]: the student's labels
    logs: dict  # logging entries of the batch (``aligned_tokens``)

    def rows(self, start: int, end: int):
        index = self.index[start:end]
        rows = index.clamp_min(0)
        if isinstance(self.source, ProjectedLogits):
            src = self.source
            logits = ProjectedLogits(src.hidden[rows], src.weight, src.fixed).rows(0, rows.numel())
        else:
            logits = teacher_rows(self.source, 0, self.source.size(0))[rows]
        return logits, index.ge(0), self.labels[start:end]

    def size(self, dim: int) -> int:
        return self.index.numel() if dim == 0 else self.source.size(1)


class CrossTokenizerKDCriterion(TokenLevelKDCriterion):
    cross_tokenizer = True  # the task feeds the teacher its own tokenization (--teacher-data)

    def __init__(self, task, cfg):  # the task checked that it has --teacher-data (build_criterion)
        super().__init__(task, cfg)
        self.teacher_pad = task.teacher_side_task().dictionary.pad()

    def teacher_index(self, mask, target, teacher_mask, teacher_target) -> torch.Tensor:
        """[N_s] long on ``mask``'s device: for each student label (``target[mask]``), the index into
        ``teacher_target[teacher_mask]`` of the teacher label that teaches it, -1 for none."""
        raise NotImplementedError

    def teacher_side(self, sample):
        side = sample["teacher"]
        return side, side["target"].ne(self.teacher_pad)

    def taught_rows(self, sample, mask, fused: bool) -> TaughtRows:
        side, teacher_mask = self.teacher_side(sample)
        source = self.task.teacher.rows(side["net_input"], teacher_mask, fused=fused)
        index = self.teacher_index(mask, sample["target"], teacher_mask, side["target"])
        return TaughtRows(source, index, sample["target"][mask], {"aligned_tokens": int(index.ge(0).sum())})

    def kd_term(self, student, sample, mask):
        """The plain form: the teacher's logits at its labels, gathered for all the student's rows."""
        taught = self.taught_rows(sample, mask, fused=False)
        return self.divergence(student, taught.rows(0, taught.size(0))).sum(), taught.logs

    def chunk_teachers(self, sample, mask):
        return self.taught_rows(sample, mask, fused=self.cfg.kd_impl == "fused")
