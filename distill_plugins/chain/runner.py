"""Run a chain's plan: one fairseq-train process per stage, progress lines, the manifest kept current.

A stage is recorded as ``running`` (with its fingerprint) before fairseq-train starts, so a rerun
after a kill resumes it; ``done`` only after its checkpoints are hashed. fairseq-train's full output
goes to ``<stage>/train.log`` (appended on resume). One chain runs at a time per output directory
(``.lock``). The child fairseq-train gets SIGTERM if this process dies.
"""
import fcntl
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from typing import Dict, List, Optional, TextIO

import torch

from ..errors import DistillError
from ..teacher import sha256_file
from .command import evaluate_executable, fairseq_train_executable, fingerprint, stage_argv, stage_settings
from .config import ChainConfig, StageSpec, option_argv
from .manifest import Manifest, sha256_dir, stage_data_sha256
from .plan import StagePlan, checkpoint_updates, make_plan, short


def parse_log_fields(line: str, marker: str) -> Dict[str, object]:
    """'... | valid on 'valid' subset | loss 7.461 | ppl 176.23 | num_updates 10' -> {loss: 7.461, ...}."""
    fields: Dict[str, object] = {}
    for part in line.split(marker, 1)[1].split(" | "):
        key, _, value = part.strip().partition(" ")
        if not key or not value:
            continue
        try:
            fields[key] = int(value) if value.isdigit() else float(value)
        except ValueError:
            fields[key] = value
    return fields


VALID_MARKER = "valid on 'valid' subset"


def _die_with_parent():  # runs in the child before exec
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


class ChainRunner:
    def __init__(self, chain: ChainConfig, out: Optional[TextIO] = None, verbose: bool = False):
        self.chain = chain
        self.out = out
        self.verbose = verbose
        self.exe = fairseq_train_executable()
        self.manifest = Manifest(os.path.join(chain.output_dir, "manifest.json"), chain.name)

    # -- output ---------------------------------------------------------------------------------
    def say(self, msg: str = ""):
        print(msg, file=self.out or sys.stdout, flush=True)

    @staticmethod
    def warn(msg: str):
        print(f"distill-chain: warning: {msg}", file=sys.stderr, flush=True)

    # -- planning -------------------------------------------------------------------------------
    def plan(self) -> List[StagePlan]:
        self.data_sha256 = sha256_dir(self.chain.data)
        plans = make_plan(self.chain, self.manifest, self.data_sha256, warn=self.warn)
        width = max(len(p.stage.name) for p in plans)
        self.say(f"chain {self.chain.name!r}: {len(plans)} stages in {self.chain.output_dir}")
        for i, p in enumerate(plans, 1):
            self.say(f"  {i}. {p.stage.name:<{width}}  {p.action:<7}  {'; '.join(p.reasons)}")
        return plans

    def command(self, stage: StageSpec) -> List[str]:
        teachers = [self.chain.checkpoint_path(self.chain.stage(t)) for t in stage.teachers]
        return [self.exe] + stage_argv(self.chain, stage, teachers)

    def run(self, dry_run: bool = False) -> List[StagePlan]:
        plans = self.plan()
        if dry_run:
            self.say("\ndry run: the fairseq-train commands, in order (skipped stages commented out):")
            for p in plans:
                prefix = "# " if p.action in ("skip", "reselect") else ""
                self.say(f"# stage {p.stage.name}: {p.action} ({p.parameters:,} parameters)\n"
                         f"{prefix}{shlex.join(self.command(p.stage))}")
            return plans
        if os.path.exists(self.chain.output_dir) and not os.path.isdir(self.chain.output_dir):
            raise DistillError(f"the output directory {self.chain.output_dir} is a file; pass another --output-dir "
                               "(or output_dir: in the chain file)")
        os.makedirs(self.chain.output_dir, exist_ok=True)
        lock = open(os.path.join(self.chain.output_dir, ".lock"), "w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise DistillError(f"another distill-chain is running in {self.chain.output_dir}; wait for it to finish") from None
        try:
            self._invalidate(plans)
            for i, p in enumerate(plans, 1):
                tag = f"[{i}/{len(plans)}] {p.stage.name}"
                if p.action == "pretrained":
                    self._record_pretrained(p, tag)
                elif p.action == "skip":
                    self.say(f"{tag}: skipped ({p.reasons[0]})")
                elif p.action == "reselect":
                    self._record_reselection(p, tag)
                else:
                    self._run_stage(p, tag)
                if self.chain.evaluate is not None:
                    self._evaluate(p.stage, tag)
            if self.chain.evaluate is not None:
                self._print_scores(plans)
            last = plans[-1].stage
            self.say(f"chain {self.chain.name!r} done; final checkpoint {self.chain.checkpoint_path(last)}")
            self.say(f"manifest: {self.manifest.path}")
        finally:
            lock.close()
        return plans

    def _invalidate(self, plans: List[StagePlan]):
        stale = [p for p in plans if p.action == "retrain"]
        for p in stale:
            d = self.chain.save_dir(p.stage)
            if os.path.isdir(d) and os.listdir(d):
                backup = d + ".stale"
                shutil.rmtree(backup, ignore_errors=True)
                os.replace(d, backup)
                self.say(f"  {p.stage.name}: old outputs moved to {backup}")
        self.manifest.invalidate([p.stage.name for p in stale])
        if stale:
            self.manifest.save()

    # -- one stage -------------------------------------------------------------------------------
    def _record_pretrained(self, p: StagePlan, tag: str):
        rec = self.manifest.stages.setdefault(p.stage.name, {})
        if (rec.get("checkpoint") or {}).get("sha256") != p.sha256:
            rec.pop("evaluation", None)
        rec.update({"status": "pretrained", "checkpoint": {"path": p.stage.pretrained, "sha256": p.sha256},
                    "parameters": p.parameters})
        self.manifest.save()
        self.say(f"{tag}: pretrained checkpoint {p.stage.pretrained} (sha256 {short(p.sha256)})")

    def _inputs(self, stage: StageSpec):
        """(settings, teacher sha256s as recorded, init sha256, fingerprint, data sha256) of a stage now."""
        teacher_sha = [self.manifest.stages[t]["checkpoint"]["sha256"] for t in stage.teachers]
        init_sha = sha256_file(stage.init) if stage.init else None
        settings = stage_settings(stage)
        data_sha = stage_data_sha256(self.data_sha256, stage.args)  # hashes the stage's inputs: once
        return settings, teacher_sha, init_sha, fingerprint(settings, teacher_sha, init_sha, data_sha), data_sha

    def _record_reselection(self, p: StagePlan, tag: str):
        stage, man = p.stage, self.manifest
        settings, _, _, fp, _ = self._inputs(stage)
        man.stages[stage.name].update({
            "settings": settings, "fingerprint": fp,
            "checkpoint": {"path": man.relative(self.chain.checkpoint_path(stage)), "sha256": p.sha256}})
        man.save()
        self.say(f"{tag}: {p.reasons[0]}")

    def _run_stage(self, p: StagePlan, tag: str):
        chain, stage, man = self.chain, p.stage, self.manifest
        save_dir = chain.save_dir(stage)
        os.makedirs(save_dir, exist_ok=True)
        teachers = [chain.stage(t) for t in stage.teachers]
        settings, teacher_sha, init_sha, fp, data_sha = self._inputs(stage)
        cmd = self.command(stage)
        rec = man.stages.get(stage.name) if p.action == "resume" else None
        rec = rec or {"attempts": 0, "wall_time_s": 0.0, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        rec.update({
            "status": "running",
            "fingerprint": fp,
            "settings": settings,
            "command": shlex.join(cmd),
            "save_dir": man.relative(save_dir),
            "teachers": [{"stage": t.name, "path": man.relative(chain.checkpoint_path(t)), "sha256": s}
                         for t, s in zip(teachers, teacher_sha)],
            "init": {"path": stage.init, "sha256": init_sha} if stage.init else None,
            "data": chain.data,
            "data_sha256": data_sha,
            "parameters": p.parameters,
        })
        rec["attempts"] += 1
        man.stages[stage.name] = rec
        man.save()

        via = f" from teacher {', '.join(stage.teachers)}" if stage.teachers else ""
        self.say(f"{tag}: {p.action}{via}, {p.parameters:,} parameters -> {save_dir}")
        log_path = os.path.join(save_dir, "train.log")
        t0 = time.time()
        try:
            if p.action == "resume" and self._already_finished(stage):
                self.say(f"  {stage.name}: fairseq-train had already reached --max-update; recording it")
                rc = 0
            else:
                rc = self._run_fairseq(cmd, log_path, stage.name)
        except KeyboardInterrupt:
            rec["wall_time_s"] += time.time() - t0
            rec["status"] = "interrupted"
            man.save()
            raise DistillError(f"interrupted during stage {stage.name!r}; rerun the same command to resume it") from None
        rec["wall_time_s"] = round(rec["wall_time_s"] + time.time() - t0, 2)
        if rc != 0:
            rec["status"] = "failed"
            man.save()
            self._print_tail(log_path)
            raise DistillError(f"stage {stage.name!r}: fairseq-train exited with {rc}; see {log_path}")
        ckpt = chain.checkpoint_path(stage)
        if not os.path.isfile(ckpt):
            rec["status"] = "failed"
            man.save()
            raise DistillError(f"stage {stage.name!r} wrote no {os.path.basename(ckpt)} (validation disabled?); "
                               "set checkpoint: last for it")
        sha = sha256_file(ckpt)
        rec["checkpoint"] = {"path": man.relative(ckpt), "sha256": sha}
        rec["checkpoints"] = {
            name: {"path": man.relative(os.path.join(save_dir, name)), "sha256": sha if os.path.join(save_dir, name) == ckpt
                   else sha256_file(os.path.join(save_dir, name))}
            for name in ("checkpoint_best.pt", "checkpoint_last.pt") if os.path.isfile(os.path.join(save_dir, name))
        }
        rec["metrics"] = self._metrics(log_path, ckpt)
        rec["status"] = "done"
        rec["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        man.save()
        valid = rec["metrics"].get("valid", {})
        loss = f", valid loss {valid['loss']}" if "loss" in valid else ""
        self.say(f"{tag}: done in {rec['wall_time_s']:.1f}s{loss}; {os.path.basename(ckpt)} sha256 {short(sha)}")

    def _already_finished(self, stage: StageSpec) -> bool:
        max_update = stage.args.get("max-update")
        last = os.path.join(self.chain.save_dir(stage), "checkpoint_last.pt")
        if max_update in (None, False, 0, "0") or not os.path.isfile(last):
            return False
        n = checkpoint_updates(last)
        return n is not None and n >= int(max_update) and os.path.isfile(self.chain.checkpoint_path(stage))

    def _run_fairseq(self, cmd: List[str], log_path: str, name: str) -> int:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(log_path, "a") as log:
            log.write(f"== distill-chain {time.strftime('%Y-%m-%dT%H:%M:%S')}: {shlex.join(cmd)}\n")
            log.flush()
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                    env=env, preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
            try:
                for line in proc.stdout:
                    log.write(line)
                    log.flush()
                    self._progress(line.rstrip("\n"), name)
                return proc.wait()
            except BaseException:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                raise

    def _progress(self, line: str, name: str):
        if self.verbose:
            self.say(f"  {name}| {line}")
        elif VALID_MARKER in line:
            f = parse_log_fields(line, VALID_MARKER)
            extras = " | ".join(f"{k} {f[k]}" for k in ("loss", "nll_loss", "kd_loss", "best_loss") if k in f)
            self.say(f"  {name}: update {f.get('num_updates', '?')} | valid {extras}")
        elif "| train_inner |" in line:  # simple format: "... 25 / 47 loss=8.1, ..., num_updates=25, ..."
            f = dict(kv.strip().split("=", 1) for kv in line.split(", ") if "=" in kv)
            loss = next((v for k, v in f.items() if k.endswith("loss")), "?")  # the first: "... 47 loss"
            self.say(f"  {name}: update {f.get('num_updates', '?')} | train loss {loss}")
        elif "Loaded checkpoint" in line or "loading pretrained model from" in line:
            self.say(f"  {name}: {line.split(' | ')[-1]}")

    # -- evaluation (optional) ------------------------------------------------------------------------
    def _evaluate(self, stage: StageSpec, tag: str):
        """Rouge-L of the stage's selected checkpoint by distill-evaluate; reused while the checkpoint's
        sha256, the evaluation options and the evaluation files' content are unchanged."""
        rec = self.manifest.stages[stage.name]
        key = {"checkpoint_sha256": rec["checkpoint"]["sha256"], "options": self.chain.evaluate,
               "eval_files_sha256": self._evaluation_files_sha256()}
        if (rec.get("evaluation") or {}).get("key") == key:
            return
        save_dir = self.chain.save_dir(stage)
        os.makedirs(save_dir, exist_ok=True)
        out = os.path.join(save_dir, "evaluation.json")
        cmd = [evaluate_executable(), self.chain.checkpoint_path(stage), "--data", self.chain.data, "--json", out,
               "--name", stage.name, "--no-progress", "--overwrite"] + option_argv(self.chain.evaluate)
        self.say(f"{tag}: evaluating {os.path.basename(self.chain.checkpoint_path(stage))} (distill-evaluate)")
        t0 = time.time()
        try:
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        except KeyboardInterrupt:  # the stage itself is recorded done; only its score is missing
            raise DistillError(f"interrupted while evaluating stage {stage.name!r}; rerun the same command to "
                               "evaluate it") from None
        if proc.returncode != 0:
            tail = [ln for ln in proc.stdout.strip().splitlines() if ln.strip()][-1:] or ["no output"]
            raise DistillError(f"stage {stage.name!r}: distill-evaluate failed ({tail[0].strip()}); "
                               f"command: {shlex.join(cmd)}")
        with open(out) as f:
            files = json.load(f)["runs"][0]["files"]
        rec["evaluation"] = {
            "key": key, "path": self.manifest.relative(out), "seconds": round(time.time() - t0, 2),
            "sets": {f["name"]: {k: f.get(k) for k in ("rouge_l", "rouge_l_std", "examples", "seeds")} for f in files},
        }
        self.manifest.save()
        self.say(f"{tag}: Rouge-L " + ", ".join(f"{n} {v['rouge_l']:.2f}" for n, v in rec["evaluation"]["sets"].items()))

    def _evaluation_files_sha256(self) -> List[Optional[str]]:
        """sha256 of what distill-evaluate reads: --eval-files, else the data's <split>.jsonl."""
        files = self.chain.evaluate.get("eval-files")
        if files is None:
            files = [os.path.join(self.chain.data, f"{self.chain.evaluate.get('split', 'test')}.jsonl")]
        elif isinstance(files, str):
            files = [files]
        return [sha256_file(f) if os.path.isfile(f) else None for f in map(str, files)]

    def _print_scores(self, plans: List[StagePlan]):
        width = max(len(p.stage.name) for p in plans)
        self.say("Rouge-L per stage (manifest.json has the details):")
        for p in plans:
            ev = self.manifest.stages[p.stage.name].get("evaluation") or {}
            scores = ", ".join(f"{n} {v['rouge_l']:.2f} ± {v.get('rouge_l_std') or 0:.2f}" for n, v in ev.get("sets", {}).items())
            self.say(f"  {p.stage.name:<{width}}  {p.parameters:>12,} parameters  {scores}")

    @staticmethod
    def _metrics(log_path: str, ckpt: str) -> dict:
        metrics: dict = {}
        with open(log_path, errors="replace") as f:
            for line in f:
                if VALID_MARKER in line:
                    metrics["valid"] = parse_log_fields(line, VALID_MARKER)
        try:
            state = torch.load(ckpt, map_location="cpu", weights_only=False, mmap=True)
            extra = state.get("extra_state") or {}
            metrics["checkpoint_val_loss"] = extra.get("val_loss")
            metrics["best_val_loss"] = extra.get("best")
            metrics["num_updates"] = int(state["optimizer_history"][-1]["num_updates"])
        except Exception:
            pass
        return metrics

    def _print_tail(self, log_path: str, n: int = 15):
        with open(log_path, errors="replace") as f:
            lines = f.readlines()[-n:]
        for line in lines:
            print("  | " + line.rstrip("\n"), file=sys.stderr)
