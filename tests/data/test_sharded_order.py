"""Data orders over workers: ShardedOrder reshuffles every epoch and gives each worker its own items;
WorldSizeAwareEpochBatchIterator saves the worker count and rescales fairseq's position when it
changes (the multi-process resume test covers it end to end, slowly); --lm-data blocks are
next-token pairs."""
from unittest import mock

from fairseq.data.iterators import EpochBatchIterator

from distill_plugins.data import sharded_order
from distill_plugins.data.sharded_order import ShardedOrder
from distill_plugins.data.world_size_resume import WorldSizeAwareEpochBatchIterator, track_world_size


def test_every_epoch_is_reshuffled():
    o = ShardedOrder(50, seed=3, stream=2)
    first, second = o.take(50), o.take(50)
    assert sorted(first) == sorted(second) == list(range(50))
    assert first != second  # the epoch enters the seed


def test_as_many_items_as_workers_one_each():
    got = []
    for rank in range(3):
        with mock.patch.object(sharded_order, "rank_and_world", return_value=(rank, 3)):
            got += ShardedOrder(3, seed=1, stream=1).take(1)
    assert sorted(got) == [0, 1, 2]


def test_world_size_change_rescales_the_position(monkeypatch):
    seen = []
    monkeypatch.setattr(EpochBatchIterator, "load_state_dict", lambda self, s: seen.append(dict(s)))
    monkeypatch.setattr(EpochBatchIterator, "state_dict", lambda self: {"epoch": 1, "iterations_in_epoch": 3})
    it = WorldSizeAwareEpochBatchIterator.__new__(WorldSizeAwareEpochBatchIterator)
    it.num_shards = 3
    assert it.state_dict() == {"epoch": 1, "iterations_in_epoch": 3, "num_shards": 3}
    it.load_state_dict({"epoch": 1, "iterations_in_epoch": 4, "num_shards": 2})  # 8 consumed -> 2 each of 3 (+2 again)
    it.num_shards = 1
    it.load_state_dict({"epoch": 1, "iterations_in_epoch": 2, "num_shards": 2})  # 4 consumed -> 4
    it.load_state_dict({"epoch": 1, "iterations_in_epoch": 5})  # older checkpoint: as fairseq
    it.num_shards = 2
    it.load_state_dict({"epoch": 1, "iterations_in_epoch": 3, "num_shards": 2})  # same count: unchanged
    assert [s["iterations_in_epoch"] for s in seen] == [2, 4, 5, 3]


def test_track_world_size_converts_fairseqs_iterator():
    it = EpochBatchIterator.__new__(EpochBatchIterator)
    assert type(track_world_size(it)) is WorldSizeAwareEpochBatchIterator


def test_lm_blocks_are_next_token_pairs():
    import torch
    from distill_plugins.data.lm_corpus import LMBlocks

    ex = LMBlocks([torch.tensor([5, 6, 7, 8])], eos=2, pad=1)[0]
    assert ex["source"].tolist() == [2, 5, 6, 7] and ex["target"].tolist() == [1, 6, 7, 8]
