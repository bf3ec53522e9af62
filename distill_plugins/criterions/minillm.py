"""Criterion ``minillm``: MiniLLM's policy-gradient reverse-KL objective (Gu et al. 2024; spec 2).

    loss = L_pg + L_reg + lm_coef * L_pt

on a rollout minibatch prepared by ``--task minillm`` (see ``distill_plugins/tasks/minillm.py``;
the formulas are in ``distill_plugins/policy_gradient.py``). Rewards r_t = clip((log p - log q_old)
/ reward_scaling, +-cliprange_reward), returns (gamma, length-normalised), whitened advantages and
the clipped importance ratio are computed here from the per-token log-probabilities stored with each
rollout; L_reg is the exact per-step reverse KL over the vocabulary and L_pt the LM/KD mix on the
``--lm-data`` batch. Every term is a token mean over the minibatch, so ``sample_size`` is 1. L_reg
and L_pt are computed as the token-level criterions compute theirs (``--kd-impl``, default fused:
chunks of ``--kd-chunk-size`` tokens, output projections fused in where the student's logits are not
needed anyway, the Triton kernel on CUDA).

On a plain prompt/response batch (validation) it returns the reference cross-entropy and logs the
exact per-token reverse KL to the teacher on the reference responses.

Logged (natural log units, except ``nll_loss`` in base 2 like fairseq), as means over the rollouts
of the minibatch as MiniLLM logs them (losses.py, with its scripts' ``--length-norm``): ``reward``
(sum_t gamma^t r_t / n per rollout, i.e. R at its first response token), ``rev_kl`` (per-response
mean exact reverse KL of the sampling student on a pure-student response to the same prompt: the
rollout itself when --teacher-mixed-alpha is 0, else a second sample drawn for it; MiniLLM logs the
k3 estimate of the same), ``stu_len`` (that response's length) and ``resp_len`` (the rollouts'); as
token means: ``return`` (R_t before whitening), ``pg_loss``, ``reg_loss`` (the exact reverse KL of
the current student on the rollouts), ``pt_loss``, ``lm_loss``, ``pt_kd_loss``, ``clip_frac``,
``ratio``, ``is_weight``; and the task's ``rollout_time`` / ``train_time`` (seconds per minibatch;
the collection time falls on the update that collected). On validation ``rev_kl`` is the token mean
on the reference responses.
"""
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from fairseq import utils
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.logging import metrics

from .. import policy_gradient as pg
from ..chunked_divergences import (
    DEFAULT_CHUNK_SIZE, chunked_kd_loss, cross_entropy_loss_and_grad, forward_kl_loss_and_grad,
    reverse_kl_loss_and_grad,
)
from ..divergences import forward_kl, reverse_kl
from ..errors import DistillError, check
from ..output_projection import fusable_output
from .token_level_kd import student_side_loss, triton_chunk_kernel

RL_STATS = ("reward", "rev_kl", "stu_len", "return", "pg_loss", "reg_loss", "pt_loss", "lm_loss", "pt_kd_loss",
            "clip_frac", "ratio", "is_weight", "resp_len", "rollout_time", "train_time")


@dataclass
class MiniLLMConfig(FairseqDataclass):
    reward_scaling: float = field(default=0.5, metadata={"help": "rewards log p - log q_old are divided by this"})
    cliprange_reward: float = field(default=100.0, metadata={"help": "rewards are clipped to +-this (0: no clip)"})
    gamma: float = field(default=0.95, metadata={"help": "discount of the length-normalised return"})
    cliprange: float = field(default=0.2, metadata={"help": "PPO clip of the importance ratio rho * w to 1 +- this"})
    no_single_step_reg: bool = field(
        default=False, metadata={"help": "drop the single-step reverse-KL term (MiniLLM's scripts keep it)"}
    )
    lm_coef: float = field(default=1.0, metadata={"help": "weight of the LM/KD term on the --lm-data batch"})
    kd_ratio: float = field(
        default=0.5, metadata={"help": "L_pt = (1 - kd_ratio) * LM + kd_ratio * KL(teacher || student) on --lm-data"}
    )
    kd_impl: ChoiceEnum(["plain", "chunked", "fused"]) = field(
        default="fused", metadata={"help": "how L_reg and L_pt are computed (as the token-level criterions' "
                                           "--kd-impl): plain, chunked, or fused with the output projections "
                                           "(L_pt; L_reg: the teacher's); same results"}
    )
    kd_chunk_size: int = field(default=DEFAULT_CHUNK_SIZE, metadata={"help": "tokens per chunk of L_reg and L_pt"})


@register_criterion("minillm", dataclass=MiniLLMConfig)
class MiniLLMCriterion(FairseqCriterion):
    trains_on_lm_batch = True  # L_pt on the task's --lm-data batches
    teachers_taken = 1

    @classmethod
    def check_options(cls, cfg, teachers: int):
        """One-line errors for option values out of range."""
        check(cfg.reward_scaling > 0, f"--reward-scaling must be > 0, got {cfg.reward_scaling}")
        check(cfg.cliprange_reward >= 0, f"--cliprange-reward must be >= 0, got {cfg.cliprange_reward}")
        check(0.0 <= cfg.gamma <= 1.0, f"--gamma must be in [0, 1], got {cfg.gamma}")
        check(0.0 <= cfg.cliprange < 1.0, f"--cliprange must be in [0, 1), got {cfg.cliprange}")
        check(cfg.lm_coef >= 0, f"--lm-coef must be >= 0, got {cfg.lm_coef}")
        check(0.0 <= cfg.kd_ratio <= 1.0, f"--kd-ratio must be in [0, 1], got {cfg.kd_ratio}")
        check(cfg.kd_chunk_size >= 1, f"--kd-chunk-size must be >= 1, got {cfg.kd_chunk_size}")

    def __init__(self, task, cfg: MiniLLMConfig):
        super().__init__(task)
        self.cfg = cfg
        self.check_options(cfg, len(getattr(task, "teachers", None) or ()))
        if not getattr(task, "provides_rollouts", False):
            raise DistillError("criterion minillm needs rollouts: use --task minillm")
        if getattr(task, "teacher", None) is None:
            raise DistillError("criterion minillm needs a teacher: pass --teacher-path")

    def forward(self, model, sample, reduce=True):
        if "rollout" in sample:
            return self.rollout_forward(model, sample)
        return self.reference_forward(model, sample)

    def rollout_forward(self, model, sample):
        cfg = self.cfg
        net_input, target = sample["net_input"], sample["target"]
        mask = target.ne(self.padding_idx)
        ro = sample["rollout"]
        logits = model(**net_input)[0]
        logp = pg.token_log_probs(logits, target)
        rewards = pg.per_token_rewards(ro["teacher_logp"], ro["old_logp"], mask, cfg.reward_scaling,
                                       cfg.cliprange_reward)
        advantages, returns = pg.advantages_and_returns(rewards, mask, cfg.gamma)
        policy = pg.ppo_policy_loss(logp, ro["old_logp"], advantages, ro["weight"], mask, cfg.cliprange)
        reg = self.single_step_term(logits, net_input, mask)
        loss = policy.loss if cfg.no_single_step_reg else policy.loss + reg
        ntokens = int(mask.sum())
        m = mask.float()
        responses = mask.any(1)
        log = {
            "minibatches": 1,
            "nsentences": target.size(0),
            "ntokens": ntokens,
            "sample_size": 1,
            "reward": float(pg.sequence_values(returns, mask)[responses].mean()) if responses.any() else 0.0,
            "return": float((returns * m).sum() / m.sum().clamp_min(1)),
            "pg_loss": float(policy.loss.detach()),
            "reg_loss": float(reg.detach()),
            "clip_frac": float(policy.clip_fraction),
            "ratio": float(policy.ratio_mean),
            "is_weight": float((ro["weight"] * m).sum() / m.sum().clamp_min(1)),
            "resp_len": ntokens / target.size(0),
        }
        if "student_rev_kl" in ro:  # absent with --no-student-rev-kl-sample
            log.update(rev_kl=float(ro["student_rev_kl"].mean()), stu_len=float(ro["student_len"].mean()))
        lm = sample.get("lm")
        if lm is not None and cfg.lm_coef > 0:
            pt = self.pretraining_term(model, lm)
            loss = loss + cfg.lm_coef * pt.loss
            log.update(pt_loss=float(pt.loss.detach()), lm_loss=float(pt.lm.detach()), pt_kd_loss=float(pt.kd.detach()))
        log["loss"] = float(loss.detach())
        return loss, 1, log

    def single_step_term(self, logits, net_input, mask):
        """L_reg on the rollout minibatch's student ``logits`` [B, T, V]: plain, or chunked over the
        response tokens (--kd-impl chunked/fused; the teacher's side fused too, 2-pass Triton kernel on CUDA)."""
        teacher = self.task.teacher
        if self.cfg.kd_impl == "plain":
            return pg.single_step_reverse_kl(logits, teacher.logits(net_input), mask)
        m = mask.bool()
        n = int(m.sum())
        if n == 0:
            return logits.sum() * 0.0
        teachers = teacher.rows(net_input, m, fused=self.cfg.kd_impl == "fused")
        labels = net_input["src_tokens"].new_zeros(n)  # unused: CE has weight 0
        res = chunked_kd_loss(logits[m], labels, teachers, reverse_kl, 1.0, self.cfg.kd_chunk_size,
                              loss_and_grad=triton_chunk_kernel(logits.device, "reverse_kl") or reverse_kl_loss_and_grad)
        return res.loss / n

    def pretraining_term(self, model, lm) -> pg.PretrainLoss:
        """L_pt on an --lm-data batch; with --kd-impl chunked/fused neither model's [tokens, vocab]
        float32 tensors exist beyond a chunk (fused: not even the student's logits)."""
        cfg, teacher = self.cfg, self.task.teacher
        k = cfg.kd_ratio
        if cfg.kd_impl == "plain":
            lm_teacher = teacher.logits(lm["net_input"]) if k > 0 else None
            return pg.pretraining_loss(model(**lm["net_input"])[0], lm_teacher, lm["target"], self.padding_idx, k)
        mask = lm["target"].ne(self.padding_idx)
        labels = lm["target"][mask]
        fused = cfg.kd_impl == "fused"
        out = fusable_output(model) if fused else None
        teachers, loss_and_grad = None, cross_entropy_loss_and_grad
        if k > 0:
            teachers = teacher.rows(lm["net_input"], mask, fused)
            loss_and_grad = triton_chunk_kernel(labels.device, "forward_kl") or forward_kl_loss_and_grad
        res = student_side_loss(model, lm["net_input"], mask, labels, out, teachers, divergence=forward_kl,
                                kd_ratio=k, chunk_size=cfg.kd_chunk_size, loss_and_grad=loss_and_grad)
        n = max(int(labels.numel()), 1)  # token means, as pg.pretraining_loss
        return pg.PretrainLoss(res.loss / n, res.ce / n, res.kd / n)

    def reference_forward(self, model, sample):
        """Teacher-forced reference responses: loss = CE (sum over tokens); logs the exact reverse KL."""
        logits = model(**sample["net_input"])[0]
        target = sample["target"]
        mask = target.ne(self.padding_idx)
        ce = F.cross_entropy(logits[mask].float(), target[mask], reduction="sum")
        with torch.no_grad():
            rkl = reverse_kl(logits[mask], self.task.teacher.logits(sample["net_input"])[mask]).sum()
        ntokens = int(mask.sum())
        log = {"loss": ce.data, "nll_loss": ce.data, "ref_rev_kl": rkl.data, "ntokens": ntokens,
               "ref_ntokens": ntokens, "nsentences": target.size(0), "sample_size": ntokens}
        return ce, ntokens, log

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        total = lambda key: sum(float(log.get(key, 0)) for log in logging_outputs)  # noqa: E731
        sample_size = total("sample_size")
        metrics.log_scalar("loss", total("loss") / max(sample_size, 1), sample_size, round=4)
        ref = total("ref_ntokens")
        if ref:
            metrics.log_scalar("rev_kl", total("ref_rev_kl") / ref, ref, round=4)
            metrics.log_scalar("nll_loss", total("nll_loss") / ref / math.log(2), ref, round=3)
            metrics.log_derived("ppl", lambda meters: utils.get_perplexity(meters["nll_loss"].avg))
        minibatches = total("minibatches")
        if minibatches:
            for key in RL_STATS:
                if any(key in log for log in logging_outputs):
                    metrics.log_scalar(key, total(key) / minibatches, minibatches, round=4)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True
