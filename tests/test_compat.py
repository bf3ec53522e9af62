"""compat.py's fused GELU: fairseq's gelu_accurate replaced by torch's one-kernel tanh GELU, the same
function (float64 reference, gradients), used by the models, and no graph break under torch.compile."""
import math

import pytest
import torch

from conftest import in_memory_kd_task
from distill_plugins import compat


def gelu_new(x):
    """GPT-2's GELU written out, as fairseq's gelu_accurate and HF's gelu_new compute it."""
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def test_same_function_as_the_written_out_formula():
    torch.manual_seed(0)
    x = torch.cat([torch.randn(4000) * 4, torch.tensor([0.0, -0.0, 30.0, -30.0, float("inf"), float("-inf")])])
    ref = gelu_new(x.double())
    assert torch.allclose(compat.gelu_tanh(x).double(), ref, rtol=1e-6, atol=1e-6, equal_nan=True)
    # bf16: no worse than the written-out formula evaluated in bf16 (one rounding instead of eight)
    fused, chain = compat.gelu_tanh(x.bfloat16()).double(), gelu_new(x.bfloat16()).double()
    finite = torch.isfinite(ref)
    assert (fused - ref)[finite].abs().max() <= (chain - ref)[finite].abs().max()
    xd = torch.randn(64, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(compat.gelu_tanh, (xd,))
    g_fused, = torch.autograd.grad(compat.gelu_tanh(xd).sum(), xd)
    g_ref, = torch.autograd.grad(gelu_new(xd).sum(), xd)
    assert torch.allclose(g_fused, g_ref, rtol=1e-12, atol=1e-12)


def test_models_use_it_and_compile_without_a_break_per_layer():
    from fairseq import utils

    assert utils.get_activation_fn("gelu_accurate") is compat.gelu_tanh
    task, student = in_memory_kd_task(tokens_per_sample=32)
    layers = student.decoder.layers
    assert all(layer.activation_fn is compat.gelu_tanh for layer in layers)
    dynamo = pytest.importorskip("torch._dynamo")
    tokens = torch.randint(4, len(task.dictionary), (2, 12))
    with torch.no_grad():
        explained = dynamo.explain(student.eval())(tokens, features_only=True)
    # fairseq's own data-dependent check for padding is the one break left (was one more per layer)
    assert explained.graph_break_count <= 1, [str(b.reason)[:200] for b in explained.break_reasons]
