"""Task options for student-generated data (the ``instruction_distillation`` config inherits them)."""
from dataclasses import dataclass, field
from typing import Optional

from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from omegaconf import II

STUDENT_DATA_MODES = ["off", "always", "mixed", "adaptive"]
REPLAY_RATIOS = ["decreasing", "constant", "increasing"]


@dataclass
class StudentDataConfig(FairseqDataclass):
    student_data_mode: ChoiceEnum(STUDENT_DATA_MODES) = field(
        default="off",
        metadata={"help": "train on student generations: off; always (ImitKD: every step generate, push "
                          "to the replay buffer, train on a buffer batch); mixed (GKD: the same with "
                          "probability --student-data-lambda, else ground truth); adaptive (DistiLLM: "
                          "probability tau, raised when the dev loss rises, with buffer reuse)"},
    )
    student_data_lambda: float = field(
        default=0.5, metadata={"help": "mixed mode: probability of a student-generated step (GKD: 0.5)"}
    )
    replay_buffer_size: int = field(default=1000, metadata={"help": "replay buffer capacity, in sequences per worker"})
    adaptive_tau_init: float = field(default=0.0, metadata={"help": "adaptive mode: initial tau"})
    adaptive_loss_eps: float = field(
        default=0.1, metadata={"help": "adaptive mode: raise tau by 0.1 when the dev CE (nats/token) grew by this much"}
    )
    replay_ratio: ChoiceEnum(REPLAY_RATIOS) = field(
        default="decreasing",
        metadata={"help": "adaptive mode: share of fresh generations once the buffer is full: "
                          "tau*(1-step/total), tau/2, or tau*step/total"},
    )
    gen_max_new_tokens: int = field(default=256, metadata={"help": "max tokens of a student generation"})
    gen_top_p: float = field(default=1.0, metadata={"help": "nucleus sampling for student generations (1 = off)"})
    gen_temperature: float = field(default=1.0, metadata={"help": "sampling temperature for student generations"})
    student_data_trace: Optional[str] = field(
        default=None,
        metadata={"help": "write every worker's per-step decisions and tau updates to FILE.rank<R>.jsonl"},
    )
    # from the rest of the fairseq config (no --flags of their own)
    max_update: int = II("optimization.max_update")
    max_tokens: Optional[int] = II("dataset.max_tokens")  # generated/replayed batches keep to it too
    batch_size: Optional[int] = II("dataset.batch_size")
    max_tokens_valid: Optional[int] = II("dataset.max_tokens_valid")
    batch_size_valid: Optional[int] = II("dataset.batch_size_valid")
    save_dir: str = II("checkpoint.save_dir")
    restore_file: str = II("checkpoint.restore_file")
    checkpoint_suffix: str = II("checkpoint.checkpoint_suffix")
    continue_once: Optional[str] = II("checkpoint.continue_once")
    load_checkpoint_on_all_dp_ranks: bool = II("checkpoint.load_checkpoint_on_all_dp_ranks")
    ddp_backend: str = II("distributed_training.ddp_backend")
    use_sharded_state: bool = II("distributed_training.use_sharded_state")
