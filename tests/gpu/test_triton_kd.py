"""The Triton KD kernel equals the plain divergences (values and gradients), on a CUDA GPU or, without
one, in Triton's interpreter on the CPU (TRITON_INTERPRET=1, set by tests/conftest.py; smaller rows)."""
import os

import pytest
import torch
import torch.nn.functional as F

from distill_plugins import divergences, triton_kd

INTERPRETED = not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    triton_kd.triton is None or not (torch.cuda.is_available() or INTERPRETED),
    reason="needs triton, and a CUDA GPU or TRITON_INTERPRET=1 (scripts/setup_env.sh installs triton)",
)

COEF = {"skew_kl": 0.1, "skew_reverse_kl": 0.1, "js": 0.9}


def reference(s, t, y, name, r, temp, coef):
    """Per-row divergence and CE, and the gradient of their mixed sum, in float64."""
    s = s.detach().double().requires_grad_(True)
    kw = {"alpha": coef} if "skew" in name else {"beta": coef} if name == "js" else {}
    fn = divergences.DIVERGENCES["tvd" if name == "tvd" else name]
    kd = fn(s, t.double(), temperature=temp, **kw)
    ce = F.cross_entropy(s, y, reduction="none")
    ((1 - r) * ce.sum() + r * kd.sum()).backward()
    return ce.detach(), kd.detach(), s.grad


@pytest.mark.parametrize("name", list(triton_kd.DIVERGENCE_IDS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temp", [1.0, 2.0])
@pytest.mark.parametrize("tile_max", [False, True], ids=["lane_max", "tile_max"])
def test_triton_matches_plain(name, dtype, temp, tile_max):
    torch.manual_seed(0)
    n, v = (9, 1003) if INTERPRETED else (37, 5003)  # v not a multiple of the block
    s = (3 * torch.randn(n, v, device=DEVICE)).to(dtype)
    t = (3 * torch.randn(n, v, device=DEVICE)).to(dtype)
    s[0, :7] = float("-inf"); t[1, 5:9] = float("-inf"); s[2, 3] = float("-inf"); t[2, 3] = float("-inf")
    t[3, 11] = float("inf")
    t[4, :300] = float("-inf"); s[5, 130:520] = float("-inf")  # whole blocks masked, at the start and inside
    s[6, 700:] = s[6, 700:] + 30  # the row's maximum moves up late in the row: rescaling of what came before
    y = torch.randint(0, v, (n,), device=DEVICE)
    y[0] = 100
    coef = COEF.get(name, 0.0)
    r = 0.7
    ref_ce, ref_kd, ref_grad = reference(s.float(), t.float(), y, name, r, temp, coef)  # same rounded inputs
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    # in the interpreter, blocks of 128: several per row (the last partial), so the online rescaling runs
    block = dict(block=128, num_warps=4) if INTERPRETED else {}
    kd, ce, grad = triton_kd.kd_rows_and_grad(s, t, y, name, r, temp, coef, tile_max=tile_max, **block)
    assert torch.allclose(kd.double(), ref_kd, rtol=1e-4, atol=1e-4), (kd, ref_kd)
    assert torch.allclose(ce.double(), ref_ce, rtol=1e-4, atol=1e-4), (ce, ref_ce)
    assert grad.dtype == dtype and torch.allclose(grad.double(), ref_grad, atol=tol), (grad.double() - ref_grad).abs().max()
    if not tile_max:  # the autograd Function, with the default blocks (one per row in the interpreter)
        s_in = s.clone().requires_grad_(True)
        loss, ce_sum, kd_sum = triton_kd.triton_kd_loss(s_in, t, y, name, r, temp, coef)
        loss.backward()
        assert torch.allclose(kd_sum.double(), ref_kd.sum(), rtol=1e-4, atol=1e-3)
        assert torch.allclose(ce_sum.double(), ref_ce.sum(), rtol=1e-4, atol=1e-3)
        assert torch.allclose(s_in.grad.double(), ref_grad, atol=tol), (s_in.grad.double() - ref_grad).abs().max()


@pytest.mark.parametrize("name", list(triton_kd.DIVERGENCE_IDS))
def test_triton_row_without_finite_teacher_logit(name):
    """A teacher row of all -inf contributes no divergence and no KD gradient (as the plain form)."""
    torch.manual_seed(1)
    n, v = 3, 300
    s = 3 * torch.randn(n, v, device=DEVICE)
    t = 3 * torch.randn(n, v, device=DEVICE)
    t[1] = float("-inf")
    y = torch.randint(0, v, (n,), device=DEVICE)
    coef = COEF.get(name, 0.0)
    ref_ce, ref_kd, ref_grad = reference(s, t, y, name, 1.0, 1.0, coef)  # r = 1: the KD part alone
    kd, ce, grad = triton_kd.kd_rows_and_grad(s, t, y, name, 1.0, 1.0, coef, block=128, num_warps=4)
    assert ref_kd[1].item() == 0.0 and kd[1].item() == 0.0
    assert torch.allclose(kd.double(), ref_kd, rtol=1e-4, atol=1e-4), (kd, ref_kd)
    assert torch.isfinite(grad).all() and grad[1].abs().max().item() == 0.0
    assert torch.allclose(grad.double(), ref_grad, atol=1e-5)
