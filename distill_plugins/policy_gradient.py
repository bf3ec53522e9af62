"""MiniLLM's policy-gradient objective as pure functions (Gu et al. 2024, "MiniLLM: Knowledge
Distillation of Large Language Models", ICLR; spec ``methods.md`` section 2).

MiniLLM minimises the sequence-level reverse KL(q_theta || p) between student q and teacher p by
policy gradient on student (teacher-mixed) samples y ~ (1 - a) q + a p. Notation, per response
token t of a rollout (every tensor is ``[B, T]``; ``mask`` m_t is 1 on response tokens, 0 on prompt
and padding):

* reward      r_t = clip((log p(y_t) - log q_old(y_t)) / reward_scaling, +-cliprange_reward)
* return      R_t = sum_{t' >= t} gamma^(t' - t) r_t' / n_t,  n_t = sum_{t' >= t} m_t'  (remaining
              response tokens from t; R_t includes r_t)
* advantage   A_t = (R_t - mean) / sqrt(var + 1e-8), mean/var over the response tokens of the batch
              (all workers together when distributed)
* IS weight   w_t = q_old(y_t) / ((1 - a) q_old(y_t) + a p(y_t))  (teacher-mixed sampling; a = 0: 1)
* ratio       rho_t = exp(log q_theta(y_t) - log q_old(y_t)) * w_t
* L_pg  = sum_t m_t max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps)) / sum_t m_t
* L_reg = mean_t KL(q_theta(.|y_<t) || p(.|y_<t))   (exact over the vocabulary, single-step term)
* L_pt  = (1 - kd_ratio) CE + kd_ratio KL(p || q_theta)   on a language-modelling batch

Differences from the reference (M/minillm/losses.py, utils.py), matching its intent: whitening uses
the response tokens only (the reference also counts the zeros at padded positions) and always the
population variance (the reference uses the unbiased one on a single GPU); the FKL of L_pt is the
true KL (the reference logs the soft cross-entropy KL + H(p): same gradient).
"""
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from .divergences import forward_kl, reverse_kl

WHITEN_EPS = 1e-8


def token_log_probs(logits: Tensor, tokens: Tensor) -> Tensor:
    """log softmax(logits)[tokens], in at least float32: ``[B, T, V], [B, T] -> [B, T]``."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return torch.log_softmax(logits, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def teacher_token_log_probs(teacher_logits: Tensor, tokens: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """Teacher log p(y_t) from mean-centred logits, l - mean(l) - logsumexp(l - mean(l)) (MiniLLM
    reward.py; the mean is over finite logits). Raises FloatingPointError on a non-finite value at a response token."""
    logits = teacher_logits.to(torch.promote_types(teacher_logits.dtype, torch.float32))
    finite = torch.isfinite(logits)  # -inf entries (masked vocabulary) stay out of the mean
    mean = logits.masked_fill(~finite, 0.0).sum(-1, keepdim=True) / finite.sum(-1, keepdim=True).clamp_min(1)
    centred = logits - mean
    picked = centred.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    logp = picked - torch.logsumexp(centred, dim=-1)
    check = logp if mask is None else logp[mask.bool()]
    if not torch.isfinite(check).all():
        raise FloatingPointError("non-finite teacher log-probability on a sampled token")
    return logp


def per_token_rewards(teacher_logp: Tensor, old_logp: Tensor, mask: Tensor,
                      reward_scaling: float = 0.5, cliprange_reward: float = 100.0) -> Tensor:
    """r_t = clip((log p - log q_old) / reward_scaling, -c, c); 0 outside the response."""
    r = (teacher_logp - old_logp) / reward_scaling
    if cliprange_reward:
        r = r.clamp(-cliprange_reward, cliprange_reward)
    return r * mask.to(r.dtype)


def length_normalized_returns(rewards: Tensor, mask: Tensor, gamma: float = 0.95) -> Tensor:
    """R_t = sum_{t' >= t} gamma^(t' - t) r_t' divided by the number of response tokens from t on.

    ``rewards`` must be 0 outside the response (``per_token_rewards`` does that). Positions after the
    response have no remaining tokens; their divisor is 1 (the return is 0 there)."""
    m = mask.to(rewards.dtype)
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.size(1))):
        running = rewards[:, t] + gamma * running
        returns[:, t] = running
    remaining = m.flip(1).cumsum(1).flip(1).clamp_min(1.0)
    return returns / remaining * m


def masked_mean_var(x: Tensor, mask: Tensor, distributed: bool = True):
    """Mean and population variance of x over mask, summed over all workers when distributed."""
    m = mask.to(x.dtype)
    stats = torch.stack([(x * m).sum(), m.sum()])
    if distributed and dist.is_available() and dist.is_initialized():
        dist.all_reduce(stats)
    total, count = stats[0], stats[1].clamp_min(1.0)
    mean = total / count
    sq = (((x - mean) ** 2) * m).sum()
    if distributed and dist.is_available() and dist.is_initialized():
        dist.all_reduce(sq)
    return mean, sq / count


def whiten(x: Tensor, mask: Tensor, distributed: bool = True) -> Tensor:
    """(x - mean) / sqrt(var + 1e-8) with the global (all-reduced) masked statistics; 0 off the mask."""
    mean, var = masked_mean_var(x, mask, distributed)
    return (x - mean) * torch.rsqrt(var + WHITEN_EPS) * mask.to(x.dtype)


def advantages_and_returns(rewards: Tensor, mask: Tensor, gamma: float = 0.95, distributed: bool = True):
    """A_t = whiten(R_t) and R_t (both without gradient)."""
    with torch.no_grad():
        returns = length_normalized_returns(rewards, mask, gamma)
        return whiten(returns, mask, distributed), returns


def mixture_importance_weights(student_logp: Tensor, teacher_logp: Tensor, alpha: float) -> Tensor:
    """w_t = q(y_t) / ((1 - a) q(y_t) + a p(y_t)), from log-probabilities (stable in log space)."""
    if alpha <= 0.0:
        return torch.ones_like(student_logp)
    if alpha >= 1.0:
        return (student_logp - teacher_logp).exp()
    log_mix = torch.logaddexp(student_logp + torch.log1p(torch.tensor(-alpha, dtype=student_logp.dtype)),
                              teacher_logp + torch.log(torch.tensor(alpha, dtype=teacher_logp.dtype)))
    return (student_logp - log_mix).exp()


class PolicyLoss(NamedTuple):
    loss: Tensor  # scalar, the token mean L_pg
    clip_fraction: Tensor  # share of response tokens where the clipped term is the larger one
    ratio_mean: Tensor  # mean rho_t over response tokens


def ppo_policy_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, weights: Tensor, mask: Tensor,
                    cliprange: float = 0.2) -> PolicyLoss:
    """L_pg = sum_t m_t max(-A_t rho_t, -A_t clip(rho_t, 1 +- eps)) / sum_t m_t,
    rho_t = exp(log q_theta - log q_old) w_t (the clip acts on rho w, as in MiniLLM)."""
    m = mask.to(logp.dtype)
    n = m.sum().clamp_min(1.0)
    ratio = torch.exp(torch.where(mask.bool(), logp - old_logp, 0.0)) * weights  # padding: log q may be -inf
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - cliprange, 1.0 + cliprange)
    loss = (torch.max(unclipped, clipped) * m).sum() / n
    with torch.no_grad():
        clip_fraction = ((clipped > unclipped).to(m.dtype) * m).sum() / n
        ratio_mean = (ratio * m).sum() / n
    return PolicyLoss(loss, clip_fraction, ratio_mean)


def sequence_values(x: Tensor, mask: Tensor) -> Tensor:
    """Each row's value of ``x`` at its first response token: ``[B, T] -> [B]`` (0 for an empty response).

    For the length-normalised return R (``length_normalized_returns``) this is
    sum_t gamma^t r_t / n over the whole response, the ``reward`` MiniLLM logs (losses.py: the discounted
    sum of r_t, divided by the response length with ``--length-norm``, which its scripts set)."""
    m = mask.bool()
    first = m.to(torch.int8).argmax(1, keepdim=True)
    return x.gather(1, first).squeeze(1) * m.any(1).to(x.dtype)


def sequence_reverse_kl(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor) -> Tensor:
    """Per response, the mean over its tokens of the exact per-step KL(q(.|y_<t) || p(.|y_<t)):
    ``[B, T, V], [B, T, V], [B, T] -> [B]`` (0 for an empty response).

    MiniLLM logs sum_t k3_t / n on a pure-student sample, k3_t = exp(l_t) - 1 - l_t with
    l_t = log p(y_t) - log q(y_t) (utils.get_rev_kl); the exact per-step KL is what k3_t estimates
    (its expectation over y_t given y_<t), without the sampling noise of y_t."""
    m = mask.bool()
    values = reverse_kl(student_logits[m], teacher_logits[m])
    per_token = values.new_zeros(m.shape)
    per_token[m] = values
    return per_token.sum(1) / m.sum(1).clamp_min(1)


def single_step_reverse_kl(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor) -> Tensor:
    """L_reg = mean over response tokens of sum_v q_theta(v) (log q_theta(v) - log p(v))."""
    m = mask.bool()
    return reverse_kl(student_logits[m], teacher_logits[m]).mean() if m.any() else student_logits.sum() * 0.0


class PretrainLoss(NamedTuple):
    loss: Tensor  # (1 - kd_ratio) * lm + kd_ratio * kd
    lm: Tensor  # token-mean cross-entropy
    kd: Tensor  # token-mean KL(p || q)


def pretraining_loss(student_logits: Tensor, teacher_logits: Optional[Tensor], target: Tensor, pad: int,
                     kd_ratio: float = 0.5) -> PretrainLoss:
    """L_pt = (1 - kd_ratio) CE + kd_ratio KL(p || q) on a language-modelling batch (token means)."""
    m = target.ne(pad)
    s = student_logits[m]
    lm = F.cross_entropy(s.to(torch.promote_types(s.dtype, torch.float32)), target[m], reduction="mean")
    if teacher_logits is None or kd_ratio == 0.0:
        kd = lm.new_zeros(())
    else:
        kd = forward_kl(s, teacher_logits[m]).mean()
    return PretrainLoss((1.0 - kd_ratio) * lm + kd_ratio * kd, lm, kd)
