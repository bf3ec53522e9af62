"""The replay buffer's checkpoint state (token tensors, restored exactly, loadable with
weights_only) and the token budget of replayed / generated batches (--max-tokens)."""
import io
from types import SimpleNamespace

import pytest
import torch

from distill_plugins.data.prompt_response_dataset import collate_examples, join_prompt_response
from distill_plugins.generated import schedule
from distill_plugins.generated.replay_buffer import ReplayBuffer
from distill_plugins.generated.student_data import StudentData, within_token_budget

PAD, EOS = 1, 2


def example(i, n_prompt, n_response, max_len=12, vocab=400):
    g = torch.Generator().manual_seed(i)
    prompt = torch.randint(4, vocab, (n_prompt,), generator=g)
    response = torch.cat([torch.randint(4, vocab, (n_response,), generator=g), torch.tensor([EOS])])
    return join_prompt_response(prompt, response, PAD, EOS, max_len, index=100 + i)


# varied lengths, an empty response, a response cut at max_len, a prompt filling max_len
SHAPES = [(3, 4), (6, 1), (2, 0), (5, 20), (12, 3), (1, 2)]


def same(a, b):
    return (a["id"] == b["id"] and a["prompt_length"] == b["prompt_length"]
            and torch.equal(a["source"], b["source"]) and torch.equal(a["target"], b["target"]))


@pytest.mark.parametrize("vocab", [400, 50257])
def test_buffer_state_restores_contents_and_sampling(vocab):
    buf = ReplayBuffer(5, seed=3)
    buf.push([example(i, p, r, vocab=vocab) for i, (p, r) in enumerate(SHAPES)])  # the first falls out
    buf.sample(2)  # advance the sampling stream
    state = buf.state_dict(PAD)
    assert state["tokens"].dtype == torch.int32  # token tensors, no padding: sum of (L + 1)
    assert state["tokens"].numel() == sum(len(e["source"]) + 1 for e in buf.items)
    stream = io.BytesIO()
    torch.save({"task_state": {"student_data": {"buffer": state}}}, stream)
    stream.seek(0)  # fairseq's resume loads checkpoints weights_only
    loaded = torch.load(stream, weights_only=True)["task_state"]["student_data"]["buffer"]

    other = ReplayBuffer(5, seed=99)
    other.load_state_dict(loaded)
    assert len(other) == 5 and all(same(a, b) for a, b in zip(buf.items, other.items))
    assert [e["id"] for e in other.sample(3)] == [e["id"] for e in buf.sample(3)]  # same stream onward
    collate_examples(list(other.items), PAD)  # the restored examples batch like fresh ones

    smaller = ReplayBuffer(2, seed=0)  # a smaller --replay-buffer-size on resume keeps the newest
    smaller.load_state_dict(loaded, restore_rng=False)
    assert [e["id"] for e in smaller.items] == [e["id"] for e in list(buf.items)[-2:]]
    empty = ReplayBuffer(4)
    empty.load_state_dict(ReplayBuffer(4).state_dict(PAD))
    assert len(empty) == 0


def cfg(**kw):
    base = dict(student_data_mode="adaptive", student_data_lambda=0.5, replay_buffer_size=6, adaptive_tau_init=1.0,
                adaptive_loss_eps=0.1, replay_ratio="constant", gen_max_new_tokens=8, gen_top_p=1.0,
                gen_temperature=1.0, max_update=10, seed=1, tokens_per_sample=64, student_data_trace=None,
                max_tokens=None, batch_size=None)
    base.update(kw)
    return SimpleNamespace(**base)


def test_worker_state_restores_on_any_rank():
    """The checkpoint holds rank 0's buffer; another rank (or world size) gets a copy of its
    contents but keeps its own sampling stream."""
    task = SimpleNamespace(dictionary=SimpleNamespace(pad=lambda: PAD))
    saver = StudentData(cfg(), task)
    saver.buffer.push([example(i, p, r) for i, (p, r) in enumerate(SHAPES)])
    saver.threshold.tau, saver.threshold.prev_loss = 0.3, 2.5
    state = saver.state_dict()
    assert state["buffer_fill"] == 6 and state["buffer_rank"] == 0 and state["world"] == 1

    same_rank = StudentData(cfg(), task)
    same_rank.load_state_dict(state)
    assert all(same(a, b) for a, b in zip(saver.buffer.items, same_rank.buffer.items))
    assert same_rank.buffer.rng.getstate() == saver.buffer.rng.getstate()
    assert same_rank.threshold.tau == 0.3 and same_rank.threshold.prev_loss == 2.5

    rank1 = StudentData(cfg(), task)
    rank1.rank, rank1.world = 1, 3
    rank1.buffer.rng.seed(1001)
    own = rank1.buffer.rng.getstate()
    rank1.load_state_dict(state)
    assert len(rank1.buffer) == 6 and rank1.buffer.rng.getstate() == own
    old = {k: v for k, v in state.items() if k != "buffer"}  # a checkpoint without contents: refills
    legacy = StudentData(cfg(), task)
    legacy.load_state_dict(old)
    assert len(legacy.buffer) == 0 and legacy.threshold.tau == 0.3


def test_token_budget_keeps_the_longest_fitting_prefix():
    exs = [example(i, p, r, max_len=64) for i, (p, r) in enumerate([(3, 2), (4, 30), (2, 1), (5, 5), (3, 3)])]
    lengths = [len(e["source"]) for e in exs]
    assert lengths == [6, 35, 4, 11, 7]
    assert within_token_budget(exs, None) == exs  # no limit
    kept = within_token_budget(exs, 100)  # 6 fits, 2 x 35 = 70 fits, 3 x 35 = 105 does not
    assert kept == exs[:2]
    assert within_token_budget(exs, 10) == exs[:1]  # at least one example, even over the budget
    assert within_token_budget(exs, 1000, max_sentences=3) == exs[:3]
    for budget in range(1, 200, 7):
        batch = collate_examples(within_token_budget(exs, budget), PAD)
        src = batch["net_input"]["src_tokens"]
        assert src.numel() <= budget or src.size(0) == 1


def test_replayed_batch_respects_max_tokens():
    """A replay of long buffered sequences in place of a batch of short ones keeps to --max-tokens."""
    task = SimpleNamespace(dictionary=SimpleNamespace(pad=lambda: PAD))
    sd = StudentData(cfg(max_tokens=60, replay_buffer_size=6), task)
    sd._started = True  # no checkpoint, no initial dev loss
    sd.buffer.push([example(i, 4, 25, max_len=64) for i in range(6)])  # 30 tokens each
    short = collate_examples([example(50 + i, 2, 1, max_len=64) for i in range(8)], PAD)  # 8 x 4 = 32 tokens
    # tau 1, constant ratio (s = 0.5): r in [0.5, 1) replays from the full buffer
    update = next(u for u in range(100) if schedule.decision_random(1, u, 0) >= 0.5)
    batch, log = sd.prepare(task, short, model=None, criterion=None, update_num=update)
    assert log["sd_buf"] == 1.0
    src = batch["net_input"]["src_tokens"]
    assert src.size(0) == 2 and src.numel() <= 60  # 8 requested, 2 x 30 fit
    assert set(batch["id"].tolist()) <= set(range(100, 106))


@pytest.mark.parametrize("rank", [0, 1])
def test_initial_dev_loss_calls_the_criterion_equally_often_on_every_worker(data_bin, rank, monkeypatch):
    """24 dev rows in batches of 5 over 2 workers: shares of 3 and 2 batches (+ fairseq's empty
    filler); the short worker runs a dummy batch (dropped), since a sharded teacher's or student's
    forward is a collective that every worker must call equally often."""
    from conftest import tiny_model
    from distill_plugins.generated import student_data as module
    from distill_plugins.tasks.instruction_distillation import (InstructionDistillationConfig,
                                                                InstructionDistillationTask)

    task = InstructionDistillationTask.setup_task(InstructionDistillationConfig(data=data_bin, seed=1))
    task.load_dataset("valid")
    model = tiny_model(task, 0)
    sd = StudentData(cfg(max_tokens_valid=None, batch_size_valid=5, valid_subset="valid"), task)
    sd.rank, sd.world = rank, 2
    reduced = []
    monkeypatch.setattr(module.dist_utils, "all_reduce", lambda t, group: reduced.append(t.clone()))
    monkeypatch.setattr(module.dist_utils, "get_data_parallel_group", lambda: None)
    calls = []

    def criterion(model, sample):
        n = int(sample["ntokens"])
        calls.append(n)
        return None, n, {"nll_loss": 2.0 * n, "ntokens": n}

    assert sd.initial_dev_loss(task, model, criterion) == pytest.approx(2.0)
    assert len(calls) == 3  # on both workers: 3 real batches, or 2 and a dummy
    counted = sum(calls) if rank == 0 else sum(calls[:2])  # the dummy's tokens are not counted
    assert reduced[0][1] == counted


def test_dummy_batches_generate_nothing_and_leave_the_buffer(monkeypatch):
    """fairseq's stand-in batch of a worker out of data (ignore_grad) trains on itself: its prompts
    are not generated for, and the buffer holds generations of batches actually trained on."""
    task = SimpleNamespace(dictionary=SimpleNamespace(pad=lambda: PAD), own_restored_state=lambda key: None)
    sd = StudentData(cfg(student_data_mode="always"), task)
    made = []

    def generate(task, model, sample, device):
        made.append(sample["id"].tolist())
        return [example(int(i), 3, 2) for i in sample["id"]], 0.0

    monkeypatch.setattr(sd, "_generate", generate)
    sample = collate_examples([example(i, 3, 2) for i in (7, 8)], PAD)
    trained, log = sd.prepare(task, sample, None, None, update_num=0)
    first = sample["id"].tolist()
    assert made == [first] and len(sd.buffer) == 2 and log["sd_gen"] == 1.0
    state = sd.buffer.rng.getstate()
    again, log = sd.prepare(task, sample, None, None, update_num=1, dummy=True)
    assert made == [first] and len(sd.buffer) == 2 and again is sample and log["sd_gt"] == 1.0
    assert sd.buffer.rng.getstate() == state
