"""Rouge-L on the validation set during training (``--eval-rouge``), for checkpoint selection.

The pattern of fairseq's translation ``--eval-bleu``: the task builds a generator when it builds
the model; each validation batch samples responses for its first ``--eval-rouge-max-examples``
examples (sample ids below it: the first rows of the split) and logs ``_rouge_l_sum`` and
``_rouge_l_count``, which sum over batches and workers; ``reduce_metrics`` derives
``rouge_l = sum / count``, so ``--best-checkpoint-metric rouge_l --maximize-best-checkpoint-metric``
keeps the checkpoint with the best dev Rouge-L, as MiniLLM/DistiLLM/DSKD select theirs (spec
section 5). References are all ``output`` strings of ``{data}/{valid split}.jsonl`` (written by
distill-prepare; row i is sample id i). Sampling is seeded per batch (``--seed`` + the batch's
first id) in a forked RNG, so every validation draws the same random numbers and training's
random state is untouched.
"""
import logging
import os

import torch
from fairseq import metrics, utils

from ..data.instruction_jsonl import read_instruction_jsonl, references
from ..data.tokenizers import load_tokenizer
from ..errors import DistillError
from .generation_settings import validation_generation_args
from .rouge import rouge_l
from .scoring import response_text, token_pieces

logger = logging.getLogger(__name__)


class ValidationRouge:
    def __init__(self, task, model):
        cfg = task.cfg
        subsets = [s for s in str(cfg.valid_subset).split(",") if s]
        if len(subsets) != 1:
            raise DistillError(f"--eval-rouge scores one validation subset, got --valid-subset {cfg.valid_subset}; "
                               "pass a single subset")
        self.subset = subsets[0]
        if cfg.eval_rouge_max_examples < 0:
            raise DistillError("--eval-rouge-max-examples must be >= 0 (0: every example)")
        self.max_examples = cfg.eval_rouge_max_examples or None
        self.print_samples = cfg.eval_rouge_print_samples
        self.seed = int(cfg.seed)
        data = utils.split_paths(cfg.data)[0]
        path = os.path.join(data, f"{self.subset}.jsonl")
        if not os.path.isfile(path):
            raise DistillError(f"--eval-rouge needs the references {path}; prepare the data with distill-prepare")
        self.rows = read_instruction_jsonl(path)
        self.tokenizer = load_tokenizer(data)
        self.dictionary = task.target_dictionary
        self.generator = task.build_generator([model], validation_generation_args(cfg.eval_rouge_args))
        self.checked = False

    def _check_alignment(self, task):
        dataset = task.datasets.get(self.subset)
        if dataset is not None and len(dataset) != len(self.rows):
            raise DistillError(f"the '{self.subset}' split has {len(dataset)} examples but its {self.subset}.jsonl "
                               f"{len(self.rows)} rows; re-run distill-prepare")
        self.checked = True

    def logging_output(self, task, model, sample) -> dict:
        """``_rouge_l_sum`` / ``_rouge_l_count`` of the batch's examples within the subset limit."""
        if not self.checked:
            self._check_alignment(task)
        if not sample or "id" not in sample:
            return {"_rouge_l_sum": 0.0, "_rouge_l_count": 0}
        keep = sample["id"] < self.max_examples if self.max_examples else torch.ones_like(sample["id"], dtype=torch.bool)
        if not bool(keep.any()):
            return {"_rouge_l_sum": 0.0, "_rouge_l_count": 0}
        src = sample["net_input"]["src_tokens"]
        sub = {
            "id": sample["id"][keep],
            "net_input": {"src_tokens": src[keep], "src_lengths": sample["net_input"]["src_lengths"][keep]},
            "prompt_lengths": sample["prompt_lengths"][keep],
        }
        ids = sub["id"].tolist()
        seed = self.seed + min(ids)
        devices = [src.device.index if src.device.index is not None else torch.cuda.current_device()] \
            if src.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            hypos = task.inference_step(self.generator, [model], sub)
        total = 0.0
        for k, (idx, beams) in enumerate(zip(ids, hypos)):
            prediction = response_text(self.tokenizer, token_pieces(self.dictionary, beams[0]["tokens"]))
            score = rouge_l(prediction, references(self.rows[idx]))
            total += score
            if self.print_samples and k == 0:
                logger.info(f"example {idx}: Rouge-L {score:.1f}\n  H: {prediction!r}\n  R: {references(self.rows[idx])[0]!r}")
        return {"_rouge_l_sum": total, "_rouge_l_count": len(ids)}


def reduce_rouge_metrics(logging_outputs):
    """Log the summed counters and derive ``rouge_l`` (only where some example was scored)."""
    def total(key):
        value = sum(log.get(key, 0) for log in logging_outputs)
        return value.item() if torch.is_tensor(value) else value

    count = total("_rouge_l_count")
    if count > 0:
        metrics.log_scalar("_rouge_l_sum", total("_rouge_l_sum"))
        metrics.log_scalar("_rouge_l_count", count)
        metrics.log_derived("rouge_l", lambda meters: meters["_rouge_l_sum"].sum / meters["_rouge_l_count"].sum)
