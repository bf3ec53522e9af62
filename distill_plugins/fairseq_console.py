"""Clears two kinds of noise out of every fairseq CLI's console output; nothing else changes.

- Logging. ``fairseq.models.wav2vec.wav2vec2_classification`` (in ve-fairseq 0.12.3, imported with every
  fairseq model) calls ``logging.basicConfig(level=DEBUG)`` at import. fairseq-generate, -validate,
  -eval-lm, -interactive and -preprocess configure their logging after importing fairseq, so their own
  configuration is ignored: they print every library's DEBUG records in Python's bare
  ``LEVEL:name:message`` form. :func:`restore_log_format` gives that handler fairseq's format and the level
  its CLIs use (``LOGLEVEL``, default INFO). fairseq-train configures logging before the import and is
  untouched.
- Warnings. fairseq 0.12's own code triggers about 25 lines of deprecation notices in hydra and torch
  before its first log line (hydra.experimental's initialize/compose, hydra's version_base, fairseq's
  ``# @package _group_`` headers and ConfigStore schema matching, ``torch.cuda.amp.autocast``, its
  dataloaders' ``pin_memory`` without a GPU). None is about the user's command, and none can be acted on
  short of changing fairseq. :func:`silence_dependency_notices` filters exactly these messages; every
  other warning still shows, and a ``-W`` option or ``PYTHONWARNINGS`` leaves the filters as the user set
  them.
"""
import logging
import os
import sys
import warnings

FAIRSEQ_LOG_FORMAT = "%(asctime)s | %(levelname)s | %(name)s | %(message)s"
FAIRSEQ_DATE_FORMAT = "%Y-%m-%d %H:%M:%S"

# (category, regular expression matched at the start of the message)
FAIRSEQ_DEPENDENCY_NOTICES = (
    (UserWarning, r"hydra\.experimental\.(initialize|compose)\(\) is no longer experimental"),
    (UserWarning, r"\s*The version_base parameter is not specified"),  # Hydra14MigrationWarning
    (UserWarning, r"In '.*': Usage of deprecated keyword in package header"),
    (UserWarning, r"\s*'config' is validated against ConfigStore schema with the same name"),
    (UserWarning, r"\s*The strict flag in the compose API is deprecated"),
    (UserWarning, r"'pin_memory' argument is set as true but no accelerator is found"),
    (FutureWarning, r"`torch\.cuda\.amp\.autocast\(args\.\.\.\)` is deprecated"),
)


def restore_log_format() -> bool:
    """Give the root handler left by wav2vec2_classification's basicConfig fairseq's format and level."""
    root = logging.getLogger()
    if "fairseq.models.wav2vec.wav2vec2_classification" not in sys.modules:
        return False
    if root.level != logging.DEBUG or len(root.handlers) != 1:
        return False
    handler = root.handlers[0]
    if getattr(handler.formatter, "_fmt", None) != logging.BASIC_FORMAT:
        return False  # configured by someone else (fairseq-train, the user): left alone
    handler.setFormatter(logging.Formatter(FAIRSEQ_LOG_FORMAT, datefmt=FAIRSEQ_DATE_FORMAT))
    root.setLevel(os.environ.get("LOGLEVEL", "INFO").upper())
    return True


def silence_dependency_notices() -> bool:
    """Add the filters unless the user chose warning filters of their own; returns whether it did."""
    if sys.warnoptions or os.environ.get("PYTHONWARNINGS"):
        return False
    for category, message in FAIRSEQ_DEPENDENCY_NOTICES:
        warnings.filterwarnings("ignore", message=message, category=category)
    return True
