"""One stage -> its exact fairseq-train command line, and the settings that identify it.

The settings (architecture, initial checkpoint, options) exclude the paths the chain manages (data,
save dir, teacher paths): those are identified by content hashes in the fingerprint instead, so a
chain directory can be moved and rerun without retraining.
"""
import hashlib
import json
import os
import shutil
import sys
from typing import Any, Dict, List, Optional

from .config import ChainConfig, StageSpec, option_argv

USER_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # distill_plugins/
DEFAULT_TASK = "instruction_distillation"


def executable(name: str) -> str:
    """A console script next to this Python (the package's environment), else the one on PATH."""
    local = os.path.join(os.path.dirname(sys.executable), name)
    return local if os.path.isfile(local) else (shutil.which(name) or name)


def fairseq_train_executable() -> str:
    return executable("fairseq-train")


def evaluate_executable() -> str:
    return executable("distill-evaluate")


def stage_argv(chain: ChainConfig, stage: StageSpec, teacher_paths: List[str]) -> List[str]:
    """fairseq-train's arguments (without the executable) for ``stage``."""
    args = dict(stage.args)
    task = args.pop("task", DEFAULT_TASK)
    argv = [chain.data, "--user-dir", USER_DIR, "--task", str(task), "--arch", stage.arch]
    argv += option_argv(args)
    argv += ["--save-dir", chain.save_dir(stage)]
    if teacher_paths:
        argv += ["--teacher-path", ",".join(teacher_paths)]
    if stage.init:
        argv += ["--finetune-from-model", stage.init]
    return argv


def stage_settings(stage: StageSpec) -> Dict[str, Any]:
    """What the user set for this stage (JSON-able; order-independent in the fingerprint)."""
    return {
        "arch": stage.arch,
        # as fairseq-train sees them: `max-update: 8` and `max-update: "8"` are the same setting
        "args": {k: v if v is True else str(v) for k, v in sorted(stage.args.items()) if v is not None and v is not False},
        "teachers": list(stage.teachers),
        "checkpoint": stage.checkpoint,
    }


def fingerprint(settings: Dict[str, Any], teacher_sha256: List[str], init_sha256: Optional[str], data_sha256: str) -> str:
    """sha256 of the stage's settings and the content of everything it reads."""
    blob = json.dumps(
        {"settings": settings, "teachers": teacher_sha256, "init": init_sha256, "data": data_sha256},
        sort_keys=True, separators=(",", ":"),
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def settings_diff(old: Dict[str, Any], new: Dict[str, Any]) -> List[str]:
    """Human-readable differences between two ``stage_settings``."""
    out = []
    for key in ("arch", "teachers", "checkpoint"):
        if old.get(key) != new.get(key):
            out.append(f"{key} {old.get(key)} -> {new.get(key)}")
    a, b = old.get("args", {}), new.get("args", {})
    for name in sorted(set(a) | set(b)):
        if name not in a:
            out.append(f"--{name} {b[name]} added")
        elif name not in b:
            out.append(f"--{name} {a[name]} removed")
        elif a[name] != b[name]:
            out.append(f"--{name} {a[name]} -> {b[name]}")
    return out
