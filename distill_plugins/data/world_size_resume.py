"""Resume the training data where it stopped when the number of workers changes.

fairseq shuffles the epoch's batches identically on every worker and gives worker r the batches
r, r + W, r + 2W, ... (``ShardedIterator``); ``update_freq`` micro-batches are then consumed in
order. A checkpoint records only ``iterations_in_epoch``, the batches *one shard* consumed, so a
checkpoint of W workers resumed by W' workers fast-forwards each new shard by the same count:
W=2 -> W'=1 replays half of what was seen, W=1 -> W'=2 skips as much again, silently.

Every worker advances in lockstep, so the global position is ``iterations_in_epoch * W``. The
checkpoint also records W (``num_shards``); on load the position becomes ``global // W'``. When
W' does not divide it, the remainder (< W' batches) is trained again and a warning says so.
Checkpoints without ``num_shards`` (older runs) are loaded as fairseq does.
"""
import logging

from fairseq.data.iterators import EpochBatchIterator

logger = logging.getLogger(__name__)


class WorldSizeAwareEpochBatchIterator(EpochBatchIterator):
    def state_dict(self):
        state = super().state_dict()
        state["num_shards"] = self.num_shards
        return state

    def load_state_dict(self, state_dict):
        saved = state_dict.get("num_shards", self.num_shards)
        position = state_dict.get("iterations_in_epoch", 0)
        if saved != self.num_shards and position > 0:
            consumed = position * saved
            new_position, remainder = divmod(consumed, self.num_shards)
            if remainder:
                logger.warning(
                    f"resuming {saved} workers' data position with {self.num_shards}: {consumed} batches "
                    f"were consumed, which {self.num_shards} workers cannot split evenly; the last "
                    f"{remainder} are trained again"
                )
            logger.info(
                f"data position: {position} batches x {saved} workers -> {new_position} x {self.num_shards}"
            )
            state_dict = dict(state_dict, iterations_in_epoch=new_position)
        super().load_state_dict(state_dict)


def track_world_size(epoch_iter):
    """Make a fairseq ``EpochBatchIterator`` record its number of shards in checkpoints."""
    if type(epoch_iter) is EpochBatchIterator:
        epoch_iter.__class__ = WorldSizeAwareEpochBatchIterator
    return epoch_iter
