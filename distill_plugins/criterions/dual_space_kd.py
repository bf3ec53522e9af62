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
  ``query`` projection, keys the teacher's [input; next-token] embeddings (each divided by its
  std over the sequence, ``dual_space.sequence_std``); t2s reads ``t2s``(teacher hidden / std + teacher next-token embedding / std) attended over
  the teacher's positions, s2t reads ``s2t``(student hidden) attended over the student's positions
  (the transposed scores). D counts only where argmax t2s is the label; KL(teacher || s2t) is taken
  at the teacher's labels, as a mean over them (scaled by student labels / teacher labels, since the
  loss is divided by the student's label count).

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
    DualSpaceProjectors, cross_model_attention, next_tokens, readout, sequence_std, token_embeddings,
)
from ..errors import DistillError, check
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

    cross_attention = False

    def __init__(self, task, cfg):
        super().__init__(task, cfg)
        try:
            self.kd_divergence = get_divergence(cfg.dskd_divergence)
        except ValueError as e:
            raise DistillError(f"--dskd-divergence: {e}") from None
        self.projectors = DualSpaceProjectors(*dual_space_dims(task), cross_attention=self.cross_attention)

    def kd_terms(self, student, t2s, s2t, teacher, labels, taught=None, teacher_scale=1.0):
        t2s_ce = F.cross_entropy(t2s, labels, reduction="sum")
        d = self.divergence(student, t2s.detach())
        correct = t2s.detach().argmax(-1).eq(labels)
        t2s_kd = (d * correct).sum() if taught == "correct" else d.sum()
        s2t_kl = forward_kl(s2t, teacher, temperature=self.temperature).sum() * teacher_scale
        extra = {"t2s_ce": t2s_ce.data, "t2s_kd": t2s_kd.data, "s2t_kl": s2t_kl.data, "t2s_correct": int(correct.sum())}
        if taught == "correct":
            extra["aligned_tokens"] = int(correct.sum())
        return t2s_ce + t2s_kd + s2t_kl, extra

    def divergence(self, student_logits, teacher_logits):
        return self.kd_divergence(student_logits, teacher_logits, temperature=self.temperature)

    def uses_memory_efficient_loss(self) -> bool:
        return False

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        super().reduce_metrics(logging_outputs)
        log_token_means(logging_outputs, ("t2s_ce", "t2s_kd", "s2t_kl"))
        log_token_means(logging_outputs, {"t2s_acc": "t2s_correct"}, base2=False)


@register_criterion("dskd", dataclass=DualSpaceKDConfig)
class DualSpaceKDCriterion(DualSpaceTerms, TokenLevelKDCriterion):
    cross_attention = False

    def plain_terms(self, model, sample, mask):
        out_s = output_layer(model, "student")
        hidden_s = model(**sample["net_input"], features_only=True)[0][mask]
        student = readout(hidden_s, out_s.weight, out_s.fixed)
        hidden_t, out_t = self.task.teacher.hidden_states(sample["net_input"])
        hidden_t = hidden_t[mask]
        dtype = self.projectors.t2s.weight.dtype
        t2s = readout(self.projectors.t2s(hidden_t.to(dtype)), out_s.weight.detach(), out_s.fixed)
        s2t = readout(self.projectors.s2t(hidden_s.to(dtype)), out_t.weight, out_t.fixed)
        teacher = readout(hidden_t, out_t.weight, out_t.fixed)
        kd, extra = self.kd_terms(student, t2s, s2t, teacher, sample["target"][mask])
        return student, kd, extra


@register_criterion("dskd_cma", dataclass=DualSpaceKDConfig)
class DualSpaceKDCrossAttentionCriterion(DualSpaceTerms, CrossTokenizerKDCriterion):
    cross_attention = True

    def plain_terms(self, model, sample, mask):
        out = self.cross_attention_terms(model, sample, mask)
        return out.student, out.kd, out.extra

    def cross_attention_terms(self, model, sample, mask) -> "CrossAttentionTerms":
        side, pad_s, pad_t = sample["teacher"], self.padding_idx, self.teacher_pad
        src_s, src_t = sample["net_input"]["src_tokens"], side["net_input"]["src_tokens"]
        t_mask = side["target"].ne(pad_t)
        out_s = output_layer(model, "student")
        hidden_s = model(**sample["net_input"], features_only=True)[0]  # [B, Ts, ds]
        student = readout(hidden_s[mask], out_s.weight, out_s.fixed)
        hidden_t, out_t = self.task.teacher.hidden_states(side["net_input"])  # [B, Tt, dt]
        dtype = self.projectors.t2s.weight.dtype
        with torch.no_grad():
            emb_s = token_embeddings(model).detach()
            emb_t = token_embeddings(self.task.teacher.model).to(hidden_t.device)
            valid_t = src_t.ne(pad_t)
            t_in, t_next = emb_t[src_t].float(), emb_t[next_tokens(src_t, side["target"], pad_t)].float()
            t_next = t_next / sequence_std(t_next, valid_t)
            key = torch.cat([t_in / sequence_std(t_in, valid_t), t_next], dim=-1)
            t_value_in = hidden_t.float() / sequence_std(hidden_t.float(), valid_t) + t_next
        query = self.projectors.query(torch.cat([emb_s[src_s], emb_s[next_tokens(src_s, sample["target"], pad_s)]],
                                                dim=-1).to(dtype))
        key = key.to(query.dtype)
        t2s_hidden = cross_model_attention(query, key, valid_t) @ self.projectors.t2s(t_value_in.to(dtype)).float()
        s2t_hidden = (cross_model_attention(key, query, src_s.ne(pad_s))
                      @ self.projectors.s2t(hidden_s.to(dtype)).float())
        t2s = readout(t2s_hidden[mask], out_s.weight.detach(), out_s.fixed)
        s2t = readout(s2t_hidden[t_mask], out_t.weight, out_t.fixed)
        teacher = readout(hidden_t[t_mask], out_t.weight, out_t.fixed)
        n_s, n_t = int(mask.sum()), max(int(t_mask.sum()), 1)
        kd, extra = self.kd_terms(student, t2s, s2t, teacher, sample["target"][mask], taught="correct",
                                  teacher_scale=n_s / n_t)
        return CrossAttentionTerms(student, kd, extra, hidden_s, hidden_t, teacher, t_mask)


class CrossAttentionTerms(NamedTuple):
    """What ``dskd_cma`` computes, for criterions that add terms on top of it (``multi_cost_ot``)."""

    student: torch.Tensor  # the student's logits at its labels [N_s, V_s]
    kd: torch.Tensor  # the summed DSKD-CMA KD term
    extra: dict  # its logging entries
    hidden_s: torch.Tensor  # the student's last hidden states [B, T_s, d_s]
    hidden_t: torch.Tensor  # the teacher's [B, T_t, d_t]
    teacher: torch.Tensor  # the teacher's logits at its labels [N_t, V_t]
    teacher_mask: torch.Tensor  # [B, T_t]: the teacher's label positions
