"""Checkpoint state of MiniLLM's rollout store and of the seeded prompt / LM orders: a store or an
order rebuilt from its ``state_dict`` continues exactly where the original was."""
from unittest import mock

import torch

from distill_plugins.data import sharded_order
from distill_plugins.data.example_packing import pack_examples, unpack_examples
from distill_plugins.data.prompt_response_dataset import join_prompt_response
from distill_plugins.data.sharded_order import ShardedOrder
from distill_plugins.rollouts import ROLLOUT_FIELDS, RolloutStore

PAD, EOS = 1, 2


def rollout(i, prompt_len, response_len, max_len=64):
    g = torch.Generator().manual_seed(i)
    prompt = torch.randint(4, 300, (prompt_len,), generator=g)
    response = torch.cat([torch.randint(4, 300, (response_len,), generator=g), torch.tensor([EOS])])
    ex = join_prompt_response(prompt, response, PAD, EOS, max_len, index=100 + i)
    n = int(ex["target"].ne(PAD).sum())
    ex.update({name: torch.randn(n, generator=g) for name in ROLLOUT_FIELDS})
    return ex


def assert_same_examples(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            if torch.is_tensor(x[k]):
                assert torch.equal(x[k], y[k]), k
            else:
                assert x[k] == y[k], k


def test_packing_round_trip_with_per_token_fields():
    # an empty response (EOS only), a prompt cut by max_len (no labels at all), ordinary rows
    examples = [rollout(0, 5, 7), rollout(1, 3, 0), rollout(2, 70, 4), rollout(3, 1, 20)]
    assert int(examples[2]["target"].ne(PAD).sum()) == 0 and len(examples[2]["old_logp"]) == 0
    state = pack_examples(examples, PAD, ROLLOUT_FIELDS)
    assert state["tokens"].dtype == torch.int32  # gloo and NCCL broadcast it (not int16) on a multi-worker resume
    assert_same_examples(unpack_examples(state, ROLLOUT_FIELDS), examples)
    assert unpack_examples(pack_examples([], PAD, ROLLOUT_FIELDS), ROLLOUT_FIELDS) == []


def drain(store, sizes):
    return [[r["id"] for r in store.next_minibatch(n)] for n in sizes]


def test_store_resumes_mid_pass_with_the_same_minibatches():
    rollouts = [rollout(i, 4, i % 5) for i in range(10)]
    whole, split = RolloutStore(ppo_epochs=3, seed=7), RolloutStore(ppo_epochs=3, seed=7)
    whole.fill(rollouts)
    split.fill(rollouts)
    sizes = [4, 4, 2, 3, 4, 3, 4, 4, 2]  # 3 passes of 10, each pass ends on its own
    first = drain(split, sizes[:4])  # stop inside the second pass
    state = split.state_dict(PAD)
    resumed = RolloutStore(ppo_epochs=3, seed=0)  # another seed: the saved generator state wins
    resumed.load_state_dict(state)
    assert resumed.epochs_done == 2 and len(resumed.order) == 7
    assert first + drain(resumed, sizes[4:]) == drain(whole, sizes)
    assert resumed.exhausted() and whole.exhausted()
    empty = RolloutStore(ppo_epochs=3)
    empty.load_state_dict(RolloutStore(ppo_epochs=3).state_dict(PAD))
    assert empty.exhausted()


def test_sharded_order_resumes_and_rescales_to_another_world_size():
    whole, split = ShardedOrder(23, seed=5, stream=1), ShardedOrder(23, seed=5, stream=1)
    expected = whole.take(40)
    got = split.take(17)
    resumed = ShardedOrder(23, seed=5, stream=1)
    resumed.load_state_dict(split.state_dict())
    assert got + resumed.take(23) == expected  # crosses the epoch boundary (23 per epoch)
    fresh = ShardedOrder(23, seed=5, stream=1)
    fresh.load_state_dict(ShardedOrder(23, seed=5, stream=1).state_dict())
    assert fresh.take(5) == expected[:5]

    # saved by one worker 10 items into epoch 2 (of 23), resumed by rank 1 of 2: its share of the
    # same epoch, at the same fraction (10 // 2 = 5 of its 11 items)
    one = ShardedOrder(23, seed=5, stream=1)
    one.take(33)
    state = one.state_dict()
    assert state == {"epoch": 2, "pos": 10, "world": 1}
    with mock.patch.object(sharded_order, "rank_and_world", return_value=(1, 2)):
        two = ShardedOrder(23, seed=5, stream=1)
        two.load_state_dict(state)
        share = two._share(1)
        assert len(share) == 11 and two.take(3) == [int(i) for i in share[5:8]]
