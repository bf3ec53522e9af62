"""Multi-cost optimal-transport KD across tokenizers (MC-KD / MCW-KD, the "multicost" DSKD fork's
``dual_space_kd_with_cma_ot``; spec section 6):

    loss = (1 - kd_ratio) CE + kd_ratio DSKD-CMA + w_logit OT_logit + w_hidden OT_hidden

DSKD-CMA is ``dskd_cma``'s KD term. Each OT term is, per example, sum(P * C) over the pairs
(teacher label j, student label i), P the entropic OT plan of C with uniform marginals
(``optimal_transport.sinkhorn_plan``, kernel exp(-alpha C)), weighted by the example's student labels
(so after fairseq divides by them it is their token-weighted mean, like every term here).

* C_logit = a1 |p_t,j - p_s,i| + a2 KL(p_t,j || p_s,i) + a3 |sal_t,j - sal_s,i|: p are softmaxes at
  ``--ot-temperature`` of each position's ``--ot-top-k`` largest logits, sorted (vocabulary-agnostic);
  the teacher's are interpolated toward the student's, (1 - t) sg(s) + t t_j with t rising linearly
  from ``--ot-interpolation-start`` to 1 over ``--max-update``; sal = sigmoid(Linear(hidden)), the
  teacher's hidden state first projected into the student's space (``ot`` projection).
* C_hidden = b1 E + b2 |ctx_t,j - ctx_s,i| / max + b3 (1 - cos(ctx_t,j, ctx_s,i)): ctx = mean of the
  +-``--ot-window`` neighbouring hidden states (teacher: projected); E = the normalised edit distance of
  the two tokens' strings where dynamic time warping aligns them, 1 elsewhere.
* (a1, a2, a3) = (0.2, 0.5, 0.3), (b1, b2, b3) = (0.3, 0.5, 0.2); with ``--ot-weight-update-interval N``
  they are re-solved every N updates from the mean cost values c since the last solve (MCW-KD:
  min_a c.a + sigma |a - 1/3|^2, sum a = 1, a >= 0.01; ``optimal_transport.simplex_weights``, all-reduced
  over workers). The weights are buffers, so checkpoints keep them.

Where this differs from the reference code, and why:
* The reference interpolates position j of the padded teacher batch with position j of the student's,
  which is another token under another tokenizer; here the teacher position is interpolated with
  the student position that DTW aligns to it, and the student side is detached (it is a target).
* The reference's edit cost is 0 for every pair DTW does not align and the edit distance for the
  pairs it does, which makes unaligned pairs the cheapest; here unaligned pairs cost 1 (the maximum).
* The reference multiplies OT_logit by its weight twice (scripts: 50 x 50); here once.
* The costs use the response (label) positions, as every loss here; the reference also includes the
  prompt. KL(p_t || p_s) is exact from log-softmaxes (the reference adds 1e-7 to p_s).
* The reference adds each OT term as a mean over the batch's sequences (sum P*C with P of mass 1: an
  average cost) to CE and KD summed over tokens, and divides the whole by the tokens: relative to a
  per-token CE its OT weights are w / T, T the micro-batch's label tokens (2 Dolly responses: about
  150), so they change with the batch. Here each OT term is a mean per label token like CE, which
  keeps the balance independent of the batch.
Defaults are the GPT-2 script's nominal relative weights (CE 10 : KD 2.5 : OT_logit 50 : OT_hidden 10,
divided by 12.5 so CE and KD mix to 1) and its KD temperature 3. The reference's effective balance at
its batch (per-token CE 10 : OT_logit 2500 / T : OT_hidden 10 / T, its double 50 included) is about
``--ot-logit-weight 1.3 --ot-hidden-weight 0.005`` for T = 150.

Logged: ``ot_logit`` and ``ot_hidden`` (per student label, in nats, unweighted), the current cost
weights ``w_logit_*``/``w_hidden_*``, and ``dskd_cma``'s entries.
"""
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import torch
import torch.distributed as dist
from fairseq.criterions import register_criterion
from fairseq.logging import metrics
from omegaconf import II
from torch import nn

from ..errors import check
from ..optimal_transport import hidden_transport, logit_transport, pair_mask, simplex_weights
from ..token_alignment import dtw_path, edit_costs, normalize_token
from .cross_tokenizer_kd import load_alignment, padded_rows, rows_by_example
from .dual_space_kd import DualSpaceKDConfig, DualSpaceKDCrossAttentionCriterion, dual_space_dims
from .token_level_kd import log_token_means

LOGIT_COST_WEIGHTS = (0.2, 0.5, 0.3)  # euclidean, KL, salience
HIDDEN_COST_WEIGHTS = (0.3, 0.5, 0.2)  # edit distance, context distance, context cosine
EDIT_CACHE_SIZE = 2048  # examples whose DTW edit costs are kept (was unbounded: GBs over a Dolly epoch)
COST_NAMES = ("logit_euclid", "logit_kl", "logit_salience", "hidden_edit", "hidden_context", "hidden_cosine")


@dataclass
class MultiCostOTConfig(DualSpaceKDConfig):
    kd_ratio: float = field(default=0.2, metadata={"help": "weight of DSKD-CMA's KD term; CE gets 1 - kd_ratio "
                                                           "(script: CE 10, KD 2.5 -> 0.2)"})
    temperature: float = field(default=3.0, metadata={"help": "DSKD-CMA's KD temperature (script: 3)"})
    ot_logit_weight: float = field(default=4.0, metadata={"help": "w_logit (script: 50 of CE 10 + KD 2.5 -> 4)"})
    ot_hidden_weight: float = field(default=0.8, metadata={"help": "w_hidden (script: 10 of 12.5 -> 0.8)"})
    ot_top_k: int = field(default=300, metadata={"help": "largest logits per position compared by OT_logit"})
    ot_temperature: float = field(default=2.0, metadata={"help": "softmax temperature of OT_logit's top-k logits"})
    ot_interpolation_start: float = field(
        default=0.1, metadata={"help": "t at update 0 of the teacher's top-k logits (1 - t) student + t teacher; "
                                       "t reaches 1 at --max-update (1: no interpolation)"})
    # the updates over which t rises to 1: --max-update (no option of its own: fairseq passes an
    # interpolated field only when it has no help); --max-update 0 (no limit) keeps t = 1
    ot_interpolation_updates: int = II("optimization.max_update")
    ot_window: int = field(default=4, metadata={"help": "OT_hidden's context: mean of the +-w neighbouring tokens"})
    ot_sinkhorn_alpha: float = field(default=0.1, metadata={"help": "Sinkhorn kernel exp(-alpha * cost)"})
    ot_sinkhorn_iters: int = field(default=100, metadata={"help": "most Sinkhorn iterations"})
    ot_weight_update_interval: int = field(
        default=0, metadata={"help": "MCW-KD: re-solve the cost weights every N updates (0: keep them fixed)"})
    ot_weight_sigma: float = field(default=0.7, metadata={"help": "MCW-KD's QP: sigma |a - 1/n|^2"})
    ot_weight_floor: float = field(default=0.01, metadata={"help": "MCW-KD's QP: every cost weight >= this"})


def dtw_edit_costs(teacher_tokens: List[str], student_tokens: List[str]) -> Tuple[torch.Tensor, List[int]]:
    """E [M, N] (1, except the normalised edit distance ed / max length at the pairs that DTW aligns)
    and, for each teacher token, the first student token aligned to it (-1 if the student has none)."""
    m, n = len(teacher_tokens), len(student_tokens)
    costs = torch.ones(m, n)
    if m == 0 or n == 0:
        return costs, [-1] * m
    distances = edit_costs(teacher_tokens, student_tokens)  # the DTW's own costs, normalised below
    aligned = dtw_path(distances)
    t_len = [len(normalize_token(t)) for t in teacher_tokens]
    s_len = [len(normalize_token(t)) for t in student_tokens]
    for j, targets in enumerate(aligned):
        for i in targets:
            costs[j, i] = distances[j, i] / max(t_len[j], s_len[i], 1)
    return costs, [targets[0] for targets in aligned]


class OTProjections(nn.Module):
    def __init__(self, student_dim: int, teacher_dim: int):
        super().__init__()
        self.teacher = nn.Linear(teacher_dim, student_dim)  # the reference's "ot" projector
        self.salience = nn.Linear(student_dim, 1)


@register_criterion("multi_cost_ot", dataclass=MultiCostOTConfig)
class MultiCostOTCriterion(DualSpaceKDCrossAttentionCriterion):
    @classmethod
    def check_options(cls, cfg, teachers: int):
        super().check_options(cfg, teachers)
        for name in ("ot_logit_weight", "ot_hidden_weight"):
            check(getattr(cfg, name) >= 0, f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
        for name in ("ot_temperature", "ot_sinkhorn_alpha", "ot_weight_sigma"):
            check(getattr(cfg, name) > 0, f"--{name.replace('_', '-')} must be > 0, got {getattr(cfg, name)}")
        for name in ("ot_top_k", "ot_sinkhorn_iters"):
            check(getattr(cfg, name) >= 1, f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
        for name in ("ot_window", "ot_weight_update_interval"):
            check(getattr(cfg, name) >= 0, f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
        check(0.0 <= cfg.ot_interpolation_start <= 1.0,
              f"--ot-interpolation-start must be in [0, 1], got {cfg.ot_interpolation_start}")
        check(0.0 <= cfg.ot_weight_floor <= 1.0 / 3,
              f"--ot-weight-floor must be in [0, 1/3] (three weights sum to 1), got {cfg.ot_weight_floor}")

    def __init__(self, task, cfg: MultiCostOTConfig):
        super().__init__(task, cfg)
        self.student_tokens, self.teacher_tokens, _ = load_alignment(task)
        self.ot = OTProjections(*dual_space_dims(task))
        self.register_buffer("logit_cost_weights", torch.tensor(LOGIT_COST_WEIGHTS))
        self.register_buffer("hidden_cost_weights", torch.tensor(HIDDEN_COST_WEIGHTS))
        self.register_buffer("cost_sums", torch.zeros(len(COST_NAMES), dtype=torch.float64))
        self.register_buffer("cost_batches", torch.zeros((), dtype=torch.float64))
        self.num_updates = 0
        self._solved_at = None
        self._edit_cache: Dict[tuple, Tuple[torch.Tensor, List[int]]] = {}

    STATISTICS = ("logit_cost_weights", "hidden_cost_weights", "cost_sums", "cost_batches")

    def _apply(self, fn, *args, **kwargs):
        """fairseq casts the whole criterion for --bf16/--fp16: the weights and the running cost sums keep
        their precision (a bf16 batch counter stops at 256), only their device follows."""
        kept = {name: self._buffers[name] for name in self.STATISTICS}
        super()._apply(fn, *args, **kwargs)
        for name, before in kept.items():
            after = self._buffers[name]
            if after.dtype != before.dtype:
                self._buffers[name] = before.to(after.device)
        return self

    # -- schedule and MCW-KD's weight update -----------------------------------------------------------
    def set_num_updates(self, num_updates: int):
        self.num_updates = num_updates
        interval = self.cfg.ot_weight_update_interval
        if interval > 0 and num_updates > 0 and num_updates % interval == 0 and self._solved_at != num_updates:
            self._solved_at = num_updates
            self.update_cost_weights()

    def update_cost_weights(self):
        """Re-solve both groups' weights from the mean cost values since the last solve (over workers)."""
        stats = torch.cat([self.cost_sums, self.cost_batches.view(1)])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(stats)
        if stats[-1] > 0:
            means = stats[:-1] / stats[-1]
            sigma, floor = self.cfg.ot_weight_sigma, self.cfg.ot_weight_floor
            self.logit_cost_weights.copy_(simplex_weights(means[:3], sigma, floor))
            self.hidden_cost_weights.copy_(simplex_weights(means[3:], sigma, floor))
        self.cost_sums.zero_()
        self.cost_batches.zero_()

    def interpolation(self) -> float:
        start, total = self.cfg.ot_interpolation_start, self.cfg.ot_interpolation_updates
        if not total or total <= 0:
            return 1.0
        return start + (1.0 - start) * min(self.num_updates / total, 1.0)

    # -- the loss -----------------------------------------------------------------------------------
    def edit_costs(self, teacher_ids: List[int], student_ids: List[int]):
        key = (tuple(teacher_ids), tuple(student_ids))
        if key not in self._edit_cache:
            if len(self._edit_cache) >= EDIT_CACHE_SIZE:  # oldest first: a [M, N] matrix each
                self._edit_cache.pop(next(iter(self._edit_cache)))
            self._edit_cache[key] = dtw_edit_costs([self.teacher_tokens[t] for t in teacher_ids],
                                                   [self.student_tokens[s] for s in student_ids])
        return self._edit_cache[key]

    def loss_terms(self, model, sample, mask, labels):
        k = min(self.cfg.ot_top_k, len(self.task.dictionary), len(self.task.teacher_side_task().dictionary))
        out = self.cross_attention_terms(model, sample, mask, labels, top_k=k)
        loss, ce, kd, extra = out.terms
        t_mask = out.teacher_mask
        s_labels, t_labels = sample["target"][mask].tolist(), sample["teacher"]["target"][t_mask].tolist()
        s_rows, t_rows = rows_by_example(mask), rows_by_example(t_mask)
        s_len, t_len = int(mask.sum(1).max()), int(t_mask.sum(1).max())
        device = mask.device
        edit = torch.ones(mask.size(0), t_len, s_len)
        partner = torch.full((mask.size(0), t_len), -1, dtype=torch.long)
        for b, ((s0, s1), (t0, t1)) in enumerate(zip(s_rows, t_rows)):
            costs, first = self.edit_costs(t_labels[t0:t1], s_labels[s0:s1])
            edit[b, : t1 - t0, : s1 - s0] = costs
            partner[b, : t1 - t0] = torch.tensor(first, dtype=torch.long)
        edit, partner = edit.to(device), partner.to(device)

        dtype = self.ot.teacher.weight.dtype
        h_s, s_valid = padded_rows(out.hidden_s[mask].to(dtype), mask)  # [B, N, d_s]
        h_t, t_valid = padded_rows(self.ot.teacher(out.hidden_t[t_mask].to(dtype)), t_mask)  # [B, M, d_s]
        ot_logit, logit_costs = self.logit_transport(padded_rows(out.student_top, mask)[0],
                                                     padded_rows(out.teacher_top, t_mask)[0], s_valid, t_valid, h_s, h_t,
                                                     partner)
        ot_hidden, hidden_costs = self.hidden_transport(h_s.float(), h_t.float(), s_valid, t_valid, edit)

        n_s = mask.sum(1).to(ot_logit.dtype)  # each example's OT weighted by its student labels
        ot_logit, ot_hidden = (ot_logit * n_s).sum(), (ot_hidden * n_s).sum()
        loss = loss + self.cfg.ot_logit_weight * ot_logit + self.cfg.ot_hidden_weight * ot_hidden
        extra = dict(extra, ot_logit=ot_logit.data, ot_hidden=ot_hidden.data)
        weights = self.logit_cost_weights.tolist() + self.hidden_cost_weights.tolist()
        extra.update({f"w_{name}": w for name, w in zip(COST_NAMES, weights)}, ot_batches=1)
        if self.training:
            valid = pair_mask(t_valid, s_valid)
            means = [(c.detach().double() * valid).sum() / valid.sum().clamp_min(1) for c in logit_costs + hidden_costs]
            self.cost_sums += torch.stack(means).to(self.cost_sums.device)
            self.cost_batches += 1
        return loss, ce, kd, extra

    def sinkhorn(self):
        return dict(alpha=self.cfg.ot_sinkhorn_alpha, max_iter=self.cfg.ot_sinkhorn_iters)

    def logit_transport(self, s_top, t_top, s_valid, t_valid, h_s, h_t, partner):
        """OT_logit per example [B] and its three cost matrices [B, M, N], from both models' sorted
        top-k logits at their labels, padded ([B, N, k], [B, M, k])."""
        sal_s = torch.sigmoid(self.ot.salience(h_s)).squeeze(-1).float()
        sal_t = torch.sigmoid(self.ot.salience(h_t)).squeeze(-1).float()
        return logit_transport(s_top, t_top, s_valid, t_valid, partner, sal_s, sal_t, self.logit_cost_weights.float(),
                               self.interpolation(), self.cfg.ot_temperature, **self.sinkhorn())

    def hidden_transport(self, h_s, h_t, s_valid, t_valid, edit):
        """OT_hidden per example [B] and its three cost matrices [B, M, N]."""
        return hidden_transport(h_s, h_t, s_valid, t_valid, edit, self.hidden_cost_weights.float(), self.cfg.ot_window,
                                **self.sinkhorn())

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        super().reduce_metrics(logging_outputs)
        log_token_means(logging_outputs, ("ot_logit", "ot_hidden"), base2=False, round=4)
        total = lambda key: sum(log.get(key, 0) for log in logging_outputs)  # noqa: E731
        batches = total("ot_batches")
        if batches > 0:  # the same on every worker and micro-batch, so their mean is the value
            for name in COST_NAMES:
                metrics.log_scalar(f"w_{name}", total(f"w_{name}") / batches, 0, round=3)
