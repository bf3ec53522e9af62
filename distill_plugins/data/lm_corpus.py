"""The pre-training corpus of the extra language-modelling term (``--lm-data DIR``): MiniLLM's L_pt
and DistiLLM's ``lm_coef`` * LM loss, both on OpenWebText in the papers (spec sections 2 and 3).

DIR is either plain text binarized with the student's dictionary (``distill_plugins.cli.prepare_lm``
or ``fairseq-preprocess --only-source --srcdict``: ``train.{bin,idx}`` + ``dict.txt``), cut into
contiguous blocks of ``tokens_per_sample`` tokens, each an LM example as the references make it
(input block[:-1], labels block[1:]) behind the task's BOS column: source = [EOS] + block[:-1],
target = [pad] + block[1:] (HF-backed models skip column 0, so they see block[:-1] exactly as
transformers does); or a ``distill-prepare`` directory, whose responses are
the labels (``train.src-tgt.*``, ``dict.src.txt``). ``LMCorpus.batch(n, device)`` returns the next
n sequences of a seeded random order, this worker's share (``ShardedOrder``, stream 2), collated
like the task's batches. The order's position is saved in the task state and restored on resume
(``ShardedOrder.state_dict``).
"""
import logging
import os

import torch
from fairseq import utils
from fairseq.data import Dictionary, TokenBlockDataset, data_utils

from ..errors import DistillError
from ..teacher import dictionary_fingerprint
from .prompt_response_dataset import PromptResponseDataset, collate_examples
from .sharded_order import ShardedOrder

logger = logging.getLogger(__name__)
LM_STREAM = 2  # the ShardedOrder stream of LM batches (MiniLLM's rollout prompts use 1)


class LMBlocks(torch.utils.data.Dataset):
    """Contiguous token blocks as LM examples: source = [EOS] + block[:-1], target = [pad] + block[1:]
    (column 0 is the BOS every model input starts with, and no label)."""

    def __init__(self, blocks, eos: int, pad: int):
        self.blocks, self.eos, self.pad = blocks, eos, pad

    def __len__(self):
        return len(self.blocks)

    def __getitem__(self, index):
        block = self.blocks[index]
        source = torch.cat([block.new_tensor([self.eos]), block[:-1]])
        target = torch.cat([block.new_tensor([self.pad]), block[1:]])
        return {"id": index, "source": source, "target": target, "prompt_length": 0}


def _check_dictionary(path: str, dictionary: Dictionary, data_dir: str):
    if not os.path.isfile(path):
        raise DistillError(f"--lm-data: {path} does not exist; prepare the LM data with "
                           f"python -m distill_plugins.cli.prepare_lm --data {data_dir} --train TEXT --destdir DIR")
    if dictionary_fingerprint(Dictionary.load(path)) != dictionary_fingerprint(dictionary):
        raise DistillError(f"--lm-data: {path} differs from the student's dictionary; prepare the LM data with "
                           f"python -m distill_plugins.cli.prepare_lm --data {data_dir} (its tokenizer and dictionary)")


def load_lm_dataset(directory: str, dictionary: Dictionary, data_dir: str, tokens_per_sample: int):
    """The train split of DIR as LM examples (see the module docstring); one-line errors otherwise."""
    if not os.path.isdir(directory):
        raise DistillError(f"--lm-data {directory} is not a directory")
    pairs = os.path.join(directory, "train.src-tgt.src")
    plain = os.path.join(directory, "train")
    if os.path.isfile(pairs + ".bin"):
        _check_dictionary(os.path.join(directory, "dict.src.txt"), dictionary, data_dir)
        src = data_utils.load_indexed_dataset(pairs, dictionary)
        tgt = data_utils.load_indexed_dataset(os.path.join(directory, "train.src-tgt.tgt"), dictionary)
        ds = PromptResponseDataset(src, tgt, dictionary, max_len=tokens_per_sample)
    elif os.path.isfile(plain + ".bin"):
        _check_dictionary(os.path.join(directory, "dict.txt"), dictionary, data_dir)
        tokens = data_utils.load_indexed_dataset(plain, dictionary)
        blocks = TokenBlockDataset(tokens, tokens.sizes, tokens_per_sample, pad=dictionary.pad(),
                                   eos=dictionary.eos(), break_mode="none")
        ds = LMBlocks(blocks, dictionary.eos(), dictionary.pad())
    else:
        raise DistillError(f"--lm-data {directory} has neither train.src-tgt.src.bin (distill-prepare) nor "
                           "train.bin (fairseq-preprocess --only-source)")
    if len(ds) == 0:
        raise DistillError(f"--lm-data {directory}: the train split is empty")
    logger.info(f"LM data {directory}: {len(ds)} sequences")
    return ds


class LMCorpus:
    """Batches of the ``--lm-data`` corpus in a seeded order, split over the workers."""

    def __init__(self, directory: str, dictionary: Dictionary, data_dir: str, tokens_per_sample: int, seed: int):
        self.dataset = load_lm_dataset(directory, dictionary, data_dir, tokens_per_sample)
        self.pad = dictionary.pad()
        self.order = ShardedOrder(len(self.dataset), seed, LM_STREAM)

    def batch(self, n: int, device=None):
        examples = [self.dataset[i] for i in self.order.take(n)]
        batch = collate_examples(examples, self.pad)
        return batch if device is None else utils.apply_to_sample(lambda t: t.to(device), batch)
