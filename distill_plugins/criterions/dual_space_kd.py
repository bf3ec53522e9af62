"""Dual-space KD (DSKD, Zhang et al. 2024; DSKD's ``dual_space_kd.py`` and
``dual_space_kd_with_cross_model_attention.py``, spec section 1d).

    loss = (1 - kd_ratio) * CE(student, y) + kd_ratio * [CE(t2s, y) + D(student || sg(t2s)) + KL(teacher || s2t)]

t2s are the teacher's last hidden states projected into the student's space (``t2s`` projection)
and read out by the student's output layer (its weight detached); s2t the student's projected into
the teacher's space and read out by the frozen teacher's output layer. D is ``--dskd-divergence``
(DSKD's ``KD_OBJ``, default forward KL; ``sg``: no gradient into t2s). The projections are the
criterion's parameters (fairseq's optimizer and checkpoints take them; ``dual_space.py``).

* ``dskd``: one tokenizer; t2s and s2t at the same label positions.
* ``dskd_cma``: across tokenizers (``--teacher-data``): cross-model attention aligns the two
  sequences. Queries are the student's detached [input; next-token] embeddings through the
  ``query`` projection, keys the teacher's [input; next-token] embeddings divided by their std over
  the sequence's response positions (``dual_space.sequence_std``); t2s reads ``t2s``(teacher hidden /
  std + teacher next-token embedding / std) attended over the teacher's response positions, s2t reads
  ``s2t``(student hidden) attended over the student's (the transposed scores; the prompts are masked,
  as DSKD's ``align_mask`` of the labels). D counts only where argmax t2s is the label; KL(teacher || s2t) is taken
  at the teacher's labels, as a mean over them (scaled by student labels / teacher labels, since the
  loss is divided by the student's label count).

The hidden-state side (projections, attention) is computed for the whole batch; the vocabulary-sized
side (the four readouts and their losses, row-local) by ``--kd-impl``: ``plain`` in one piece, as
DSKD does (float32 [tokens, vocab] logits of the student, t2s, s2t and the teacher at once);
``chunked``/``fused`` --kd-chunk-size rows at a time, each chunk recomputed in the backward pass
(``dual_space.chunked_rows``), so no [tokens, vocab] tensor outlives its chunk; same values and
gradients (tests).

Logged: ``t2s_ce``, ``t2s_kd``, ``s2t_kl`` (per student label, base 2) and ``t2s_acc`` (share of labels
where argmax t2s is the label). DSKD gives the projections their own learning rate
(``--projector-lr``); here they train with the model's optimizer and learning rate.
"""
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from fairseq.criterions import register_criterion

from ..divergences import DIVERGENCES, forward_kl, get_divergence
from ..dual_space import (
    DualSpaceProjectors, chunked_rows, cross_model_attention, next_tokens, readout, sequence_std, token_embeddings,
)
from ..errors import DistillError, check
from ..optimal_transport import top_logits
from ..output_projection import fusable_output
from .cross_tokenizer_kd import CrossTokenizerKDCriterion
from .token_level_kd import TokenLevelKDConfig, TokenLevelKDCriterion, log_token_means


@dataclass
class DualSpaceKDConfig(TokenLevelKDConfig):
    dskd_divergence: str = field(
        default="forward_kl",
        metadata={"help": "D between the student and the teacher projected into its space (DSKD's KD_OBJ): "
                          + ", ".join(sorted(DIVERGENCES))},
    )


def output_layer(model, role: str):
    out = fusable_output(model)
    if out is None:
        raise DistillError(f"dual-space KD reads hidden states out through the {role}'s output layer, but the logits "
                           f"of {type(model).__name__} are more than hidden @ weight.T; use another criterion")
    return out


def dual_space_dims(task):
    student = getattr(task, "student_hidden_dim", None)
    check(student is not None, "dual-space KD needs a student whose logits are hidden @ weight.T (kd_gpt2_*, "
                               "hf_causal_lm); this student's output layer is more than that")
    teacher = output_layer(task.teacher.model, "teacher").weight.size(1)
    return student, teacher


class DualSpaceTerms:
    """What dskd and dskd_cma share: the projections (``cross_attention``: with the query one), the
    three KD terms, summed, and their logging entries."""

    reads_teacher_hidden_states = True  # a --teacher-cache holds logits only: refused by the task

    cross_attention = False

    @classmethod
    def check_options(cls, cfg, teachers: int):
        super().check_options(cfg, teachers)
        try:
            get_divergence(cfg.dskd_divergence)
        except ValueError as e:
            raise DistillError(f"--dskd-divergence: {e}") from None

    def __init__(self, task, cfg):
        super().__init__(task, cfg)
        self.kd_divergence = get_divergence(cfg.dskd_divergence)
        self.projectors = DualSpaceProjectors(*dual_space_dims(task), cross_attention=self.cross_attention)

    def chunk_size(self):
        """Rows per chunk of the vocabulary-sized side; None: one piece (--kd-impl plain)."""
        return None if self.cfg.kd_impl == "plain" else self.cfg.kd_chunk_size

    def student_side(self, hidden, t2s_hidden, labels, out, correct_only: bool, top_k: int = 0):
        """Sums [CE(student), CE(t2s), D(student || sg(t2s)) (where argmax t2s is the label if
        ``correct_only``), labels where it is] over the student's label rows, and their ``top_k``
        largest student logits, sorted ([N, 0] if 0)."""
        def rows(h, t2s_h, y):
            student = readout(h, out.weight, out.fixed)
            t2s = readout(t2s_h, out.weight.detach(), out.fixed)
            d = self.divergence(student, t2s.detach())
            correct = t2s.detach().argmax(-1).eq(y)
            sums = torch.stack([F.cross_entropy(student, y, reduction="sum"), F.cross_entropy(t2s, y, reduction="sum"),
                                (d * correct).sum() if correct_only else d.sum(), correct.sum().to(d.dtype)])
            return sums, top_logits(student, top_k) if top_k else student.new_zeros(student.size(0), 0)

        return chunked_rows(rows, (hidden, t2s_hidden, labels), self.chunk_size())

    def teacher_side(self, s2t_hidden, teacher_hidden, out, top_k: int = 0):
        """KL(teacher || s2t) summed over the teacher's label rows (shape [1]), and the teacher's
        ``top_k`` largest logits there, sorted."""
        def rows(s2t_h, h_t):
            teacher = readout(h_t, out.weight, out.fixed)
            kl = forward_kl(readout(s2t_h, out.weight, out.fixed), teacher, temperature=self.temperature).sum()
            return kl.view(1), top_logits(teacher, top_k) if top_k else teacher.new_zeros(teacher.size(0), 0)

        return chunked_rows(rows, (s2t_hidden, teacher_hidden), self.chunk_size())

    def mix(self, student_sums, teacher_sums, correct_only: bool, teacher_scale: float = 1.0):
        """(loss, CE, KD, logging entries) from the two sides' sums."""
        ce, t2s_ce, t2s_kd, correct = student_sums.unbind()
        s2t_kl = teacher_sums[0] * teacher_scale
        kd = t2s_ce + t2s_kd + s2t_kl
        extra = {"t2s_ce": t2s_ce.data, "t2s_kd": t2s_kd.data, "s2t_kl": s2t_kl.data, "t2s_correct": int(correct)}
        if correct_only:
            extra["aligned_tokens"] = int(correct)
        return (1.0 - self.kd_ratio) * ce + self.kd_ratio * kd, ce.detach(), kd.detach(), extra

    def divergence(self, student_logits, teacher_logits):
        return self.kd_divergence(student_logits, teacher_logits, temperature=self.temperature)

    def uses_memory_efficient_loss(self) -> bool:
        return self.cfg.kd_impl != "plain"

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        super().reduce_metrics(logging_outputs)
        log_token_means(logging_outputs, ("t2s_ce", "t2s_kd", "s2t_kl"))
        log_token_means(logging_outputs, {"t2s_acc": "t2s_correct"}, base2=False)


@register_criterion("dskd", dataclass=DualSpaceKDConfig)
class DualSpaceKDCriterion(DualSpaceTerms, TokenLevelKDCriterion):
    cross_attention = False

    def loss_terms(self, model, sample, mask, labels):
        out_s = output_layer(model, "student")
        hidden_s = model(**sample["net_input"], features_only=True)[0][mask]
        hidden_t, out_t = self.task.teacher.hidden_states(sample["net_input"])
        hidden_t = hidden_t[mask]
        dtype = self.projectors.t2s.weight.dtype
        student_sums, _ = self.student_side(hidden_s, self.projectors.t2s(hidden_t.to(dtype)), labels, out_s,
                                            correct_only=False)
        teacher_sums, _ = self.teacher_side(self.projectors.s2t(hidden_s.to(dtype)), hidden_t, out_t)
        return self.mix(student_sums, teacher_sums, correct_only=False)


@register_criterion("dskd_cma", dataclass=DualSpaceKDConfig)
class DualSpaceKDCrossAttentionCriterion(DualSpaceTerms, CrossTokenizerKDCriterion):
    cross_attention = True

    def loss_terms(self, model, sample, mask, labels):
        loss, ce, kd, extra = self.cross_attention_terms(model, sample, mask, labels).terms
        return loss, ce, kd, extra

    def cross_attention_terms(self, model, sample, mask, labels, top_k: int = 0) -> "CrossAttentionTerms":
        side, pad_s, pad_t = sample["teacher"], self.padding_idx, self.teacher_pad
        src_s, src_t = sample["net_input"]["src_tokens"], side["net_input"]["src_tokens"]
        t_mask = side["target"].ne(pad_t)
        out_s = output_layer(model, "student")
        hidden_s = model(**sample["net_input"], features_only=True)[0]  # [B, Ts, ds]
        hidden_t, out_t = self.task.teacher.hidden_states(side["net_input"])  # [B, Tt, dt]
        dtype = self.projectors.t2s.weight.dtype
        with torch.no_grad():
            emb_s = token_embeddings(model).detach()
            emb_t = token_embeddings(self.task.teacher.model).to(hidden_t.device)
            t_in, t_next = emb_t[src_t].float(), emb_t[next_tokens(src_t, side["target"], pad_t)].float()
            key = torch.cat([t_in, t_next], dim=-1)
            key = key / sequence_std(key, t_mask)
            t_value_in = (hidden_t.float() / sequence_std(hidden_t.float(), t_mask)
                          + t_next / sequence_std(t_next, t_mask))
        query = self.projectors.query(torch.cat([emb_s[src_s], emb_s[next_tokens(src_s, sample["target"], pad_s)]],
                                                dim=-1).to(dtype))
        key = key.to(query.dtype)
        # both directions attend over the other side's response (label) positions only, as DSKD's align_mask
        t2s_hidden = cross_model_attention(query, key, t_mask) @ self.projectors.t2s(t_value_in.to(dtype)).float()
        s2t_hidden = cross_model_attention(key, query, mask) @ self.projectors.s2t(hidden_s.to(dtype)).float()
        student_sums, s_top = self.student_side(hidden_s[mask], t2s_hidden[mask], labels, out_s, correct_only=True,
                                                top_k=top_k)
        teacher_sums, t_top = self.teacher_side(s2t_hidden[t_mask], hidden_t[t_mask], out_t, top_k=top_k)
        n_s, n_t = int(mask.sum()), max(int(t_mask.sum()), 1)
        terms = self.mix(student_sums, teacher_sums, correct_only=True, teacher_scale=n_s / n_t)
        return CrossAttentionTerms(terms, hidden_s, hidden_t, s_top, t_top, t_mask)


class CrossAttentionTerms(NamedTuple):
    """What ``dskd_cma`` computes, for criterions that add terms on top of it (``multi_cost_ot``)."""

    terms: tuple  # (loss, CE, KD, logging entries) of DSKD-CMA
    hidden_s: torch.Tensor  # the student's last hidden states [B, T_s, d_s]
    hidden_t: torch.Tensor  # the teacher's [B, T_t, d_t]
    student_top: torch.Tensor  # the student's top-k logits at its labels [N_s, k], sorted (k = 0: none)
    teacher_top: torch.Tensor  # the teacher's at its labels [N_t, k]
    teacher_mask: torch.Tensor  # [B, T_t]: the teacher's label positions
