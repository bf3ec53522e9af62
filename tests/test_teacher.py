"""A Teacher is frozen: eval mode in every module (no dropout), no parameter requiring grad, and its
parameters in --teacher-dtype."""
import torch
from torch import nn


def test_teacher_is_frozen_eval_and_in_its_dtype():
    from distill_plugins.teacher import Teacher

    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5))
    model.train()
    t = Teacher(model, path="t.pt", sha256="0" * 64, dtype="bf16")
    assert not t.model.training and not any(m.training for m in t.model.modules())
    assert all(not p.requires_grad for p in t.model.parameters())
    assert all(p.dtype == torch.bfloat16 for p in t.model.parameters())
