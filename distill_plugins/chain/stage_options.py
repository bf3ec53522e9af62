"""Every trained stage's fairseq-train options checked before anything runs (and by --dry-run).

The exact command line a stage will run is parsed by fairseq-train's own parser (option names,
types and choices; architecture and task options included), its task is set up (the task's option
checks and the number of teachers its criterion takes; only the dictionary is read) and its
criterion's ``check_options`` runs (value ranges, multi-teacher weights). Nothing is trained or
loaded: a teacher that an earlier stage has yet to train need not exist.
"""
import logging

from ..errors import DistillError
from .command import stage_argv
from .config import ChainConfig, StageSpec, parser_error


def check_stage_options(chain: ChainConfig):
    import distill_plugins  # noqa: F401  (registers our tasks, criterions and models)

    logging.disable(logging.INFO)  # fairseq's parser and setup_task log INFO lines per stage
    try:
        for stage in chain.stages:
            if not stage.pretrained:
                check_stage(chain, stage)
    finally:
        logging.disable(logging.NOTSET)


def check_stage(chain: ChainConfig, s: StageSpec):
    from fairseq import options, tasks
    from fairseq.criterions import CRITERION_REGISTRY
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    from ..criterions.token_level_kd import TokenLevelKDCriterion

    criterion = CRITERION_REGISTRY.get(s.criterion)
    if criterion is None:
        ours = sorted(k for k, v in CRITERION_REGISTRY.items() if v.__module__.startswith("distill_plugins"))
        raise DistillError(f"stage {s.name!r}: unknown criterion {s.criterion!r}; use cross_entropy or one of {', '.join(ours)}")
    if issubclass(criterion, TokenLevelKDCriterion) and not s.teachers:
        raise DistillError(f"stage {s.name!r}: criterion {s.criterion} distills from a teacher; give the stage a teacher: <stage>")
    argv = stage_argv(chain, s, [chain.checkpoint_path(chain.stage(t)) for t in s.teachers])
    parsed = {}
    error = parser_error(lambda: parsed.update(args=options.parse_args_and_arch(options.get_training_parser(), argv)))
    if error:
        raise DistillError(f"stage {s.name!r}: fairseq-train rejects its options: {error}")
    try:
        cfg = convert_namespace_to_omegaconf(parsed["args"])
        task = tasks.setup_task(cfg.task)
        if hasattr(task, "check_teacher_count"):  # a teacher the criterion ignores, or too many
            task.check_teacher_count(s.criterion)
        if hasattr(criterion, "check_options"):
            criterion.check_options(cfg.criterion, len(s.teachers))
    except DistillError as e:
        raise DistillError(f"stage {s.name!r}: {e.message}") from None
