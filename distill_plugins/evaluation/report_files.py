"""Writing result files whole or not at all: a temporary file in the same directory, then a rename.

A reader (or a crashed run) never sees a half-written JSON, markdown or PNG file.
"""
import json
import os
import tempfile
from typing import Callable, Iterable, Optional

from ..errors import DistillError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: str, write: Callable, mode: str = "w"):
    """Call ``write(file)`` on a temporary file next to ``path``, then rename it to ``path``
    (flushed to disk first; with the permissions a plain ``open`` gives, not mkstemp's 0600)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if "b" not in mode else {})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text_atomic(path: str, text: str):
    write_atomic(path, lambda f: f.write(text))


def write_json_atomic(path: str, obj):
    write_atomic(path, lambda f: (json.dump(obj, f, indent=1, ensure_ascii=False), f.write("\n")))


def check_outputs(paths: Iterable[Optional[str]], overwrite: bool, inputs: Iterable[str] = ()):
    """Refuse output files that exist (unless ``overwrite``), are directories or inputs, or are given
    twice, before any work."""
    inputs = {os.path.realpath(p) for p in inputs}
    seen = {}
    for path in filter(None, paths):
        real = os.path.realpath(path)
        if real in seen:
            raise DistillError(f"outputs {seen[real]} and {path} are the same file; give each its own path")
        seen[real] = path
        if os.path.isdir(path):
            raise DistillError(f"output {path} is a directory; pass a file path")
        if real in inputs:
            raise DistillError(f"output {path} is also an input; write the result to another file")
        if os.path.exists(path) and not overwrite:
            raise DistillError(f"{path} already exists; pass --overwrite to replace it")
