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


def sha256_dir(path: str) -> str:
    """sha256 over the names and contents of the regular files directly in ``path`` (a data-bin)."""
    h = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if os.path.isfile(full):
            h.update(name.encode("utf-8") + b"\0" + sha256_file(full).encode("ascii") + b"\n")
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
