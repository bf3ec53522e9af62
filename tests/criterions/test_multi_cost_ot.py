"""Multi-cost OT KD (``multi_cost_ot``) against an independent float64 computation one unpadded
example at a time: DSKD-CMA's reference (test_dual_space_kd) plus both OT terms built from loops,
with the plain-domain Sinkhorn iterations; loss and the gradients of the student and of every
criterion parameter (the DSKD and OT projections), with and without the logit interpolation and
the top-k truncation; MCW-KD's weight update; bad options."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from distill_plugins.errors import DistillError
from distill_plugins.optimal_transport import simplex_weights
from distill_plugins.token_alignment import dtw_alignment, edit_distance, normalize_token
from test_cross_tokenizer import EXAMPLES, KD_RATIO, setup  # noqa: F401  (the fixture)
from test_dual_space_kd import check, features, reference as cma_reference
from test_optimal_transport import reference_transport

from distill_plugins import divergences as D

TEMPERATURE = 2.0


def build(task, **options):
    task.student_hidden_dim = 16
    torch.manual_seed(1)
    return task.build_criterion(OmegaConf.create({"_name": "multi_cost_ot", "kd_ratio": KD_RATIO,
                                                  "temperature": TEMPERATURE, "ot_interpolation_updates": 10,
                                                  **options}))


def transport(cost):
    return reference_transport(cost, 0.1, iters=300)  # differentiated through the iterations


def window(x, w):
    return torch.stack([x[max(i - w, 0): i + w + 1].mean(0) for i in range(x.size(0))])


def ot_of_example(crit, student, teacher, ex, t, top_k):
    """(OT_logit, OT_hidden, [6 cost matrices], student labels) of one example."""
    s_dict, t_dict = crit.task.dictionary, crit.task.teacher_task.dictionary
    s_tokens = [s_dict.index(w) for w in ex[0] + ex[1]] + [s_dict.eos()]
    t_tokens = [t_dict.index(w) for w in ex[2] + ex[3]] + [t_dict.eos()]
    h_s = features(student, s_tokens, s_dict.eos())[len(ex[0]):].double()
    h_t = features(teacher, t_tokens, t_dict.eos())[len(ex[2]):].detach().double()
    s_logits = h_s @ student.decoder.output_projection.weight.double().t()
    t_logits = h_t @ teacher.decoder.output_projection.weight.double().t()
    s_str = [s_dict[i] for i in s_tokens[len(ex[0]):]]
    t_str = [t_dict[i] for i in t_tokens[len(ex[2]):]]
    m, n = len(t_str), len(s_str)
    aligned = dtw_alignment(t_str, s_str)
    edit = torch.ones(m, n, dtype=torch.float64)
    for j, targets in enumerate(aligned):
        for i in targets:
            a, b = normalize_token(t_str[j]), normalize_token(s_str[i])
            edit[j, i] = edit_distance(a, b) / max(len(a), len(b), 1)
    k = min(top_k, s_logits.size(1), t_logits.size(1))
    s_top = s_logits.sort(-1, descending=True).values[:, :k]
    t_top = t_logits.sort(-1, descending=True).values[:, :k]
    z = torch.stack([(1 - t) * s_top[aligned[j][0]].detach() + t * t_top[j] for j in range(m)])
    p_s, p_t = F.softmax(s_top / 2.0, -1), F.softmax(z / 2.0, -1)
    ot_t = lambda h: h @ crit.ot.teacher.weight.double().t() + crit.ot.teacher.bias.double()  # noqa: E731
    sal = lambda h: torch.sigmoid(h @ crit.ot.salience.weight.double().t() + crit.ot.salience.bias.double())[:, 0]  # noqa: E731
    hs, ht = h_s, ot_t(h_t)
    sal_s, sal_t = sal(hs), sal(ht)
    euc = torch.stack([torch.stack([(p_t[j] - p_s[i]).norm() for i in range(n)]) for j in range(m)])
    kl = torch.stack([torch.stack([(p_t[j] * (p_t[j].log() - p_s[i].log())).sum() for i in range(n)])
                      for j in range(m)])
    sal_c = (sal_t[:, None] - sal_s[None, :]).abs()
    ctx_s, ctx_t = window(hs, 4), window(ht, 4)
    dist = torch.stack([torch.stack([(ctx_t[j] - ctx_s[i]).norm() for i in range(n)]) for j in range(m)])
    ctx = dist / dist.detach().max()
    cos = torch.stack([torch.stack([1 - F.cosine_similarity(ctx_t[j], ctx_s[i], dim=0) for i in range(n)])
                       for j in range(m)])
    ot_logit = transport(0.2 * euc + 0.5 * kl + 0.3 * sal_c)
    ot_hidden = transport(0.3 * edit + 0.5 * ctx + 0.2 * cos)
    return ot_logit, ot_hidden, [euc, kl, sal_c, edit, ctx, cos], n


def reference(crit, task, student, teacher, t, top_k):
    base, n_s = cma_reference(crit, task, student, teacher, D.forward_kl, TEMPERATURE, True, EXAMPLES)
    ot_l = ot_h = 0.0
    costs = []
    for ex in EXAMPLES:
        a, b, c, n = ot_of_example(crit, student, teacher, ex, t, top_k)
        ot_l, ot_h = ot_l + n * a, ot_h + n * b
        costs.append(c)
    w_l, w_h = crit.cfg.ot_logit_weight, crit.cfg.ot_hidden_weight
    return base + w_l * ot_l + w_h * ot_h, n_s, ot_l, ot_h, costs


@pytest.mark.parametrize("updates,top_k,impl", [(5, 300, ("plain", 1024)), (10, 6, ("plain", 1024)),
                                              (5, 300, ("fused", 4)), (10, 6, ("chunked", 5))])
def test_multi_cost_ot_matches_the_per_example_reference(setup, updates, top_k, impl):  # noqa: F811
    """t = 0.55 (interpolated) or 1; all logits or the top 6; in one piece or recomputed chunks."""
    task, student, teacher, sample, _ = setup
    crit = build(task, ot_top_k=top_k, kd_impl=impl[0], kd_chunk_size=impl[1])
    crit.set_num_updates(updates)
    t = 0.1 + 0.9 * min(updates / 10, 1.0)
    want = {}

    def reference_loss():
        loss, n, want["ot_logit"], want["ot_hidden"], _ = reference(crit, task, student, teacher, t, top_k)
        return loss, n

    log = check(crit, student, sample, reference_loss)
    assert float(log["ot_logit"]) == pytest.approx(float(want["ot_logit"]), rel=1e-5)
    assert float(log["ot_hidden"]) == pytest.approx(float(want["ot_hidden"]), rel=1e-5)
    assert {"ot.teacher.weight", "ot.salience.weight"} <= {name for name, _ in crit.named_parameters()}
    assert all(p.grad.abs().sum() > 0 for p in (crit.ot.teacher.weight, crit.ot.salience.weight))  # trained
    assert "unmixed_loss" not in log and log["w_logit_kl"] == pytest.approx(0.5)


def test_cost_weights_are_resolved_from_the_mean_costs_and_saved(setup):  # noqa: F811
    task, student, teacher, sample, _ = setup
    crit = build(task, ot_weight_update_interval=2, ot_interpolation_updates=0)  # t = 1 in both batches
    crit.train()
    crit.set_num_updates(0)
    for update in range(2):
        crit.set_num_updates(update)
        crit(student, sample)
    _, _, _, _, costs = reference(crit, task, student, teacher, 1.0, 300)
    # pooled over the batch's valid (teacher, student) pairs; both batches are the same sample
    means = torch.tensor([float(sum(c[i].sum() for c in costs) / sum(c[i].numel() for c in costs))
                          for i in range(6)])
    crit.set_num_updates(2)
    torch.testing.assert_close(crit.logit_cost_weights.double(), simplex_weights(means[:3].double(), 0.7),
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(crit.hidden_cost_weights.double(), simplex_weights(means[3:].double(), 0.7),
                               rtol=1e-4, atol=1e-5)
    assert not torch.allclose(crit.logit_cost_weights, torch.tensor([0.2, 0.5, 0.3]))
    assert crit.cost_batches == 0 and crit.cost_sums.abs().sum() == 0
    state = crit.state_dict()  # fairseq saves the criterion's state with the checkpoint
    assert {"logit_cost_weights", "hidden_cost_weights", "cost_sums", "cost_batches"} <= state.keys()
    before = crit.logit_cost_weights.clone()
    crit.set_num_updates(2)  # the next micro-batch of the same update: no second solve
    assert torch.equal(crit.logit_cost_weights, before)
    crit.eval()
    crit(student, sample)  # validation does not count
    assert crit.cost_batches == 0


@pytest.mark.parametrize("options,message", [
    ({"ot_top_k": 0}, "--ot-top-k must be >= 1"),
    ({"ot_weight_floor": 0.5}, "--ot-weight-floor must be in [0, 1/3]"),
    ({"ot_sinkhorn_alpha": 0.0}, "--ot-sinkhorn-alpha must be > 0"),
    ({"ot_logit_weight": -1.0}, "--ot-logit-weight must be >= 0"),
    ({"ot_interpolation_start": 1.5}, "--ot-interpolation-start must be in [0, 1]"),
])
def test_bad_options(setup, options, message):  # noqa: F811
    with pytest.raises(DistillError, match=message.replace("[", r"\[").replace("]", r"\]")):
        build(setup[0], **options)


def test_no_interpolation_without_max_update(setup):  # noqa: F811
    crit = build(setup[0], ot_interpolation_updates=0)
    crit.set_num_updates(3)
    assert crit.interpolation() == 1.0
    assert np.isclose(build(setup[0]).interpolation(), 0.1)


@pytest.mark.parametrize("cast", ["bf16", "fp16"])
def test_mixed_precision_cast_keeps_the_weight_statistics_exact(setup, cast):  # noqa: F811
    """fairseq's Trainer casts the whole criterion for --bf16/--fp16; the projections follow, the
    cost weights and running sums do not (a bf16 batch counter would stop at 256)."""
    crit = build(setup[0])
    crit.cost_sums += torch.tensor([23.123456789] * 6, dtype=torch.float64)
    crit = crit.to(torch.bfloat16) if cast == "bf16" else crit.half()
    assert crit.ot.teacher.weight.dtype == (torch.bfloat16 if cast == "bf16" else torch.float16)
    assert crit.cost_sums.dtype == crit.cost_batches.dtype == torch.float64
    assert crit.logit_cost_weights.dtype == crit.hidden_cost_weights.dtype == torch.float32
    for _ in range(300):
        crit.cost_batches += 1
    assert float(crit.cost_batches) == 300.0 and float(crit.cost_sums[0]) == 23.123456789
    crit.load_state_dict(crit.state_dict())
    assert crit.cost_sums.dtype == torch.float64


def test_edit_cost_cache_is_bounded(setup, monkeypatch):
    """DTW edit costs are kept per example up to EDIT_CACHE_SIZE, oldest dropped first."""
    import distill_plugins.criterions.multi_cost_ot as module

    monkeypatch.setattr(module, "EDIT_CACHE_SIZE", 2)
    criterion = build(setup[0])
    ids = [([4, 5], [4]), ([4], [5, 6]), ([6], [4])]
    first = criterion.edit_costs(*ids[0])
    for t, s in ids[1:]:
        criterion.edit_costs(t, s)
    assert list(criterion._edit_cache) == [tuple(map(tuple, k)) for k in ids[1:]]
    torch.testing.assert_close(criterion.edit_costs(*ids[0])[0], first[0])  # recomputed alike
