"""Decide, before anything runs, what each stage needs, and say why.

* ``skip``: recorded as done, same fingerprint, and its selected checkpoint still has the recorded
  sha256 (a file merely existing is not enough).
* ``resume``: recorded as started (interrupted, killed or failed) with the same fingerprint: rerun
  the same command, and fairseq continues from ``checkpoint_last.pt`` in the stage's directory.
* ``pretrained``: a checkpoint trained outside the chain; hashed, never trained. When its sha256
  differs from the one its students were trained with, they retrain (their fingerprint changes).
* ``reselect``: done, and only ``checkpoint:`` (best/last) changed: the newly selected file of its
  finished training is recorded (its sha256 checked against the record), not retrained; its
  students retrain, their teacher's checkpoint being another.
* ``train`` / ``retrain``: new, or invalidated: settings, teacher checkpoint, initial checkpoint or
  data changed, the checkpoint is missing or was replaced outside the chain, or a teacher of the
  stage is itself (re)trained. A retrained stage's old directory is moved to ``<stage>.stale``.
"""
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

from ..teacher import sha256_file
from .command import fingerprint, settings_diff, stage_argv, stage_settings
from .config import ChainConfig, StageSpec
from .inspect import count_parameters
from .manifest import Manifest, stage_data_sha256


@dataclass
class StagePlan:
    stage: StageSpec
    action: str  # skip | reselect | resume | train | retrain | pretrained
    reasons: List[str] = field(default_factory=list)
    sha256: Optional[str] = None  # skip: the verified sha256 of the selected checkpoint
    parameters: Optional[int] = None


def short(sha: Optional[str]) -> str:
    return (sha or "none")[:12]


def checkpoint_updates(path: str) -> Optional[int]:
    """Number of updates recorded in a fairseq checkpoint (read memory-mapped), None if unreadable."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        return int(state["optimizer_history"][-1]["num_updates"])
    except Exception:
        return None


def checkpoint_parameters(path: str) -> int:
    """Parameters of the model stored in a fairseq checkpoint (read memory-mapped)."""
    state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    seen, total = set(), 0
    for t in state["model"].values():
        if torch.is_tensor(t) and t.is_floating_point():
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))  # tied weights once
            if key not in seen:
                seen.add(key)
                total += t.numel()
    return total


def _changes(rec: dict, settings: dict, teacher_sha: List[str], init_sha: Optional[str], data_sha: str) -> List[str]:
    out = ["settings changed: " + c for c in settings_diff(rec.get("settings", {}), settings)]
    old_teachers = rec.get("teachers", [])
    for i, sha in enumerate(teacher_sha):
        old = old_teachers[i]["sha256"] if i < len(old_teachers) else None
        name = settings["teachers"][i]
        if old != sha and settings["teachers"] == rec.get("settings", {}).get("teachers"):
            out.append(f"teacher {name!r} checkpoint differs from the one it was trained with "
                       f"(sha256 {short(old)} -> {short(sha)})")
    if (rec.get("init") or {}).get("sha256") != init_sha:
        out.append(f"init checkpoint changed (sha256 {short((rec.get('init') or {}).get('sha256'))} -> {short(init_sha)})")
    if rec.get("data_sha256") != data_sha:
        out.append("the content of its data changed (the data directory, or what --lm-data, --teacher-data or "
                   "--teacher-cache name)")
    return out or ["its fingerprint changed"]


def _reselection(stage: StageSpec, rec: dict, settings: dict, fp_as_recorded: str, ckpt: str) -> Optional["StagePlan"]:
    """A ``reselect`` plan when only ``checkpoint:`` changed on a finished stage (``fp_as_recorded``:
    the fingerprint with the recorded selection) and the newly selected file is the one its training
    wrote (sha256 in the record); else None (it retrains)."""
    before = rec.get("settings", {}).get("checkpoint")
    if rec.get("status") != "done" or before == settings["checkpoint"] or fp_as_recorded != rec.get("fingerprint"):
        return None
    name = os.path.basename(ckpt)
    recorded = ((rec.get("checkpoints") or {}).get(name) or {}).get("sha256")
    if recorded is None or not os.path.isfile(ckpt) or sha256_file(ckpt) != recorded:
        return None
    return StagePlan(stage, "reselect", [f"checkpoint {before} -> {settings['checkpoint']}: records {name} of its "
                                         f"finished training (sha256 {short(recorded)}), no retraining"], recorded)


def _has_files(path: str) -> bool:
    return os.path.isdir(path) and bool(os.listdir(path))


def make_plan(chain: ChainConfig, manifest: Manifest, data_sha256: str,
              warn: Callable[[str], None] = lambda msg: None) -> List[StagePlan]:
    plans: Dict[str, StagePlan] = {}
    for stage in chain.stages:
        rec = manifest.stages.get(stage.name)
        save_dir, ckpt = chain.save_dir(stage), chain.checkpoint_path(stage)
        if stage.pretrained:
            sha = sha256_file(ckpt)
            recorded = ((rec or {}).get("checkpoint") or {}).get("sha256")
            note = "" if recorded in (None, sha) else f"; changed since the last run (sha256 {short(recorded)} -> {short(sha)})"
            plans[stage.name] = StagePlan(stage, "pretrained", [f"{ckpt} (sha256 {short(sha)}){note}"], sha)
            continue
        retrained = [t for t in stage.teachers if plans[t].action not in ("skip", "reselect", "pretrained")]
        if retrained:
            action = "retrain" if (rec or _has_files(save_dir)) else "train"
            who = "its teacher" + ("s " if len(retrained) > 1 else " ") + ", ".join(map(repr, retrained))
            plan = StagePlan(stage, action, [f"{who} {'are' if len(retrained) > 1 else 'is'} (re)trained"])
        else:
            settings = stage_settings(stage)
            data_sha = stage_data_sha256(data_sha256, stage.args)
            teacher_sha = [plans[t].sha256 for t in stage.teachers]
            init_sha = sha256_file(stage.init) if stage.init else None
            fp = fingerprint(settings, teacher_sha, init_sha, data_sha)
            if rec is None:
                if _has_files(save_dir):
                    plan = StagePlan(stage, "retrain", [f"{save_dir} holds files the manifest does not record"])
                else:
                    plan = StagePlan(stage, "train", ["not trained yet"])
            elif rec.get("fingerprint") != fp:
                plan = _reselection(stage, rec, settings, fingerprint(
                    dict(settings, checkpoint=rec.get("settings", {}).get("checkpoint")), teacher_sha, init_sha,
                    data_sha), ckpt) or StagePlan(stage, "retrain", _changes(rec, settings, teacher_sha, init_sha,
                                                                               data_sha))
            elif rec.get("status") == "done":
                recorded = (rec.get("checkpoint") or {}).get("sha256")
                if not os.path.isfile(ckpt):
                    plan = StagePlan(stage, "retrain", [f"its checkpoint {ckpt} is missing"])
                else:
                    sha = sha256_file(ckpt)
                    if sha != recorded:
                        plan = StagePlan(stage, "retrain", [
                            f"{os.path.basename(ckpt)} was replaced outside the chain "
                            f"(sha256 recorded {short(recorded)}, file now {short(sha)})"])
                    else:
                        plan = StagePlan(stage, "skip", [f"done, {os.path.basename(ckpt)} verified (sha256 {short(sha)})"], sha)
            else:
                last = os.path.join(save_dir, "checkpoint_last.pt")
                n = checkpoint_updates(last) if os.path.isfile(last) else None
                if n is not None:
                    plan = StagePlan(stage, "resume", [f"{rec.get('status')}; resumes from checkpoint_last.pt (update {n})"])
                elif os.path.isfile(last):
                    plan = StagePlan(stage, "retrain", [f"{rec.get('status')}, and its checkpoint_last.pt is unreadable "
                                                        "(killed while writing it?); starts over"])
                else:
                    plan = StagePlan(stage, "resume", [f"{rec.get('status')} before saving a checkpoint; starts over"])
        plans[stage.name] = plan

    # sizes: build every stage's model on the meta device from its real command line
    for stage in chain.stages:
        if stage.pretrained:
            plans[stage.name].parameters = checkpoint_parameters(stage.pretrained)
            continue
        argv = stage_argv(chain, stage, [chain.checkpoint_path(chain.stage(t)) for t in stage.teachers])
        plans[stage.name].parameters = count_parameters(stage.name, argv)
    for stage in chain.stages:
        mine = plans[stage.name].parameters
        for t in stage.teachers:
            theirs = plans[t].parameters
            if mine > theirs:
                warn(f"stage {stage.name!r} ({mine:,} parameters) is larger than its teacher {t!r} "
                     f"({theirs:,} parameters); a teacher assistant should sit between teacher and student in size")
    return [plans[s.name] for s in chain.stages]
