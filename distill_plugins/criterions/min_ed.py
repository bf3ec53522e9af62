"""MinED: forward KL to the teacher mapped onto the student's vocabulary by minimum edit distance
(FuseLLM, Wan et al. 2024; DSKD's ``min_edit_dis_kld``, spec 1d).

Per example, the student's and the teacher's response labels (EOS included) are aligned by dynamic
time warping with the edit distance of their strings (``token_alignment.dtw_alignment``). A student
label aligned to exactly one teacher label u, where the teacher -> student vocabulary mapping
(least edit distance, ``alignment.json`` of ``--teacher-data``) takes u to that very student label,
is taught by the teacher's logits at u moved to the student's vocabulary: every student token gets
the logit of the first (lowest-id) teacher token mapped to it, unmapped ones -1e5. (The spec's "max
logit over its mapped teacher ids" is over DSKD's ``stu2tea_id_mapping`` lists, which
``max_align_num = 1`` cuts to their first id; a max over every mapped id, done here before session
19, differs wherever several teacher tokens share a student token.) Every other student label
is taught a one-hot "teacher" on itself (logit 100, -1e5 elsewhere). D = sum of
``forward_kl(student, that teacher, --temperature)``. ``aligned_tokens`` logs the labels taught by
the teacher. Alignments are kept per example (they depend on its tokens only).
"""
import torch
from fairseq.criterions import register_criterion

from ..divergences import forward_kl
from ..token_alignment import dtw_alignment
from .cross_tokenizer_kd import CrossTokenizerKDCriterion, load_alignment, rows_by_example
from .token_level_kd import TokenLevelKDConfig

UNMAPPED_LOGIT = -1e5
ONE_HOT_LOGIT = 100.0


def teacher_rows_for_student(student_ids, teacher_ids, student_tokens, teacher_tokens, teacher_to_student):
    """For each student label, the index of the teacher label that teaches it, or -1 (one-hot)."""
    # DSKD's order, dtw(teacher, student): a tie prefers the diagonal, then a step along the teacher
    by_teacher = dtw_alignment([teacher_tokens[j] for j in teacher_ids], [student_tokens[i] for i in student_ids])
    aligned = [[] for _ in student_ids]
    for j, students in enumerate(by_teacher):
        for i in students:
            aligned[i].append(j)
    out = []
    for s_id, js in zip(student_ids, aligned):
        ok = len(js) == 1 and teacher_to_student[teacher_ids[js[0]]] == s_id
        out.append(js[0] if ok else -1)
    return out


def first_teacher_ids(teacher_to_student, student_vocab: int) -> torch.Tensor:
    """[V_s]: the lowest teacher id that ``teacher_to_student`` [V_t] maps to each student id, -1 for
    none (DSKD's ``stu2tea_id_mapping`` with ``max_align_num = 1``)."""
    mapping = torch.as_tensor(teacher_to_student, dtype=torch.long)
    first = torch.full((student_vocab,), mapping.numel(), dtype=torch.long)
    first = first.scatter_reduce(0, mapping, torch.arange(mapping.numel()), reduce="amin", include_self=True)
    return first.masked_fill(first == mapping.numel(), -1)


def teacher_in_student_vocab(teacher_rows, first_teacher):
    """[N, V_t] teacher logits -> [N, V_s] (float32): each student token takes the logit of its
    ``first_teacher`` id ([V_s], ``first_teacher_ids``); student tokens nobody maps to get -1e5."""
    index = first_teacher.to(teacher_rows.device)
    out = teacher_rows.float().index_select(1, index.clamp(min=0))
    return out.masked_fill(index.lt(0).unsqueeze(0), UNMAPPED_LOGIT)


@register_criterion("min_ed", dataclass=TokenLevelKDConfig)
class MinEditDistanceKDCriterion(CrossTokenizerKDCriterion):
    def __init__(self, task, cfg):
        super().__init__(task, cfg)
        self.student_tokens, self.teacher_tokens, self.teacher_to_student = load_alignment(task)
        self._first_teacher = {}  # student vocabulary size (the logits') -> first_teacher_ids
        self._rows_cache = {}

    def teacher_rows(self, student_ids, teacher_ids):
        key = (tuple(student_ids), tuple(teacher_ids))
        if key not in self._rows_cache:
            self._rows_cache[key] = teacher_rows_for_student(
                student_ids, teacher_ids, self.student_tokens, self.teacher_tokens, self.teacher_to_student)
        return self._rows_cache[key]

    def teacher_index(self, mask, target, teacher_mask, teacher_target):
        labels, teacher_labels = target[mask].tolist(), teacher_target[teacher_mask].tolist()
        chosen = []  # per student label: the row of the teacher's labels that teaches it, or -1
        for (s0, s1), (t0, t1) in zip(rows_by_example(mask), rows_by_example(teacher_mask)):
            rows = self.teacher_rows(labels[s0:s1], teacher_labels[t0:t1])
            chosen += [t0 + j if j >= 0 else -1 for j in rows]
        return torch.tensor(chosen, dtype=torch.long, device=mask.device)

    def divergence(self, student_logits, taught):
        teacher_logits, taught, labels = taught
        goal = student_logits.new_full(student_logits.shape, UNMAPPED_LOGIT, dtype=torch.float32)
        goal[torch.arange(goal.size(0), device=goal.device), labels] = ONE_HOT_LOGIT
        if taught.any():
            vocab = student_logits.size(-1)
            if vocab not in self._first_teacher:
                self._first_teacher[vocab] = first_teacher_ids(self.teacher_to_student, vocab)
            goal[taught] = teacher_in_student_vocab(teacher_logits[taught], self._first_teacher[vocab])
        return forward_kl(student_logits, goal, temperature=self.temperature)
