"""Multi-cost OT KD's two OT terms, ours (batched) against a per-example reference form, in one run.

    python benchmarks/ot_terms.py --device cpu --preset cpu-small --json ot.json
    python benchmarks/ot_terms.py --device cuda --preset gpt2

Forward + backward of OT_logit + OT_hidden (``optimal_transport.logit_transport`` and
``hidden_transport``, what ``--criterion multi_cost_ot`` adds to DSKD-CMA) on random inputs: both
models' top-k logits at their label positions, hidden states, DTW edit costs. ``ours`` pads the
batch and runs every example at once, the KL cost as one matmul, the context means as one masked
matmul and Sinkhorn in the log domain. ``reference`` is written the way the multicost repo computes
it (spec section 6): a Python loop over the examples, a loop over positions for the context means,
the KL cost through a [M, N, k] log-ratio tensor with +1e-7, plain-domain Sinkhorn (kernel
exp(-alpha C), 100 iterations) with autograd through the iterations. Reported: time per step,
label tokens/s, peak extra memory (``measure.py``), ours/reference ratios, and the largest relative
difference of the two terms' values (the same losses up to Sinkhorn's convergence).
"""
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import measure  # noqa: E402
from distill_plugins import optimal_transport as OT  # noqa: E402

PRESETS = {  # examples, student labels (the teacher's: 1.25x), top-k, hidden dim
    "cpu-tiny": (2, 24, 50, 32),
    "cpu-small": (8, 128, 300, 256),
    "gpt2": (16, 256, 300, 768),
}
LOGIT_W, HIDDEN_W = (0.2, 0.5, 0.3), (0.3, 0.5, 0.2)
T, TAU, WINDOW, ALPHA, ITERS = 0.5, 2.0, 4, 0.1, 100


def inputs(preset, device, seed=1):
    """Per example: (student top-k logits [N, k], teacher's [M, k], h_s [N, d], h_t [M, d], edit
    costs [M, N], partner [M], salience weight [d]); lengths vary by example."""
    batch, n_max, k, d = PRESETS[preset]
    g = torch.Generator().manual_seed(seed)
    out = []
    for b in range(batch):
        n = max(2, n_max - 7 * b)
        m = int(n * 1.25)
        s_top = torch.randn(n, k, generator=g).sort(-1, descending=True).values * 3
        t_top = torch.randn(m, k, generator=g).sort(-1, descending=True).values * 3
        edit = torch.ones(m, n)
        partner = (torch.arange(m) * n // m).clamp_max(n - 1)
        edit[torch.arange(m), partner] = torch.rand(m, generator=g)
        out.append([x.to(device) for x in (s_top, t_top, torch.randn(n, d, generator=g), torch.randn(m, d, generator=g),
                                           edit, partner)])
    sal_w = (torch.randn(d, generator=g) / d ** 0.5).to(device)
    return out, sal_w


def ours(examples, sal_w):
    from distill_plugins.criterions.cross_tokenizer_kd import padded_rows

    device = examples[0][0].device
    b, n_max = len(examples), max(e[0].size(0) for e in examples)
    m_max = max(e[1].size(0) for e in examples)
    s_mask = torch.zeros(b, n_max, dtype=torch.bool, device=device)
    t_mask = torch.zeros(b, m_max, dtype=torch.bool, device=device)
    for i, e in enumerate(examples):
        s_mask[i, : e[0].size(0)] = True
        t_mask[i, : e[1].size(0)] = True
    cat = lambda j: torch.cat([e[j] for e in examples])  # noqa: E731
    s_top, s_valid = padded_rows(cat(0), s_mask)
    t_top, t_valid = padded_rows(cat(1), t_mask)
    h_s, _ = padded_rows(cat(2), s_mask)
    h_t, _ = padded_rows(cat(3), t_mask)
    edit = torch.ones(b, m_max, n_max, device=device)
    partner = torch.full((b, m_max), -1, dtype=torch.long, device=device)
    for i, e in enumerate(examples):
        edit[i, : e[4].size(0), : e[4].size(1)] = e[4]
        partner[i, : e[5].size(0)] = e[5]
    sal_s, sal_t = torch.sigmoid(h_s @ sal_w), torch.sigmoid(h_t @ sal_w)
    sinkhorn = dict(alpha=ALPHA, max_iter=ITERS)
    logit, _ = OT.logit_transport(s_top, t_top, s_valid, t_valid, partner, sal_s, sal_t,
                                  torch.tensor(LOGIT_W, device=device), T, TAU, **sinkhorn)
    hidden, _ = OT.hidden_transport(h_s, h_t, s_valid, t_valid, edit, torch.tensor(HIDDEN_W, device=device), WINDOW,
                                    **sinkhorn)
    return logit, hidden


def reference_sinkhorn(cost):
    m, n = cost.shape
    k = torch.exp(-ALPHA * cost)
    a, b = torch.full((m,), 1 / m, device=cost.device), torch.full((n,), 1 / n, device=cost.device)
    u = torch.full((m,), 1 / m, device=cost.device)
    for _ in range(ITERS):
        v = b / (k.t() @ u + 1e-9)
        u = a / (k @ v + 1e-9)
    plan = u[:, None] * k * v[None, :]
    return (plan * cost).sum()


def context(seq):
    out = torch.zeros_like(seq)
    for i in range(seq.size(0)):
        out[i] = seq[max(i - WINDOW, 0): i + WINDOW + 1].mean(0)
    return out


def reference(examples, sal_w):
    logits, hiddens = [], []
    for s_top, t_top, h_s, h_t, edit, partner in examples:
        z = (1 - T) * s_top.detach()[partner] + T * t_top
        sp, tp = F.softmax(s_top / TAU, -1), F.softmax(z / TAU, -1)
        euc = torch.cdist(tp, sp)
        kl = (tp.unsqueeze(1) * torch.log(tp.unsqueeze(1) / (sp.unsqueeze(0) + 1e-7))).sum(-1)
        sal = (torch.sigmoid(h_t @ sal_w)[:, None] - torch.sigmoid(h_s @ sal_w)[None, :]).abs()
        logits.append(reference_sinkhorn(LOGIT_W[0] * euc + LOGIT_W[1] * kl + LOGIT_W[2] * sal))
        ctx_s, ctx_t = context(h_s), context(h_t)
        dist = torch.cdist(ctx_t, ctx_s)
        cos = 1 - F.normalize(ctx_t, dim=-1) @ F.normalize(ctx_s, dim=-1).t()
        cost = HIDDEN_W[0] * edit + HIDDEN_W[1] * dist / dist.detach().max() + HIDDEN_W[2] * cos
        hiddens.append(reference_sinkhorn(cost))
    return torch.stack(logits), torch.stack(hiddens)


def main(argv=None):
    ap = measure.arguments(__doc__, PRESETS, warmup=1, repeats=3)
    args = ap.parse_args(argv)
    device = measure.device_of(args.device)
    examples, sal_w = inputs(args.preset, device)
    tokens = sum(e[0].size(0) for e in examples)
    results, values = {}, {}
    for name, fn in (("reference", reference), ("ours", ours)):
        def step():
            for e in examples:
                for x in e[:4]:
                    x.requires_grad_(True)
                    x.grad = None
            logit, hidden = fn(examples, sal_w)
            (logit.sum() + hidden.sum()).backward()
            return logit.detach(), hidden.detach()

        values[name] = step()
        wall, cpu = measure.time_call(step, device, args.warmup, args.repeats)
        peak = measure.peak_extra_bytes(step, device)
        results[name] = {"step_s": wall, "cpu_s": cpu, "tokens_per_s": tokens / wall, "peak_extra_mib": peak / measure.MiB}
    diff = max(float(((values["ours"][i] - values["reference"][i]).abs() / values["reference"][i].abs()).max())
               for i in range(2))
    ratios = {"tokens_per_s ours/reference": results["ours"]["tokens_per_s"] / results["reference"]["tokens_per_s"],
              "peak_memory ours/reference": results["ours"]["peak_extra_mib"] / results["reference"]["peak_extra_mib"],
              "max relative difference of the terms": diff}
    b, n, k, d = PRESETS[args.preset]
    print(f"multi-cost OT terms, preset {args.preset}: {b} examples, {tokens} student labels, top-{k}, hidden {d}")
    print(measure.markdown_table([dict(name=k_, **v) for k_, v in results.items()],
                                 [("impl", "name", None), ("step s", "step_s", "{:.4f}"),
                                  ("tokens/s", "tokens_per_s", "{:,.0f}"), ("peak extra MiB", "peak_extra_mib", "{:,.1f}")]))
    print(" ".join(f"{k_}: {v:.3g}" for k_, v in ratios.items()))
    measure.write_json(args.json, {"preset": args.preset, "tokens": tokens, "results": results, "ratios": ratios,
                                   "environment": measure.environment(device)})


if __name__ == "__main__":
    main()
