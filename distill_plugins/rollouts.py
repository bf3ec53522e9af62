"""MiniLLM rollouts: sample responses with teacher-mixed sampling, score them, replay them for PPO.

A rollout is one prompt + sampled response (``join_prompt_response``'s example) plus, for each
response token y_t (the positions where ``target != pad``, in order):

* ``old_logp``     log q_old(y_t), the student that sampled it (eval mode, no gradient)
* ``teacher_logp`` log p(y_t), the teacher (mean-centred logits, MiniLLM reward.py)
* ``weight``       w_t = q_old / ((1 - a) q_old + a p), the per-token importance weight of
                   teacher-mixed sampling from (1 - a) q + a p (Gu et al. 2024, section 2.2)

and, for logging only, one value per rollout: ``student_rev_kl`` and ``student_len``, the
per-response mean exact reverse KL of the student to the teacher (``sequence_reverse_kl``) and the
response length, on a pure-student response to the same prompt. With a = 0 that is the rollout itself;
with a > 0 MiniLLM draws a second response from the student alone for it (sampler.py), and so do we
(``collect_rollouts``' ``student_generator``).

``RolloutStore`` replays one collection for ``ppo_epochs`` passes, each in a fresh random order,
as minibatches; it is emptied afterwards (no replay across collections, as in MiniLLM). Its
``state_dict`` (the rollouts packed by ``data/example_packing.py``, the rest of the current pass, the
passes done and the shuffling generator) goes into the checkpoint, so a resumed run continues the
collection it was in.
"""
from typing import Dict, List, Optional

import numpy as np
import torch

from .data.example_packing import pack_examples, unpack_examples
from .data.prompt_response_dataset import collate_examples
from .policy_gradient import (
    mixture_importance_weights, sequence_reverse_kl, teacher_token_log_probs, token_log_probs,
)
from .sampling import MixtureLM, batch_from_responses, generate_responses

ROLLOUT_FIELDS = ("old_logp", "teacher_logp", "weight")
SEQUENCE_FIELDS = ("student_rev_kl", "student_len")  # one value per rollout, for logging


def sampler_model(student, teacher_model, alpha: float):
    """The model that draws rollouts: the student itself, or the mixture (1 - a) q + a p.

    The mixture is returned in eval mode: ``generate_responses`` restores the mode it finds, and
    a fresh module (training mode) would switch the teacher's dropout on afterwards."""
    if alpha <= 0.0:
        return student
    return MixtureLM([student, teacher_model], [1.0 - alpha, alpha]).eval()


@torch.no_grad()
def score_rollouts(student, teacher, batch, alpha: float, pad: int) -> List[Dict]:
    """Per-token log q_old, log p and w for a batch of prompt + response examples (no gradient);
    with ``alpha`` 0 (the responses are the student's own) also the ``SEQUENCE_FIELDS``.

    ``student`` must be in eval mode (MiniLLM trains and samples without dropout)."""
    net_input = batch["net_input"]
    target = batch["target"]
    mask = target.ne(pad)
    student_logits, teacher_logits = student(**net_input)[0], teacher.logits(net_input)
    old_logp = token_log_probs(student_logits, target)
    teacher_logp = teacher_token_log_probs(teacher_logits, target, mask)
    weight = mixture_importance_weights(old_logp, teacher_logp, alpha)
    out = []
    for i in range(target.size(0)):
        row = mask[i]
        out.append({"old_logp": old_logp[i][row].float().cpu(), "teacher_logp": teacher_logp[i][row].float().cpu(),
                    "weight": weight[i][row].float().cpu()})
    if alpha <= 0.0:
        for ex, stats in zip(out, student_sample_stats(student_logits, teacher_logits, mask)):
            ex.update(stats)
    return out


def student_sample_stats(student_logits, teacher_logits, mask) -> List[Dict]:
    """The ``SEQUENCE_FIELDS`` of each row of a batch of pure-student responses."""
    rkl = sequence_reverse_kl(student_logits, teacher_logits, mask).tolist()
    return [{"student_rev_kl": float(v), "student_len": float(n)} for v, n in zip(rkl, mask.sum(1).tolist())]


def sampled_batch(task, sampler, generator, prompt_sample, max_len: int, max_new_tokens: Optional[int] = None):
    """One response per prompt of ``prompt_sample`` sampled from ``sampler`` with ``generator``
    (built for it), cut to ``max_new_tokens`` and prompt + response to ``max_len`` tokens, as a
    batch on the prompts' device."""
    pad, eos = task.target_dictionary.pad(), task.target_dictionary.eos()
    responses = generate_responses(task, sampler, prompt_sample, generator=generator)
    if max_new_tokens is not None:
        responses = [r[:max_new_tokens] for r in responses]
    batch = batch_from_responses(prompt_sample, responses, pad, eos, max_len)
    return to_device(batch, prompt_sample["net_input"]["src_tokens"].device)


def collect_rollouts(task, student, teacher, sampler, generator, prompt_sample, alpha: float,
                     max_len: int, max_new_tokens: Optional[int] = None, student_generator=None) -> List[Dict]:
    """Sample one response per prompt of ``prompt_sample`` from ``sampler`` (``sampler_model``)
    with ``generator`` (built for it) and score it; returns rollout examples (tensors on the CPU).
    Responses are cut to ``max_new_tokens`` and prompt + response to ``max_len`` tokens. With
    ``alpha`` > 0 and a ``student_generator`` (built for ``student``), a second response per prompt
    is drawn from the student alone for the ``SEQUENCE_FIELDS`` (without one they are left out)."""
    pad = task.target_dictionary.pad()
    batch = sampled_batch(task, sampler, generator, prompt_sample, max_len, max_new_tokens)
    scores = score_rollouts(student, teacher, batch, alpha, pad)
    if alpha > 0.0 and student_generator is not None:
        pure = sampled_batch(task, student, student_generator, prompt_sample, max_len, max_new_tokens)
        with torch.no_grad():
            mask = pure["target"].ne(pad)
            stats = student_sample_stats(student(**pure["net_input"])[0], teacher.logits(pure["net_input"]), mask)
        for s, st in zip(scores, stats):
            s.update(st)
    rollouts = []
    for i, s in enumerate(scores):
        n = int(batch["target"][i].ne(pad).sum())
        length = int(batch["net_input"]["src_lengths"][i])
        ex = {"id": int(batch["id"][i]), "source": batch["net_input"]["src_tokens"][i, :length].cpu(),
              "target": batch["target"][i, :length].cpu(), "prompt_length": int(batch["prompt_lengths"][i])}
        assert n == len(s["old_logp"])
        ex.update(s)
        rollouts.append(ex)
    return rollouts


def rollout_batch(rollouts: List[Dict], pad: int, device=None) -> Dict:
    """Collate rollouts into a training batch: the usual fields plus ``rollout``, a dict of
    ``[B, T]`` tensors aligned with ``target`` (0 outside the response)."""
    batch = collate_examples(rollouts, pad)
    mask = batch["target"].ne(pad)
    fields = {}
    for name in ROLLOUT_FIELDS:
        full = torch.zeros(mask.shape, dtype=torch.float32)
        full[mask] = torch.cat([r[name] for r in rollouts])
        fields[name] = full
    for name in SEQUENCE_FIELDS:
        if all(name in r for r in rollouts):
            fields[name] = torch.tensor([float(r[name]) for r in rollouts], dtype=torch.float32)
    batch["rollout"] = fields
    return to_device(batch, device) if device is not None else batch


def to_device(batch, device):
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch.to(device) if torch.is_tensor(batch) else batch


class RolloutStore:
    """One collection of rollouts, replayed for ``ppo_epochs`` shuffled passes of minibatches."""

    def __init__(self, ppo_epochs: int, seed: int = 0):
        self.ppo_epochs = ppo_epochs
        self.rng = np.random.RandomState(seed)
        self.rollouts: List[Dict] = []
        self.order: List[int] = []
        self.epochs_done = 0

    def fill(self, rollouts: List[Dict]):
        self.rollouts = list(rollouts)
        self.epochs_done = 0
        self.order = []

    def exhausted(self) -> bool:
        return not self.rollouts or (not self.order and self.epochs_done >= self.ppo_epochs)

    def next_minibatch(self, size: int) -> Optional[List[Dict]]:
        """Up to ``size`` rollouts of the current pass (a pass never spills into the next)."""
        if not self.order:
            if self.epochs_done >= self.ppo_epochs or not self.rollouts:
                return None
            self.order = list(self.rng.permutation(len(self.rollouts)))
            self.epochs_done += 1
        take, self.order = self.order[:size], self.order[size:]
        batch = [self.rollouts[i] for i in take]
        if not self.order and self.epochs_done >= self.ppo_epochs:
            self.rollouts = []  # cleared after its last pass
        return batch

    # -- checkpoint state ---------------------------------------------------------------------------
    def state_dict(self, pad: int) -> dict:
        name, keys, pos, has_gauss, gauss = self.rng.get_state()
        sequence = {name: torch.tensor([float(r[name]) for r in self.rollouts], dtype=torch.float64)
                    for name in SEQUENCE_FIELDS if self.rollouts and all(name in r for r in self.rollouts)}
        return {"rollouts": pack_examples(self.rollouts, pad, ROLLOUT_FIELDS), "sequence_fields": sequence,
                "order": [int(i) for i in self.order],
                "epochs_done": self.epochs_done, "rng": [name, [int(k) for k in keys], int(pos), int(has_gauss),
                                                          float(gauss)]}

    def load_state_dict(self, state: dict):
        self.rollouts = unpack_examples(state["rollouts"], ROLLOUT_FIELDS)
        for name, values in state.get("sequence_fields", {}).items():  # absent in older checkpoints
            for r, v in zip(self.rollouts, values.tolist()):
                r[name] = v
        self.order, self.epochs_done = list(state["order"]), int(state["epochs_done"])
        name, keys, pos, has_gauss, gauss = state["rng"]
        self.rng.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
