"""Dual-space KD (``dskd``, one tokenizer; ``dskd_cma``, across tokenizers) against independent
float64 computations one unpadded example at a time: loss, and the gradients of the student and of
the projections (the criterion's own parameters), for two divergences and temperatures."""
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

import distill_plugins  # noqa: F401
from conftest import tiny_model
from distill_plugins import divergences as D
from distill_plugins.errors import DistillError
from distill_plugins.tasks.instruction_distillation import InstructionDistillationConfig, InstructionDistillationTask
from distill_plugins.teacher import Teacher
from test_cross_tokenizer import EXAMPLES, KD_RATIO, setup  # noqa: F401  (the fixture)

DIVERGENCE = {"forward_kl": D.forward_kl, "skew_kl": D.skew_kl}


def readout(h, model):
    return h.double() @ model.decoder.output_projection.weight.double().t()


def features(model, tokens, eos):
    src = torch.tensor([[eos] + tokens[:-1]])
    return model(src, features_only=True)[0][0]


def std(x):
    return x.double().std()  # unbiased, over every entry of one sequence's rows


def one_example_terms(crit, student, teacher, s_tokens, n_prompt_s, t_tokens, n_prompt_t, s_eos, t_eos, divergence,
                      temperature, cma):
    """(CE, KD without the s2t part, s2t KL summed, student labels, teacher labels) of one example."""
    p = crit.projectors
    h_s, h_t = features(student, s_tokens, s_eos), features(teacher, t_tokens, t_eos).detach()
    y = torch.tensor(s_tokens[n_prompt_s:])
    rows_s, rows_t = slice(n_prompt_s, None), slice(n_prompt_t, None)
    w_s = student.decoder.output_projection.weight.detach().double()
    if cma:
        e_s, e_t = student.decoder.embed_tokens.weight.detach(), teacher.decoder.embed_tokens.weight.detach()
        src_s, src_t = [s_eos] + s_tokens[:-1], [t_eos] + t_tokens[:-1]
        q = p.query(torch.cat([e_s[src_s], e_s[s_tokens]], dim=-1)).double()
        # DSKD's align_mask: only the response (label) positions are attended, and the std is theirs
        t_in, t_next = e_t[src_t][rows_t].double(), e_t[t_tokens][rows_t].double()
        k = torch.cat([t_in, t_next], dim=-1)
        k = k / std(k)
        v_t = p.t2s((h_t[rows_t].double() / std(h_t[rows_t]) + t_next / std(t_next)).float()).double()
        scores = q[rows_s] @ k.t() / q.size(-1) ** 0.5
        t2s_h = torch.softmax(scores, dim=-1) @ v_t
        s2t_h = torch.softmax(scores.t(), dim=-1) @ p.s2t(h_s[rows_s]).double()
        t2s = t2s_h @ w_s.t()
        s2t = s2t_h @ teacher.decoder.output_projection.weight.double().t()
    else:
        t2s = p.t2s(h_t[rows_s]).double() @ w_s.t()
        s2t = p.s2t(h_s[rows_s]).double() @ teacher.decoder.output_projection.weight.double().t()
    s_logits, t_logits = readout(h_s[rows_s], student), readout(h_t[rows_t], teacher)
    d = divergence(s_logits, t2s.detach(), temperature=temperature)
    if cma:
        d = d * t2s.argmax(-1).eq(y)
    kd = F.cross_entropy(t2s, y, reduction="sum") + d.sum()
    s2t_kl = D.forward_kl(s2t, t_logits, temperature=temperature).sum()
    return F.cross_entropy(s_logits, y, reduction="sum"), kd, s2t_kl, len(y), len(t_tokens) - n_prompt_t


def reference(crit, task, student, teacher, divergence, temperature, cma, examples):
    ce = kd = s2t = 0.0
    n_s = n_t = 0
    s_dict = task.dictionary
    t_dict = task.teacher_task.dictionary if cma else s_dict
    for ex in examples:
        s_words, t_words = (ex[0], ex[1]), ((ex[2], ex[3]) if cma else (ex[0], ex[1]))
        s_tokens = [s_dict.index(w) for w in s_words[0] + s_words[1]] + [s_dict.eos()]
        t_tokens = [t_dict.index(w) for w in t_words[0] + t_words[1]] + [t_dict.eos()]
        c, k, s, a, b = one_example_terms(crit, student, teacher, s_tokens, len(s_words[0]), t_tokens, len(t_words[0]),
                                          s_dict.eos(), t_dict.eos(), divergence, temperature, cma)
        ce, kd, s2t, n_s, n_t = ce + c, kd + k, s2t + s, n_s + a, n_t + b
    return (1 - KD_RATIO) * ce + KD_RATIO * (kd + s2t * n_s / n_t), n_s


@pytest.fixture(scope="module")
def same_tokenizer(setup):  # noqa: F811
    """One tokenizer: the student's dictionary and examples for both; a 24-dim teacher."""
    task, student, _, _, _ = setup
    one = InstructionDistillationTask(InstructionDistillationConfig(tokens_per_sample=32), task.dictionary)
    one.student_hidden_dim = 16
    teacher = tiny_model(one, seed=3, decoder_embed_dim=24)
    one.teachers = [Teacher(teacher, path="<in memory>", sha256="0" * 64)]
    from test_cross_tokenizer import side

    ds = side(task.dictionary, [(e[0], e[1]) for e in EXAMPLES])
    return one, student, teacher, ds.collater([ds[i] for i in range(len(ds))])


def check(crit, student, sample, want_fn):
    """Loss and the gradients of the student and of every criterion parameter against ``want_fn()``
    = (the reference loss, its sample size)."""
    params = list(student.parameters()) + list(crit.parameters())
    for q in params:
        q.grad = None
    loss, sample_size, log = crit(student, sample)
    loss.backward()
    got = [q.grad.clone() for q in params]
    for q in params:
        q.grad = None
    want, n = want_fn()
    want.backward()
    assert sample_size == n
    torch.testing.assert_close(loss.double(), want.detach(), rtol=1e-5, atol=1e-5)
    for g, q in zip(got, params):
        torch.testing.assert_close(g.double(), q.grad.double(), rtol=1e-4, atol=1e-6)
    assert all(g.abs().sum() > 0 for g in got[-4:])  # every projection is trained
    return log


IMPLS = [("plain", 1024), ("chunked", 4), ("fused", 5)]  # chunks of 4-5 rows: several per batch, recomputed


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("divergence,temperature", [("forward_kl", 1.0), ("skew_kl", 2.0)])
def test_dskd_matches_the_per_example_reference(same_tokenizer, divergence, temperature, impl):
    task, student, teacher, sample = same_tokenizer
    torch.manual_seed(0)
    crit = task.build_criterion(OmegaConf.create({"_name": "dskd", "kd_ratio": KD_RATIO, "temperature": temperature,
                                                  "dskd_divergence": divergence, "kd_impl": impl[0],
                                                  "kd_chunk_size": impl[1]}))
    assert sum(q.numel() for q in crit.parameters()) == (24 * 16 + 16) + (16 * 24 + 24)
    log = check(crit, student, sample,
                lambda: reference(crit, task, student, teacher, DIVERGENCE[divergence], temperature, False, EXAMPLES))
    assert {"t2s_ce", "t2s_kd", "s2t_kl", "t2s_correct"} <= log.keys()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("divergence,temperature", [("forward_kl", 1.0), ("skew_kl", 2.0)])
def test_dskd_cma_matches_the_per_example_reference(setup, divergence, temperature, impl):  # noqa: F811
    task, student, teacher, sample, _ = setup
    task.student_hidden_dim = 16
    torch.manual_seed(1)  # the projections' initialisation
    crit = task.build_criterion(OmegaConf.create({"_name": "dskd_cma", "kd_ratio": KD_RATIO,
                                                  "temperature": temperature, "dskd_divergence": divergence,
                                                  "kd_impl": impl[0], "kd_chunk_size": impl[1]}))
    assert crit.projectors.query.weight.shape == (48, 32)
    log = check(crit, student, sample,
          lambda: reference(crit, task, student, teacher, DIVERGENCE[divergence], temperature, True, EXAMPLES))
    assert 0 < log["t2s_correct"] == log["aligned_tokens"]  # D counts where argmax t2s is the label: some are


def test_dskd_bad_options(same_tokenizer):
    task = same_tokenizer[0]
    with pytest.raises(DistillError, match="--dskd-divergence: unknown divergence 'nope'"):
        task.build_criterion(OmegaConf.create({"_name": "dskd", "dskd_divergence": "nope"}))
    task.student_hidden_dim = None
    try:
        with pytest.raises(DistillError, match="hidden @ weight.T"):
            task.build_criterion(OmegaConf.create({"_name": "dskd"}))
    finally:
        task.student_hidden_dim = 16
