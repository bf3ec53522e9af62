"""Distillation criterions (fairseq does not auto-import criterions from --user-dir)."""
from . import adaptive_kl, js, kd, reverse_kl, skew_kl, skew_reverse_kl, tvd  # noqa: F401
from . import multi_teacher_kd  # noqa: F401
from . import minillm  # noqa: F401
from . import dual_space_kd, min_ed, multi_cost_ot, uld  # noqa: F401  (dual-space and cross-tokenizer)
