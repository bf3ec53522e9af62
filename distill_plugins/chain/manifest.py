"""The chain's record, ``<output_dir>/manifest.json``, always replaced atomically.

Per stage: ``status`` (running, interrupted, failed, done), ``fingerprint`` (settings + sha256 of
teachers, initial checkpoint and data), ``settings``, ``command``, ``teachers`` (stage, path,
sha256), ``init``, ``checkpoint`` (the selected one: path and sha256), ``checkpoints`` (best and
last), ``parameters``, ``wall_time_s`` (summed over attempts), ``attempts``, ``metrics`` (the last
validation line of fairseq's log and the checkpoint's best loss). Paths are relative to the
manifest's directory.
"""
import hashlib
import json
import os
import time
from typing import Dict, List

from ..errors import DistillError
from ..evaluation.report_files import write_atomic
from ..teacher import sha256_file

VERSION = 1


# files of a data directory that fairseq-train never reads: the test split's jsonl (distill-evaluate's;
# its scores are keyed by that file's own hash) and logs. The other jsonl are read (valid.jsonl: the
# references of --eval-rouge), and so is prepare_report.json (its --max-total-tokens cuts the examples).
NOT_READ_BY_TRAINING = {"names": ("test.jsonl",), "suffixes": (".log", ".md")}


def read_by_training(name: str) -> bool:
    return name not in NOT_READ_BY_TRAINING["names"] and not name.endswith(NOT_READ_BY_TRAINING["suffixes"])


def sha256_dir(path: str) -> str:
    """sha256 over the relative names and contents of the regular files under ``path`` (a data-bin,
    its --teacher-data subdirectory, a teacher cache) that training reads: hidden entries (scratch
    directories) and ``NOT_READ_BY_TRAINING`` skipped."""
    h = hashlib.sha256()
    for top, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(f for f in files if not f.startswith(".") and read_by_training(f)):
            full = os.path.join(top, name)
            if os.path.isfile(full):
                rel = os.path.relpath(full, path).replace(os.sep, "/")
                h.update(rel.encode("utf-8") + b"\0" + sha256_file(full).encode("ascii") + b"\n")
    return h.hexdigest()


# options of a stage naming more inputs than the chain's data directory (comma-separated paths)
INPUT_OPTIONS = ("lm-data", "teacher-data", "teacher-cache")


def stage_data_sha256(data_sha256: str, args: Dict) -> str:
    """The content of what a stage reads besides checkpoints: ``data_sha256`` (the chain's data
    directory) itself, or, for a stage with INPUT_OPTIONS, sha256 over it and each of those paths'
    content (a missing path counts as such; fairseq-train then says what is wrong)."""
    given = [(k, args[k]) for k in INPUT_OPTIONS if args.get(k) not in (None, False, "")]
    if not given:
        return data_sha256
    h = hashlib.sha256(data_sha256.encode("ascii"))
    for key, value in given:
        for path in (p.strip() for p in str(value).split(",") if p.strip()):
            sha = sha256_dir(path) if os.path.isdir(path) else sha256_file(path) if os.path.isfile(path) else "missing"
            h.update(f"{key}\0{os.path.abspath(path)}\0{sha}\n".encode("utf-8"))
    return h.hexdigest()


def write_json_atomic(path: str, obj) -> None:
    write_atomic(path, lambda f: (json.dump(obj, f, indent=2, sort_keys=False), f.write("\n")))


class Manifest:
    def __init__(self, path: str, chain: str):
        self.path = path
        self.root = os.path.dirname(os.path.abspath(path))
        self.data = {"version": VERSION, "chain": chain, "stages": {}}
        if os.path.isfile(path):
            try:
                with open(path) as f:
                    data = json.load(f)
                assert isinstance(data, dict) and isinstance(data.get("stages"), dict)
            except (ValueError, AssertionError):
                raise DistillError(f"{path} is not a chain manifest; move it away to retrain the whole chain") from None
            self.data = data

    @property
    def stages(self) -> Dict[str, dict]:
        return self.data["stages"]

    def relative(self, path: str) -> str:
        return os.path.relpath(path, self.root)

    def absolute(self, path: str) -> str:
        return os.path.normpath(os.path.join(self.root, path))

    def save(self) -> None:
        self.data["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        write_json_atomic(self.path, self.data)

    def invalidate(self, names: List[str]) -> None:
        for name in names:
            self.stages.pop(name, None)
