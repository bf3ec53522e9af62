"""The cross-tokenizer criterions (ULD, MinED, DSKD, DSKD-CMA, multi-cost OT with its cost-weight
re-solve) give on a CUDA GPU the loss and gradients they give on the CPU: a device-placement check
of code paths that the CPU tests cannot reach (a CPU tensor mixed into CUDA arithmetic raises only
on a GPU). Skipped without CUDA; DISTILL_TEST_DEVICE=cpu runs the plumbing on the CPU."""
import copy
import os
import sys

import pytest
import torch
from omegaconf import OmegaConf

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "criterions"))
from test_cross_tokenizer import KD_RATIO, setup  # noqa: E402,F401  (the fixtures)
from test_dual_space_kd import same_tokenizer  # noqa: E402,F401

from distill_plugins.optimal_transport import simplex_weights  # noqa: E402
from distill_plugins.rollouts import to_device  # noqa: E402

DEVICE = os.environ.get("DISTILL_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU")

CRITERIONS = [
    ("uld", {}),
    ("min_ed", {"temperature": 2.0}),
    ("dskd", {"temperature": 2.0}),
    ("dskd_cma", {"temperature": 2.0}),
    ("dskd_cma", {"temperature": 2.0, "kd_impl": "chunked", "kd_chunk_size": 3}),
    ("multi_cost_ot", {"temperature": 2.0, "ot_weight_update_interval": 1, "ot_interpolation_updates": 10}),
]


def run(task, name, options, student, sample, device):
    """Loss, logged values and gradients (student's and the criterion's) after two training calls
    (updates 0 and 1: multi_cost_ot re-solves its cost weights at the second)."""
    task.student_hidden_dim = 16
    torch.manual_seed(1)
    crit = task.build_criterion(OmegaConf.create({"_name": name, "kd_ratio": KD_RATIO, **options})).to(device)
    student = copy.deepcopy(student).to(device)
    task.teachers[0].model.to(device)
    sample = to_device(sample, device)
    crit.train()
    for update in range(2):
        if hasattr(crit, "set_num_updates"):
            crit.set_num_updates(update)
        student.zero_grad()
        crit.zero_grad()
        loss, _, log = crit(student, sample)
        loss.backward()
    grads = [p.grad.detach().cpu() for p in [*student.parameters(), *crit.parameters()] if p.grad is not None]
    weights = [b.detach().cpu() for n, b in crit.named_buffers() if n.endswith("cost_weights")]
    return loss.detach().cpu(), grads, weights


@pytest.mark.parametrize("name,options", CRITERIONS, ids=[f"{n}-{o.get('kd_impl', 'plain')}" for n, o in CRITERIONS])
def test_criterion_on_the_device_equals_the_cpu(request, name, options):
    if name == "dskd":  # one tokenizer
        task, student, _, sample = request.getfixturevalue("same_tokenizer")
    else:
        task, student, _, sample, _ = request.getfixturevalue("setup")
    try:
        on_device = run(task, name, options, student, sample, DEVICE)
    finally:
        task.teachers[0].model.to("cpu")
    on_cpu = run(task, name, options, student, sample, "cpu")
    torch.testing.assert_close(on_device[0], on_cpu[0], rtol=1e-4, atol=1e-5)
    assert len(on_device[1]) == len(on_cpu[1]) > 0
    for g_device, g_cpu in zip(on_device[1], on_cpu[1]):
        torch.testing.assert_close(g_device, g_cpu, rtol=1e-3, atol=1e-5)
    for w_device, w_cpu in zip(on_device[2], on_cpu[2]):
        torch.testing.assert_close(w_device, w_cpu, rtol=1e-4, atol=1e-5)


def test_simplex_weights_on_the_device():
    costs = torch.tensor([0.3, 1.2, 0.05], dtype=torch.float64)
    torch.testing.assert_close(simplex_weights(costs.to(DEVICE), 0.7).cpu(), simplex_weights(costs, 0.7))
