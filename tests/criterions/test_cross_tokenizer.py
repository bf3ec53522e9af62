"""The cross-tokenizer criterions ``uld`` and ``min_ed`` built in-process, against independent float64
computations one example at a time: the student and the teacher each see their own tokenization of
the same examples (different lengths, vocabularies, an empty response, padding).

    loss = (1 - kd_ratio) * sum_t CE_t + kd_ratio * D,   sample_size = the student's labels
"""
import json
import math

import pytest
import torch
from fairseq.data import Dictionary
from omegaconf import OmegaConf

import distill_plugins  # noqa: F401  (registers task, criterions, archs)
from conftest import tiny_model
from distill_plugins import divergences as D
from distill_plugins.criterions.min_ed import first_teacher_ids, teacher_in_student_vocab
from distill_plugins.criterions.uld import paired_positions
from distill_plugins.data.paired_tokenizations import PairedTokenizationDataset
from distill_plugins.data.prompt_response_dataset import PromptResponseDataset
from distill_plugins.errors import DistillError
from distill_plugins.tasks.instruction_distillation import InstructionDistillationConfig, InstructionDistillationTask
from distill_plugins.teacher import Teacher
from distill_plugins.token_alignment import ALIGNMENT_FILE, dtw_alignment, vocabulary_mapping

STUDENT_WORDS = ["▁the", "▁blue", "berry", "▁red", "▁sky", "▁is", "▁a", "▁fruit", "▁repeat", ":"]
TEACHER_WORDS = ["Ġthe", "Ġblue", "berr", "y", "Ġre", "d", "Ġsky", "Ġis", "Ġa", "Ġfru", "it", "Ġrepeat", ":", "Ġx"]
# (prompt, response) as words of each tokenization: the same texts split differently
EXAMPLES = [
    (["▁repeat", ":", "▁the", "▁sky"], ["▁the", "▁sky"],
     ["Ġrepeat", ":", "Ġthe", "Ġsky"], ["Ġthe", "Ġsky"]),
    (["▁repeat", ":", "▁blue", "berry"], ["▁blue", "berry", "▁is", "▁a", "▁fruit"],
     ["Ġrepeat", ":", "Ġblue", "berr", "y"], ["Ġblue", "berr", "y", "Ġis", "Ġa", "Ġfru", "it"]),
    (["▁repeat", ":"], [], ["Ġrepeat", ":"], []),  # an empty response: EOS only
    (["▁red"], ["▁red", "▁sky", "▁red"], ["Ġre", "d"], ["Ġre", "d", "Ġsky", "Ġre", "d"]),
    (["▁the", "▁red", "▁fruit"], ["▁the", "▁red", "▁blue", "berry", "▁sky", "▁is"],
     ["Ġthe", "Ġre", "d", "Ġfru", "it"], ["Ġthe", "Ġx"]),  # the teacher's response is the shorter
]
KD_RATIO = 0.6


def dictionary(words):
    d = Dictionary()
    for w in words:
        d.add_symbol(w)
    return d


def side(d, pairs, max_len=32):
    """A PromptResponseDataset of (prompt, response) words, binarized as fairseq-preprocess does."""
    enc = lambda ws: torch.tensor([d.index(w) for w in ws] + [d.eos()])  # noqa: E731
    prompts, responses = [enc(p) for p, _ in pairs], [enc(r) for _, r in pairs]

    class Listed(list):
        sizes = None

    p_ds, r_ds = Listed(prompts), Listed(responses)
    p_ds.sizes, r_ds.sizes = [len(x) for x in prompts], [len(x) for x in responses]
    return PromptResponseDataset(p_ds, r_ds, d, max_len=max_len, shuffle=False)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    s_dict, t_dict = dictionary(STUDENT_WORDS), dictionary(TEACHER_WORDS)
    teacher_dir = tmp_path_factory.mktemp("teacher_data")
    mapping = vocabulary_mapping(t_dict.symbols, s_dict.symbols)
    (teacher_dir / ALIGNMENT_FILE).write_text(json.dumps(
        {"student_tokens": s_dict.symbols, "teacher_tokens": t_dict.symbols, "teacher_to_student": mapping}))
    task = InstructionDistillationTask(InstructionDistillationConfig(tokens_per_sample=32,
                                                                     teacher_data=str(teacher_dir)), s_dict)
    task.teacher_task = InstructionDistillationTask(InstructionDistillationConfig(tokens_per_sample=32), t_dict)
    student = tiny_model(task, seed=1)
    teacher_model = tiny_model(task.teacher_task, seed=2, decoder_embed_dim=24)
    task.teachers = [Teacher(teacher_model, path="<in memory>", sha256="0" * 64)]
    ds = PairedTokenizationDataset(side(s_dict, [(e[0], e[1]) for e in EXAMPLES]),
                                   side(t_dict, [(e[2], e[3]) for e in EXAMPLES]))
    sample = ds.collater([ds[i] for i in range(len(ds))])
    return task, student, teacher_model, sample, mapping


def build(task, name, **options):
    return task.build_criterion(OmegaConf.create({"_name": name, "kd_ratio": KD_RATIO, **options}))


def per_example(model, d, prompt, response):
    """Logits (float64) of ``model`` at the labels of one unpadded example, and the labels."""
    tokens = [d.index(w) for w in prompt + response] + [d.eos()]
    src = torch.tensor([[d.eos()] + tokens[:-1]])
    logits = model(src)[0][0].double()
    return logits[len(prompt):], torch.tensor(tokens[len(prompt):])


def reference_loss(task, student, teacher_model, divergence_of_example, temperature):
    """(1 - r) CE + r D summed over the examples one at a time; ``divergence_of_example`` gives one
    example's summed D from (student logits, labels, teacher logits, teacher labels, its words)."""
    total, n = 0.0, 0
    for ex in EXAMPLES:
        s, labels = per_example(student, task.dictionary, ex[0], ex[1])
        with torch.no_grad():
            t, t_labels = per_example(teacher_model, task.teacher_task.dictionary, ex[2], ex[3])
        ce = torch.nn.functional.cross_entropy(s, labels, reduction="sum")
        total = total + (1 - KD_RATIO) * ce + KD_RATIO * divergence_of_example(s, labels, t, t_labels, ex, temperature)
        n += len(labels)
    return total, n


def uld_of_example(s, labels, t, t_labels, ex, temperature):
    k = min(len(labels), len(t_labels))  # the first k response labels of each side pair up
    return sum(D.universal_logit_distance(s[i], t[i], temperature=temperature) for i in range(k))


def min_ed_of_example(mapping, student_words, teacher_words):
    def divergence(s, labels, t, t_labels, ex, temperature):
        s_strings = [student_words[i] for i in labels.tolist()]
        t_strings = [teacher_words[j] for j in t_labels.tolist()]
        aligned = [[] for _ in s_strings]  # DSKD's dtw(teacher, student), read from the student's side
        for j, students in enumerate(dtw_alignment(t_strings, s_strings)):
            for i in students:
                aligned[i].append(j)
        total = 0.0
        for i, js in enumerate(aligned):
            goal = torch.full((s.size(-1),), -1e5, dtype=torch.float64)
            if len(js) == 1 and mapping[int(t_labels[js[0]])] == int(labels[i]):
                for w in reversed(range(t.size(-1))):  # the first (lowest-id) teacher token mapped to each
                    goal[mapping[w]] = t[js[0], w]  # student token (DSKD: max_align_num = 1)
            else:
                goal[labels[i]] = 100.0
            total = total + D.forward_kl(s[i], goal, temperature=temperature)
        return total
    return divergence


IMPLS = [("plain", 1024), ("chunked", 4), ("fused", 4), ("fused", 1024)]  # chunks of 4 cross the examples


def check_criterion(setup, name, divergence, temperature, impl=("fused", 1024)):
    task, student, teacher_model, sample, _ = setup
    criterion = build(task, name, temperature=temperature, kd_impl=impl[0], kd_chunk_size=impl[1])
    assert criterion.uses_memory_efficient_loss() == (impl[0] != "plain")
    student.zero_grad()
    loss, sample_size, log = criterion(student, sample)
    loss.backward()
    got_grads = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()
    want, n = reference_loss(task, student, teacher_model, divergence, temperature)
    want.backward()
    assert sample_size == n == log["ntokens"]
    torch.testing.assert_close(loss.double(), want.detach(), rtol=1e-5, atol=1e-5)
    for g, p in zip(got_grads, student.parameters()):
        torch.testing.assert_close(g.double(), p.grad.double(), rtol=1e-4, atol=1e-6)
    return log


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_uld_loss_and_gradients_match_the_per_example_reference(setup, temperature, impl):
    log = check_criterion(setup, "uld", uld_of_example, temperature, impl)
    # every student label has a teacher partner except the last 4 of example 5 (teacher: 3 labels)
    assert log["aligned_tokens"] == log["ntokens"] - 4


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_min_ed_loss_and_gradients_match_the_per_example_reference(setup, temperature, impl):
    task, _, _, _, mapping = setup
    log = check_criterion(setup, "min_ed", min_ed_of_example(mapping, task.dictionary.symbols,
                                                             task.teacher_task.dictionary.symbols), temperature, impl)
    assert 0 < log["aligned_tokens"] < log["ntokens"]


@pytest.mark.parametrize("name", ["uld", "min_ed"])
def test_memory_efficient_forms_equal_plain_on_a_bf16_student(setup, name):
    """bf16 student and teacher: chunked and fused accumulate in float32 like plain: the same loss, and
    gradients as close to those of the same weights in float32 as plain's (bf16 backward of the model)."""
    import copy

    task, student, teacher_model, sample, _ = setup
    s16, t16 = copy.deepcopy(student).to(torch.bfloat16), copy.deepcopy(teacher_model).to(torch.bfloat16)
    s32, t32 = copy.deepcopy(s16).float(), copy.deepcopy(t16).float()
    saved = task.teachers

    def run(model, teacher, impl, chunk):
        task.teachers = [Teacher(teacher, path="<in memory>", sha256="0" * 64)]
        model.zero_grad()
        loss, _, log = build(task, name, kd_impl=impl, kd_chunk_size=chunk)(model, sample)
        loss.backward()
        assert loss.dtype == torch.float32
        return loss.item(), torch.cat([p.grad.float().flatten() for p in model.parameters()]), log["aligned_tokens"]

    try:
        _, g32, aligned32 = run(s32, t32, "plain", 1024)
        results = {(impl, chunk): run(s16, t16, impl, chunk) for impl, chunk in IMPLS}
    finally:
        task.teachers = saved
    plain_loss, plain_grad, _ = results[("plain", 1024)]
    plain_error = ((plain_grad - g32).norm() / g32.norm()).item()
    assert plain_error < 0.1
    for key, (loss, grad, aligned) in results.items():
        assert loss == pytest.approx(plain_loss, rel=1e-5), key
        assert ((grad - g32).norm() / g32.norm()).item() <= 1.25 * plain_error + 1e-3, key
        assert aligned == aligned32


def test_min_ed_teaches_one_to_one_aligned_tokens_only(setup):
    task, student, _, sample, mapping = setup
    criterion = build(task, "min_ed")
    # example 1: "the sky </s>" == "the sky </s>": all 3 taught. Example 2: "blue berry is a fruit </s>" vs
    # "blue berr y is a fru it </s>": DTW pairs berry-berr (1) and then is-y (2) + is-is (0), cheaper than
    # berry-y (4); so blue, berry (by "berr", which maps back to "berry"), a and </s> are taught, while "is"
    # (two teacher tokens) and "fruit" (fru + it) get the one-hot
    s_ids = lambda ws: [task.dictionary.index(w) for w in ws] + [task.dictionary.eos()]  # noqa: E731
    t_ids = lambda ws: [task.teacher_task.dictionary.index(w) for w in ws] + [task.teacher_task.dictionary.eos()]  # noqa: E731
    assert criterion.teacher_rows(s_ids(EXAMPLES[0][1]), t_ids(EXAMPLES[0][3])) == [0, 1, 2]
    assert criterion.teacher_rows(s_ids(EXAMPLES[1][1]), t_ids(EXAMPLES[1][3])) == [0, 1, -1, 4, -1, 7]
    assert criterion.teacher_rows(s_ids([]), t_ids([])) == [0]  # an empty response: EOS to EOS


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_min_ed_with_one_tokenizer_is_token_level_kd(tmp_path, temperature):
    """Both sides tokenized alike, with word-start and word-internal pieces of the same letters ("▁a",
    "a"): the mapping is the identity, DTW pairs every label with itself, and MinED is forward KL to
    the teacher at every label: (1 - r) CE + r KL(p || q)."""
    words = ["▁a", "a", "▁b", "b", "▁ab", ":"]
    pairs = [(["▁a", ":"], ["▁a", "b", "a"]), (["▁b"], ["▁ab", "a", "▁a"]), ([":"], [])]
    d = dictionary(words)
    mapping = vocabulary_mapping(d.symbols, d.symbols)
    assert mapping == list(range(len(d)))
    (tmp_path / ALIGNMENT_FILE).write_text(json.dumps(
        {"student_tokens": d.symbols, "teacher_tokens": d.symbols, "teacher_to_student": mapping}))
    task = InstructionDistillationTask(InstructionDistillationConfig(tokens_per_sample=32, teacher_data=str(tmp_path)), d)
    task.teacher_task = InstructionDistillationTask(InstructionDistillationConfig(tokens_per_sample=32), d)
    student, teacher_model = tiny_model(task, seed=1), tiny_model(task, seed=2, decoder_embed_dim=24)
    task.teachers = [Teacher(teacher_model, path="<in memory>", sha256="0" * 64)]
    ds = PairedTokenizationDataset(side(d, pairs), side(d, pairs))
    sample = ds.collater([ds[i] for i in range(len(ds))])
    loss, n, log = build(task, "min_ed", temperature=temperature)(student, sample)
    want, labels = 0.0, 0
    for prompt, response in pairs:
        s, y = per_example(student, d, prompt, response)
        with torch.no_grad():
            t, _ = per_example(teacher_model, d, prompt, response)
        want = want + (1 - KD_RATIO) * torch.nn.functional.cross_entropy(s, y, reduction="sum") \
            + KD_RATIO * D.forward_kl(s, t, temperature=temperature).sum()
        labels += len(y)
    assert n == labels and log["aligned_tokens"] == labels
    torch.testing.assert_close(loss.double(), want.detach(), rtol=1e-5, atol=1e-5)


def test_paired_positions_take_the_first_labels_of_each_row():
    mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 0, 0, 0], [0, 0, 0, 0, 1]], dtype=torch.bool)
    t_mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)
    keep_s, keep_t = paired_positions(mask, t_mask)
    assert keep_s.tolist() == [True, True, False, True, True, False]
    assert keep_t.tolist() == [True, True, True, True, False]


def test_teacher_in_student_vocab_takes_the_first_mapped_token():
    """DSKD keeps max_align_num = 1 teacher id per student id (stu2tea_id_mapping[:1]): the first."""
    g = torch.Generator().manual_seed(0)
    t = torch.randn(4, 7, generator=g)
    t[1, 2] = -math.inf
    t[:, 5] = t[:, 4] + 3.0  # a later teacher token mapped to student 4 with a larger logit: not taken
    mapping = [0, 1, 2, 2, 4, 4, 4]  # student 3 gets nobody; 5 ids in the student's vocabulary
    first = first_teacher_ids(mapping, 5)
    assert first.tolist() == [0, 1, 2, -1, 4]
    got = teacher_in_student_vocab(t, first)
    for n in range(4):
        for v in range(5):
            mapped = [t[n, w].item() for w in range(7) if mapping[w] == v]
            assert got[n, v].item() == (mapped[0] if mapped else -1e5)


def test_cross_tokenizer_criterions_need_teacher_data_and_others_refuse_it(setup, tmp_path):
    task, _, _, _, _ = setup
    with pytest.raises(DistillError, match="--teacher-data"):
        build(task, "kd")
    plain = InstructionDistillationTask(InstructionDistillationConfig(tokens_per_sample=32), task.dictionary)
    plain.teachers = task.teachers
    with pytest.raises(DistillError, match="needs --teacher-data"):
        build(plain, "uld")
    other = InstructionDistillationTask(InstructionDistillationConfig(tokens_per_sample=32, teacher_data=str(tmp_path)),
                                        task.dictionary)
    other.teacher_task, other.teachers = task.teacher_task, task.teachers
    with pytest.raises(DistillError, match=f"no {ALIGNMENT_FILE}"):
        build(other, "min_ed")
