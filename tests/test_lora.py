"""lora.apply_lora's target checks on a small module of GPT-2's layout."""
import pytest
import torch
from torch import nn

from distill_plugins.errors import DistillError
from distill_plugins.lora import apply_lora


def block():
    attn, mlp = nn.Module(), nn.Module()
    attn.c_attn, attn.c_proj = nn.Linear(8, 24), nn.Linear(8, 8)
    mlp.c_fc, mlp.c_proj = nn.Linear(8, 32), nn.Linear(32, 8)
    b = nn.Module()
    b.attn, b.mlp = attn, mlp
    return b


def test_every_target_must_match_a_matrix():
    assert apply_lora(block(), 4, 8.0, "q,o") == ["attn.c_attn", "attn.c_proj"]
    for targets, bad in (("q,vv", "'vv'"), ("gate", "'gate'"), ("nothing", "'nothing'")):
        with pytest.raises(DistillError, match=f"--lora-targets '{targets}': {bad} matches no weight matrix"):
            apply_lora(block(), 4, 8.0, targets)


def test_lora_delta_is_alpha_over_rank_times_BA():
    """W + (alpha / r) B A, with the + sign (forward and merge read the same parametrization, so a wrong
    scale would stay self-consistent elsewhere)"""
    from distill_plugins.lora import LoRADelta

    torch.manual_seed(0)
    d = LoRADelta((4, 3), rank=2, alpha=8.0)
    with torch.no_grad():
        d.lora_B.normal_()
    w = torch.randn(4, 3)
    torch.testing.assert_close(d(w), w + 4.0 * (d.lora_B @ d.lora_A))
