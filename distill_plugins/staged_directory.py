"""Output directories that appear whole or not at all (distill-prepare, prepare_lm, seqkd, cache-teacher,
miniplm, export-hf), and the checks that a destination is safe to replace (``check_output_dir``).

A CLI writes into a scratch directory next to the destination; only when its block finishes
without an error does the scratch output replace the destination (``os.replace``: atomic on one
filesystem). On any error the scratch directory is removed and the destination is untouched.
"""
import contextlib
import os
import shutil
import tempfile

from .errors import DistillError, check


@contextlib.contextmanager
def staged_directory(dest: str, prefix: str = ".staged-"):
    """Yield ``(work, out)``: a scratch directory and the empty ``out`` directory inside it that
    becomes ``dest`` (replacing an existing one) when the ``with`` block succeeds."""
    parent = os.path.dirname(dest) or "."
    os.makedirs(parent, exist_ok=True)
    work = tempfile.mkdtemp(prefix=prefix, dir=parent)
    try:
        out = os.path.join(work, "out")
        os.makedirs(out)
        yield work, out
        if os.path.exists(dest):  # moved aside first (a rename), so a kill never leaves it half-deleted
            os.replace(dest, os.path.join(work, "replaced"))
        os.replace(out, dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def is_within(path: str, top: str) -> bool:
    """``path`` is ``top`` or lies under it (symbolic links resolved)."""
    path, top = os.path.realpath(path), os.path.realpath(top)
    return path == top or path.startswith(top.rstrip(os.sep) + os.sep)


def check_output_dir(dest: str, flag: str, marker: str, overwrite: bool, inputs=()) -> str:
    """``dest`` as an absolute path once it is safe to stage an output there, else a one-line
    DistillError: a destination that is or holds one of ``inputs`` (``(flag, path)`` pairs; None
    paths skipped) or the current directory, a file or a path under a file, or an existing directory
    without ``--overwrite``. ``--overwrite`` replaces only an empty directory or one holding
    ``marker``, the file this command writes (its own earlier output), never other files."""
    dest = os.path.abspath(dest)
    for in_flag, path in inputs:
        if path and is_within(path, dest):
            what = "is" if is_within(dest, path) else "contains"
            raise DistillError(f"{flag} {dest} {what} the input {in_flag} {path}; writing there would destroy "
                               f"it: pick another {flag}")
    if is_within(os.getcwd(), dest):
        raise DistillError(f"{flag} {dest} is or contains the current directory; pick another {flag}")
    parent = os.path.dirname(dest)
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    check(os.path.isdir(parent), f"{flag} {dest}: {parent} is a file, not a directory; pick another {flag}")
    if os.path.islink(dest) or (os.path.lexists(dest) and not os.path.isdir(dest)):
        kind = "a symbolic link" if os.path.islink(dest) else "a file"
        raise DistillError(f"{flag} {dest} is {kind}, not a directory; remove it yourself or pick another {flag}")
    if os.path.isdir(dest):
        check(overwrite, f"{dest} already exists; pass --overwrite to replace it")
        check(not os.listdir(dest) or os.path.isfile(os.path.join(dest, marker)),
              f"{flag} {dest} holds files this command did not write (no {marker}); --overwrite replaces only "
              f"its own earlier output or an empty directory: remove it yourself or pick another {flag}")
    return dest
