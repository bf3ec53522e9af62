"""Task ``instruction_distillation``: a decoder-only LM trained on prompt -> response pairs.

Without ``--teacher-path`` it is supervised fine-tuning (any criterion, e.g. fairseq's
``cross_entropy``); with it, the distillation criterions get the teacher's logits, and with
``--teacher-cache`` (``teacher_cache.py``) its cached top-k log-probabilities instead. Data come from
``distill-prepare`` (``{split}.src-tgt.{src,tgt}`` with one joined dictionary).

With ``--lm-data DIR`` every training batch also carries ``sample["lm"]``, a batch of a
pre-training corpus (``data/lm_corpus.py``; ``--lm-batch-size`` sequences, default as many as the
training batch) for the criterion's extra LM term (DistiLLM's ``lm_coef`` * LM loss, spec section 3;
``--lm-coef`` of the token-level criterions).

With ``--teacher-data DIR`` (cross-tokenizer KD, ``--criterion uld|min_ed|dskd_cma``) the teacher has its own
tokenizer: DIR holds the teacher's tokenization of the same rows (distill-prepare
``--teacher-spm-model``/``--teacher-hf-tokenizer``), batches carry it as ``sample["teacher"]``
(``data/paired_tokenizations.py``) and the teacher is loaded for that dictionary.

Generation (``fairseq-generate``, ``--eval-rouge``) conditions on the prompt and returns only the
response: pass ``--max-len-b`` as the total length (prompt included), e.g. 512.
"""
import copy
import logging
import os
from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np
import torch
from fairseq import utils
from fairseq.data import Dictionary, data_utils
from fairseq.distributed import utils as distributed_utils
from fairseq.dataclass import ChoiceEnum
from fairseq.criterions import CRITERION_REGISTRY
from fairseq.tasks import FairseqTask, register_task
from omegaconf import II, DictConfig, open_dict

from ..data.lm_corpus import LMCorpus
from ..data.paired_tokenizations import PairedTokenizationDataset
from ..data.prepare_report import read_prepare_report
from ..data.prompt_response_dataset import PromptResponseDataset, prompt_batch
from ..data.sharded_order import rank_and_world
from ..data.world_size_resume import track_world_size
from ..data.tokenizers import check_tokenizer_identity, tokenizer_identity
from ..devices import resolve_device
from ..errors import DistillError, check
from ..evaluation.validation_rouge import ValidationRouge, reduce_rouge_metrics
from ..generated import student_data
from ..generated.config import StudentDataConfig
from ..generation import PromptSequenceGenerator
from ..output_projection import fusable_output
from ..prefill_generator import PrefillGenerator, prefill_applicable
from ..resume import restored_task_state
from ..teacher import Teacher, dictionary_fingerprint
from ..teacher_cache import CachedTeacher

logger = logging.getLogger(__name__)


@dataclass
class InstructionDistillationConfig(StudentDataConfig):  # + --student-data-mode etc. (generated/config.py)
    data: Optional[str] = field(default=None, metadata={"help": "data directory made by distill-prepare"})
    tokens_per_sample: int = field(
        default=512, metadata={"help": "max prompt + response tokens per example (longer ones are cut)"}
    )
    max_target_positions: Optional[int] = field(
        default=None, metadata={"help": "model positions (default: the architecture's, 1024 for kd_gpt2_*)"}
    )
    add_bos_token: bool = field(default=False, metadata={"help": "kept False: EOS starts every sequence"})
    teacher_path: Optional[str] = field(
        default=None,
        metadata={"help": "fairseq checkpoint or Hugging Face checkpoint directory of the teacher (needed by every KD criterion); several "
                          "comma-separated checkpoints for multi-teacher criterions, the first is task.teacher"},
    )
    teacher_data: Optional[str] = field(
        default=None,
        metadata={"help": "cross-tokenizer KD (--criterion uld, min_ed, dskd_cma): the teacher's tokenization of the same data, "
                          "DATA/teacher as written by distill-prepare --teacher-spm-model/--teacher-hf-tokenizer; "
                          "the teacher checkpoint is of that dictionary"},
    )
    teacher_cache: Optional[str] = field(
        default=None,
        metadata={"help": "instead of --teacher-path: a teacher cache made by distill-cache-teacher (the teacher's "
                          "top-k log-probabilities at every label token; no teacher forward during training); several "
                          "comma-separated caches for multi-teacher criterions"},
    )
    teacher_cache_tail: ChoiceEnum(["even", "none"]) = field(
        default="even", metadata={"help": "with --teacher-cache, the mass outside the cached top-k: even (spread "
                                          "evenly over the other tokens) or none (the teacher renormalised over its "
                                          "top-k; those entries are masked in the divergences)"}
    )
    teacher_dtype: ChoiceEnum(["fp32", "fp16", "bf16"]) = field(
        default="fp32", metadata={"help": "dtype the frozen teacher runs in"}
    )
    teacher_device: str = field(
        default="auto", metadata={"help": "device of the teacher: auto (the student's), cpu, cuda:N"}
    )
    teacher_compile: bool = field(
        default=False, metadata={"help": "run the teacher's forward through torch.compile (compiles at the first "
                                         "batches; on CPU it needs a C++ compiler)"}
    )
    teacher_sharding: ChoiceEnum(["replicated", "fsdp"]) = field(
        default="replicated", metadata={"help": "replicated: a full teacher on every worker; fsdp: its parameters "
                                                "split over the workers (teacher_sharding.py, docs/distributed.md)"}
    )
    cpu: bool = II("common.cpu")
    allow_pickle: bool = field(
        default=False, metadata={"help": "read Hugging Face pickle weights (pytorch_model.bin) when a checkpoint "
                                         "has no safetensors: unpickling can run arbitrary code, trust the source"}
    )
    seed: int = II("common.seed")
    # --eval-rouge: Rouge-L of sampled responses at validation (evaluation/validation_rouge.py)
    eval_rouge: bool = field(
        default=False, metadata={"help": "log dev Rouge-L (rouge_l) at validation, e.g. for "
                                         "--best-checkpoint-metric rouge_l --maximize-best-checkpoint-metric"}
    )
    eval_rouge_args: Optional[str] = field(
        default="{}", metadata={"help": "generation args as JSON, fairseq names, over the defaults (sampling, "
                                        "top-k/top-p off, temperature 1, no n-gram blocking, max_len_b 512 = "
                                        "prompt + response), e.g. '{\"max_len_b\": 256}'"}
    )
    eval_rouge_max_examples: int = field(
        default=0, metadata={"help": "score only the first N validation examples (0: all)"}
    )
    eval_rouge_print_samples: bool = field(default=False, metadata={"help": "log one sample per batch"})
    max_response_tokens: int = field(
        default=256, metadata={"help": "fairseq-generate: at most this many response tokens per prompt (0: no "
                                       "limit but --max-len-b, the total); 256 = the MiniLLM/DistiLLM protocol's "
                                       "max_length 512 - max_prompt_length 256 (prompts are left-padded to 256)"}
    )
    no_prompt_prefill: bool = field(
        default=False, metadata={"help": "generate with fairseq's SequenceGenerator, forcing the prompt token by "
                                         "token, instead of one prefill pass (beam 1 only uses the prefill)"}
    )
    valid_subset: str = II("dataset.valid_subset")
    # --lm-data: a pre-training corpus for an extra LM term (DistiLLM's / MiniLLM's OpenWebText loss)
    lm_data: Optional[str] = field(
        default=None, metadata={"help": "data directory of a pre-training corpus for the criterion's extra LM term "
                                        "(python -m distill_plugins.cli.prepare_lm, or a distill-prepare dir, "
                                        "with the student's dictionary)"}
    )
    lm_batch_size: Optional[int] = field(
        default=None, metadata={"help": "sequences per LM batch (default: as many as the training batch; "
                                        "minillm: the rollout minibatch)"}
    )


def prepared_total_length(data: str) -> int:
    """distill-prepare's --max-total-tokens for ``data`` (no limit if it has no report): examples are cut
    to it, so that a response it cut loses the EOS binarization appended, as the references'
    (prompt + response + [EOS])[:max_length] does."""
    report = read_prepare_report(data) or {}
    return int(report.get("max_total_tokens") or (1 << 62))


@register_task("instruction_distillation", dataclass=InstructionDistillationConfig)
class InstructionDistillationTask(FairseqTask):
    cfg: InstructionDistillationConfig

    def __init__(self, cfg: InstructionDistillationConfig, dictionary: Dictionary):
        super().__init__(cfg)
        self.dictionary = dictionary
        self.teachers: List[Teacher] = []
        # ImitKD / GKD / DistiLLM: student-generated batches (generated/student_data.py)
        mode = getattr(cfg, "student_data_mode", "off")
        self.student_data = student_data.StudentData(cfg, self) if mode != "off" else None
        check(cfg.tokens_per_sample >= 1, f"--tokens-per-sample must be >= 1, got {cfg.tokens_per_sample}")
        check(cfg.lm_batch_size is None or cfg.lm_batch_size >= 1,
              f"--lm-batch-size must be >= 1, got {cfg.lm_batch_size}")
        check(getattr(cfg, "max_response_tokens", 0) >= 0,
              f"--max-response-tokens must be >= 0 (0: no cap), got {getattr(cfg, 'max_response_tokens', 0)}")
        self.lm_corpus: Optional[LMCorpus] = None  # --lm-data, loaded with the criterion (load_lm_corpus)
        self.restored_state: Optional[dict] = None  # the resumed checkpoint's task state, read at the first step
        self._warned_length_limit = False  # prompts that fill --max-len-b: warned once (inference_step)
        self.teacher_task = None  # --teacher-data: the task of the teacher's tokenization (teacher_side_task)
        self.student_hidden_dim = None  # what the student's output layer reads (build_model; dual-space KD)

    @classmethod
    def setup_task(cls, cfg: InstructionDistillationConfig, **kwargs):
        if not cfg.data:
            raise DistillError("no data directory given; pass the directory made by distill-prepare")
        data = utils.split_paths(cfg.data)[0]
        dict_path = os.path.join(data, "dict.src.txt")
        if not os.path.isfile(dict_path):
            raise DistillError(f"{data} has no dict.src.txt; prepare it with distill-prepare")
        dictionary = Dictionary.load(dict_path)
        logger.info(f"dictionary: {len(dictionary)} types")
        return cls(cfg, dictionary)

    def load_dataset(self, split, epoch=1, combine=False, **kwargs):
        data = utils.split_paths(self.cfg.data)[0]
        parts = []
        for side in ("src", "tgt"):
            prefix = os.path.join(data, f"{split}.src-tgt.{side}")
            ds = data_utils.load_indexed_dataset(prefix, self.dictionary)
            if ds is None:
                raise DistillError(f"{data} has no '{split}' split ({prefix}.bin); pass it to distill-prepare")
            parts.append(ds)
        if len(parts[0]) == 0:
            raise DistillError(f"the '{split}' split in {data} is empty")
        dataset = PromptResponseDataset(
            parts[0], parts[1], self.dictionary, max_len=min(self.cfg.tokens_per_sample, prepared_total_length(data)),
            shuffle=(split == "train"),
        )
        self.check_response_labels(dataset, split)
        if self.cfg.teacher_data:  # cross-tokenizer KD: the teacher's tokenization of the same rows
            teacher = self.teacher_side_task()
            teacher.load_dataset(split, epoch=epoch, combine=combine)
            other = teacher.datasets[split]
            check(len(other) == len(dataset),
                  f"--teacher-data {self.cfg.teacher_data} has {len(other)} '{split}' examples, {data} has "
                  f"{len(dataset)}; prepare both in one distill-prepare run with --teacher-spm-model/--teacher-hf-tokenizer")
            dataset = PairedTokenizationDataset(dataset, other)
        self.datasets[split] = dataset
        logger.info(f"{split}: {len(self.datasets[split])} examples")
        for t in self.teachers:
            if isinstance(t, CachedTeacher):
                t.check_dataset(self.datasets[split], split)

    def check_response_labels(self, dataset: PromptResponseDataset, split: str):
        """Refuse a split where every prompt fills --tokens-per-sample (nothing to learn: loss 0 and
        wpb 0, or NaN); warn when some do."""
        n = len(dataset)
        empty = int((dataset.label_counts() <= 0).sum())
        if not empty:
            return
        longest = int(np.asarray(dataset.prompts.sizes).max()) - 1
        fix = f"raise --tokens-per-sample (longest prompt: {longest} tokens) or prepare with a smaller --max-prompt-tokens"
        limit = self.cfg.tokens_per_sample
        if empty == n:
            raise DistillError(f"no '{split}' example keeps a response token within --tokens-per-sample {limit} "
                               f"(every prompt fills it); {fix}")
        logger.warning(f"{empty} of {n} '{split}' examples keep no response token within --tokens-per-sample "
                       f"{limit} (their prompts fill it) and teach nothing; {fix}")

    def get_batch_iterator(self, dataset, max_tokens=None, max_sentences=None, max_positions=None,
                           ignore_invalid_inputs=False, required_batch_size_multiple=1, **kwargs):
        # fairseq 0.12.3's batch_by_size drops the last partial batch whenever
        # required_batch_size_multiple > 1 (100 examples, batch 50, multiple 8 -> 96 seen), which
        # would silently skip validation and generation examples. Batch with multiple 1.
        # Checkpoints also record the number of workers, so that a resume with another number of
        # workers continues at the same global data position (data/world_size_resume.py).
        return track_world_size(super().get_batch_iterator(
            dataset, max_tokens=max_tokens, max_sentences=max_sentences, max_positions=max_positions,
            ignore_invalid_inputs=ignore_invalid_inputs, required_batch_size_multiple=1, **kwargs,
        ))

    # -- teacher -------------------------------------------------------------------------------
    @property
    def teacher(self) -> Optional[Teacher]:
        """The (first) teacher, or None for supervised fine-tuning."""
        return self.teachers[0] if self.teachers else None

    # a task whose criterion scores sequences the student generates needs the teacher itself
    scores_generated_sequences = False

    def teacher_side_task(self) -> "InstructionDistillationTask":
        """--teacher-data: this task on the teacher's tokenization (its dictionary, data and
        checkpoints), built once; the teachers are loaded for it."""
        if self.teacher_task is None:
            check(not self.cfg.teacher_cache, "--teacher-cache cannot be used with --teacher-data (cross-tokenizer KD "
                                              "runs the teacher on its own tokenization); pass --teacher-path")
            check(self.student_data is None, f"--student-data-mode {self.cfg.student_data_mode} with --teacher-data: "
                                             "student generations have no teacher tokenization; drop one of them")
            cfg = copy.deepcopy(self.cfg)
            changes = dict(data=self.cfg.teacher_data, teacher_data=None, teacher_path=None, teacher_cache=None,
                           lm_data=None, eval_rouge=False, student_data_mode="off")
            if isinstance(cfg, DictConfig):
                with open_dict(cfg):
                    for k, v in changes.items():
                        cfg[k] = v
            else:
                for k, v in changes.items():
                    setattr(cfg, k, v)
            self.teacher_task = InstructionDistillationTask.setup_task(cfg)
        return self.teacher_task

    def load_teachers(self) -> List[Teacher]:
        if self.cfg.teacher_cache and not self.teachers:
            self.teachers = self.load_teacher_caches()
        if self.cfg.teacher_path and not self.teachers:
            check(self.cfg.teacher_cache_tail == "even",
                  "--teacher-cache-tail is for a --teacher-cache; a --teacher-path teacher gives its full distribution: "
                  "drop the option")
            paths = [p.strip() for p in self.cfg.teacher_path.split(",") if p.strip()]
            if self.cfg.teacher_device != "auto":  # auto: the student's device
                resolve_device(self.cfg.teacher_device, "--teacher-device")
            owner = self.teacher_side_task() if self.cfg.teacher_data else self  # whose dictionary
            self.teachers = [
                Teacher.load(p, owner, dtype=self.cfg.teacher_dtype, device=self.cfg.teacher_device,
                             teacher_data=self.cfg.teacher_data) for p in paths
            ]
            needed, source = self.teacher_input_length()
            for t in self.teachers:
                t.check_positions(needed, source)
            if self.cfg.teacher_sharding == "fsdp":
                on_gpu = torch.cuda.is_available() and not self.cfg.cpu
                for t in self.teachers:
                    t.shard(torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu"))
            if self.cfg.teacher_compile:
                for t in self.teachers:
                    t.compile()
        return self.teachers

    def teacher_input_length(self):
        """The most tokens a teacher input may have, and the options that set it: --tokens-per-sample,
        capped by distill-prepare's --max-total-tokens of the data it reads (unless --lm-data blocks or
        generated sequences, both of --tokens-per-sample, reach it) and by the student's positions
        (the batches are filtered by both) unless the teacher reads its own tokenization (--teacher-data)."""
        needed, source = int(self.cfg.tokens_per_sample), f"--tokens-per-sample {self.cfg.tokens_per_sample}"
        prepared = prepared_total_length(self.cfg.teacher_data or utils.split_paths(self.cfg.data)[0])
        own_length = not self.cfg.lm_data and str(getattr(self.cfg, "student_data_mode", "off")) == "off"
        if own_length and not getattr(self, "provides_rollouts", False) and prepared < needed:
            needed, source = prepared, f"the data's --max-total-tokens {prepared}"
        student = getattr(self, "student_positions", None)
        if student is not None and not self.cfg.teacher_data and student < needed:
            needed, source = student, f"the student's {student} positions"
        return needed, source

    def check_teacher_count(self, criterion: str):
        """A teacher given to a criterion that never reads it (fairseq's default cross_entropy, when
        --criterion is forgotten) or several given to a single-teacher one would be ignored silently.
        Criterions say how many they take with ``teachers_taken`` (None: any number; absent: none)."""
        taken = getattr(CRITERION_REGISTRY.get(criterion), "teachers_taken", 0)
        for flag, value in (("--teacher-path", self.cfg.teacher_path), ("--teacher-cache", self.cfg.teacher_cache)):
            n = len([p for p in (value or "").split(",") if p.strip()])
            if not n:
                continue
            if taken == 0:
                raise DistillError(f"--criterion {criterion} does not use a teacher, but {flag} was given: pass a KD "
                                   f"criterion (kd, skew_kl, reverse_kl, ...; README) or drop {flag}")
            if taken is not None and n > taken:
                raise DistillError(f"--criterion {criterion} takes one teacher, {flag} gives {n}: for several "
                                   "use --criterion multi_teacher_kd")

    def load_teacher_caches(self) -> list:
        check(not self.cfg.teacher_path, "--teacher-path and --teacher-cache both given; pass one of them")
        live = ("--student-data-mode " + str(self.cfg.student_data_mode) if self.student_data is not None
                else "this task" if self.scores_generated_sequences else None)
        if live is not None:
            raise DistillError(f"{live} scores sequences the student generates, which a teacher cache cannot hold; "
                               "pass --teacher-path instead of --teacher-cache")
        check(self.cfg.teacher_sharding == "replicated",
              "--teacher-sharding fsdp shards a teacher model; a --teacher-cache has none: drop the option")
        for flag, given in (("--teacher-dtype", self.cfg.teacher_dtype != "fp32"),
                            ("--teacher-device", self.cfg.teacher_device != "auto"),
                            ("--teacher-compile", self.cfg.teacher_compile)):
            check(not given, f"{flag} is for a teacher model; a --teacher-cache has none (its dtype is the one it was "
                             "built with): drop the option")
        paths = [p.strip() for p in self.cfg.teacher_cache.split(",") if p.strip()]
        caches = [CachedTeacher(p, self) for p in paths]
        for split, dataset in self.datasets.items():  # those loaded before the criterion (valid)
            for cache in caches:
                cache.check_dataset(dataset, split)
        return caches

    def build_criterion(self, cfg, from_checkpoint=False):
        # The teacher is loaded here, not in build_model: generating with or evaluating the
        # student (which builds only the model) never loads the teacher.
        name = getattr(cfg, "_name", None)
        cross = getattr(CRITERION_REGISTRY.get(name), "cross_tokenizer", False)
        if self.cfg.teacher_data and not cross:
            across = ", ".join(sorted(n for n, c in CRITERION_REGISTRY.items() if getattr(c, "cross_tokenizer", False)))
            raise DistillError(f"--teacher-data is for cross-tokenizer criterions ({across}); {name} compares "
                               "teacher and student token by token in one vocabulary: drop --teacher-data")
        if cross and not self.cfg.teacher_data:
            raise DistillError(f"--criterion {name} distils across tokenizers and needs --teacher-data DIR: the "
                               "teacher's tokenization of the data (DATA/teacher from distill-prepare "
                               "--teacher-spm-model/--teacher-hf-tokenizer)")
        self.check_teacher_count(name)
        if self.cfg.teacher_cache and getattr(CRITERION_REGISTRY.get(name), "reads_teacher_hidden_states", False):
            raise DistillError(f"--criterion {name} projects the teacher's hidden states, which a teacher cache does "
                               "not hold (only its logits); pass --teacher-path instead of --teacher-cache")
        self.load_teachers()
        if getattr(CRITERION_REGISTRY.get(name), "reads_teacher_hidden_states", False) and any(
                getattr(t, "sharded", False) for t in self.teachers):
            raise DistillError(f"--criterion {name} projects the teacher's hidden states and reads its embeddings, "
                               "which --teacher-sharding fsdp splits over the workers; pass --teacher-sharding "
                               "replicated or a token-level criterion (kd, skew_kl, ...)")
        criterion = super().build_criterion(cfg, from_checkpoint)
        if self.load_lm_corpus() is not None and not getattr(criterion, "trains_on_lm_batch", False):
            raise DistillError(f"--lm-data needs a criterion with an LM term (kd, skew_kl, js, ... or minillm); "
                               f"{getattr(cfg, '_name', type(criterion).__name__)} would ignore it: drop --lm-data")
        return criterion

    def load_lm_corpus(self) -> Optional[LMCorpus]:
        """The --lm-data corpus, loaded once; with the criterion, so that training fails early on a bad
        directory while loading a trained checkpoint elsewhere (evaluation, export) never needs it."""
        if self.cfg.lm_data and self.lm_corpus is None:
            self.lm_corpus = LMCorpus(self.cfg.lm_data, self.dictionary, utils.split_paths(self.cfg.data)[0],
                                      self.cfg.tokens_per_sample, self.cfg.seed)
        return self.lm_corpus

    def lm_batch(self, size: int, device=None):
        """The next ``size`` sequences of the --lm-data corpus (this worker's share)."""
        return self.load_lm_corpus().batch(size, device)

    def state_dict(self):
        return {
            "dictionary": dictionary_fingerprint(self.dictionary),
            "tokenizer": tokenizer_identity(utils.split_paths(self.cfg.data)[0]),
            "teachers": [t.record() for t in self.teachers],
            "student_data": self.student_data.state_dict() if self.student_data is not None else None,
            "lm_order": self.lm_corpus.order.state_dict() if self.lm_corpus is not None else None,
            "workers": getattr(self, "_worker_states", None),
        }

    # -- every worker's own state in the checkpoint (distributed_compat.py, fix 3) ------------------
    def worker_state(self) -> Optional[dict]:
        """What this worker keeps for itself, which rank 0's ``state_dict`` alone would miss (its replay
        buffer, its position in its share of --lm-data); None: nothing."""
        own = {}
        if self.student_data is not None:
            own["student_data"] = self.student_data.state_dict()
        if self.lm_corpus is not None:  # workers' shares differ in length, and their batches in size
            own["lm_order"] = self.lm_corpus.order.state_dict()
        return own or None

    def gather_worker_states(self) -> None:
        """Called on every worker right before rank 0 writes a checkpoint: rank 0 gets all workers'
        ``worker_state`` for its ``state_dict`` ("workers", indexed by rank; rank 0's entry is None, its
        state being the checkpoint's own, so that it is not stored twice)."""
        self._worker_states = None
        world = rank_and_world()[1]
        own = self.worker_state()
        if world <= 1 or own is None:
            return
        states = [None] * world
        torch.distributed.all_gather_object(states, own, group=distributed_utils.get_data_parallel_group())
        self._worker_states = [None] + states[1:]

    def own_restored_state(self, key: str):
        """``key`` of the resumed task state as this worker saved it, when the number of workers is the
        same (rank 0's is the checkpoint's own); else the checkpoint's own."""
        state = self.restored_state or {}
        workers = state.get("workers")
        rank, world = rank_and_world()
        if workers and len(workers) == world and key in (workers[rank] or {}):
            return workers[rank][key]
        return state.get(key)

    def restore_training_state(self, update_num: int):
        """At the first train_step: read the resumed checkpoint's task state (``resume.py``) and
        continue where it stopped (the --lm-data order here; the replay buffer in StudentData)."""
        if self.restored_state is not None:
            return
        self.restored_state = restored_task_state(self.cfg, update_num)
        self.load_state_dict(self.restored_state)  # fairseq never calls it: compares the teachers
        saved = self.own_restored_state("lm_order")
        if saved and self.lm_corpus is not None:
            self.lm_corpus.order.load_state_dict(saved)
            logger.info(f"--lm-data order restored at epoch {saved['epoch']}, position {saved['pos']}")

    def load_state_dict(self, state_dict):
        # fairseq calls this for every checkpoint it loads with this task (fairseq-generate, export, teachers)
        data = utils.split_paths(self.cfg.data)[0]
        check_tokenizer_identity((state_dict or {}).get("tokenizer"), data, "this checkpoint",
                                 "pass the data directory it was trained on")
        previous = [t["sha256"] for t in (state_dict or {}).get("teachers", [])]
        current = [t.sha256 for t in self.teachers]
        if previous and current and previous != current:
            logger.warning(
                f"resuming with different teachers: the checkpoint was trained with sha256 "
                f"{[p[:12] for p in previous]}, now {[c[:12] for c in current]} (--teacher-path "
                f"{self.cfg.teacher_path}); if that is not intended, resume with the teachers it was trained with"
            )

    # -- generation ----------------------------------------------------------------------------
    def build_generator(self, models, args, seq_gen_cls=None, extra_gen_cls_kwargs=None, **kwargs):
        """PrefillGenerator for beam 1, else PromptSequenceGenerator. ``max_new_tokens`` (a response
        cap on top of the total --max-len-b) comes from ``args`` (distill-evaluate, --eval-rouge;
        internal generation passes none) or, for fairseq-generate's config, --max-response-tokens."""
        if seq_gen_cls is None and not self.cfg.no_prompt_prefill and prefill_applicable(models, args):
            generator = PrefillGenerator(models[0], self.target_dictionary, args)
        else:
            generator = super().build_generator(
                models, args, seq_gen_cls=seq_gen_cls or PromptSequenceGenerator,
                extra_gen_cls_kwargs=extra_gen_cls_kwargs,
            )
        limit = getattr(args, "max_new_tokens", None)  # omegaconf's missing-key error is an AttributeError
        if limit is None and isinstance(args, DictConfig):  # fairseq-generate's GenerationConfig
            limit = self.cfg.max_response_tokens
        check(limit is None or int(limit) >= 0,
              f"a response cap (--max-response-tokens / max_new_tokens) must be >= 0 (0: none), got {limit}")
        generator.max_new_tokens = int(limit) if limit else None
        return generator

    def inference_step(self, generator, models, sample, prefix_tokens=None, constraints=None):
        """Generate a response for each prompt; hypotheses hold the response tokens only.

        ``sample["net_input"]`` is replaced by the prompt so that fairseq-generate's S- line shows it.
        """
        if constraints is not None:
            raise NotImplementedError("constrained decoding is not supported by instruction_distillation")
        prompts, lengths = prompt_batch(sample, self.dictionary.pad())
        self._warn_prompts_at_length_limit(generator, prompts, lengths)
        sample["net_input"] = {"src_tokens": prompts, "src_lengths": lengths}
        with torch.no_grad():
            hypos = generator.generate(models, sample, prefix_tokens=prompts, bos_token=self.dictionary.eos())
        cap = getattr(generator, "max_new_tokens", None)
        eos = self.dictionary.eos()
        for i, beams in enumerate(hypos):
            n = int(lengths[i])
            for h in beams:
                h["tokens"] = h["tokens"][n:]
                h["positional_scores"] = h["positional_scores"][n:]
                if h.get("attention") is not None and h["attention"].numel() > 0:
                    h["attention"] = h["attention"][..., n:]
                if cap and h["tokens"].numel() > cap + 1:  # PromptSequenceGenerator: cut, EOS after (as forced)
                    h["tokens"] = torch.cat([h["tokens"][:cap], h["tokens"].new_tensor([eos])])
                    h["positional_scores"] = h["positional_scores"][:cap + 1]
                    if h.get("attention") is not None and h["attention"].numel() > 0:
                        h["attention"] = h["attention"][..., :cap + 1]
        return hypos

    def _warn_prompts_at_length_limit(self, generator, prompts, lengths):
        """Once per run: prompts that already fill --max-len-b (the total length) get empty responses."""
        if self._warned_length_limit or not hasattr(generator, "max_len_b"):
            return
        limit = int(getattr(generator, "max_len_a", 0) * prompts.size(1) + generator.max_len_b)
        full = int((lengths >= limit).sum())
        if full:
            self._warned_length_limit = True
            logger.warning(f"{full} of {len(lengths)} prompts in this batch are {limit} tokens or longer, so their "
                           f"responses are empty: --max-len-b {generator.max_len_b} is the total length, prompt "
                           f"included (the MiniLLM protocol uses 512 with prompts of at most 256 tokens)")

    # -- Rouge-L validation (--eval-rouge) -------------------------------------------------------
    def build_model(self, cfg, from_checkpoint=False):
        model = super().build_model(cfg, from_checkpoint)
        if hasattr(model, "record_config"):  # hf_causal_lm: its HF config goes into the checkpoint's cfg
            model.record_config(cfg)
        if not from_checkpoint:  # the student being trained: its generations must fit its positions
            student_data.check_model_positions(self.cfg, model)
            positions = model.max_positions()
            self.student_positions = int(positions[0] if isinstance(positions, tuple) else positions)
            out = fusable_output(model)  # dual-space KD sizes its projections by it
            self.student_hidden_dim = None if out is None else out.weight.size(1)
        # not for models loaded from checkpoints (teachers, fairseq-generate, distill-evaluate)
        if self.cfg.eval_rouge and not from_checkpoint:
            self.validation_rouge = ValidationRouge(self, model)
        return model

    def valid_step(self, sample, model, criterion):
        loss, sample_size, logging_output = super().valid_step(sample, model, criterion)
        if getattr(self, "validation_rouge", None) is not None:
            logging_output.update(self.validation_rouge.logging_output(self, model, sample))
        return loss, sample_size, logging_output

    def reduce_metrics(self, logging_outputs, criterion):
        super().reduce_metrics(logging_outputs, criterion)
        student_data.reduce_metrics(logging_outputs)
        if getattr(self, "validation_rouge", None) is not None:
            reduce_rouge_metrics(logging_outputs)

    # -- student-generated data (--student-data-mode) -----------------------------------------------
    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False):
        self.restore_training_state(update_num)
        if hasattr(criterion, "set_num_updates"):  # on every worker and micro-batch: may hold a collective
            criterion.set_num_updates(update_num)
        extra = {}
        if self.student_data is not None:  # may replace the batch by student generations or a replay
            sample, extra = self.student_data.prepare(self, sample, model, criterion, update_num, dummy=ignore_grad)
        if self.lm_corpus is not None and sample:  # the extra LM term's batch (not on empty dummy batches)
            sample = dict(sample, lm=self.lm_batch(self.cfg.lm_batch_size or int(sample["target"].size(0)),
                                                   sample["target"].device))
        loss, sample_size, logging_output = super().train_step(
            sample, model, criterion, optimizer, update_num, ignore_grad
        )
        logging_output.update(extra)
        return loss, sample_size, logging_output

    def begin_valid_epoch(self, epoch, model):
        super().begin_valid_epoch(epoch, model)
        if self.student_data is not None:
            self.student_data.begin_valid()

    def post_validate(self, model, stats, agg):
        """fairseq-train calls this after each validation subset with the all-reduced stats: tau adapts."""
        if self.student_data is not None:
            self.student_data.after_valid(stats, agg)

    def max_positions(self):
        return self.cfg.tokens_per_sample

    @property
    def source_dictionary(self):
        return self.dictionary

    @property
    def target_dictionary(self):
        return self.dictionary
