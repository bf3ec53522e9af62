"""Output directories that appear whole or not at all (distill-prepare, prepare_lm, seqkd, cache-teacher,
miniplm, export-hf), and the checks that a destination is safe to replace (``check_output_dir``).

A CLI writes into a scratch directory next to the destination; only when its block finishes
without an error does the scratch output replace the destination (``os.replace``: atomic on one
filesystem). On any error, Ctrl-C or SIGTERM the scratch directory is removed and the destination is
untouched. A process killed outright (SIGKILL, OOM) cannot clean up: its scratch directory, named
after its host and pid, is removed by the next run that stages beside it once that pid is gone.
"""
import contextlib
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading

from .errors import DistillError, check


@contextlib.contextmanager
def staged_directory(dest: str, prefix: str = ".staged-"):
    """Yield ``(work, out)``: a scratch directory and the empty ``out`` directory inside it that
    becomes ``dest`` (replacing an existing one) when the ``with`` block succeeds."""
    parent = os.path.dirname(dest) or "."
    created = []  # the parent directories made here, deepest first: removed again if the block fails
    missing = os.path.abspath(parent)
    while not os.path.exists(missing):
        created.append(missing)
        missing = os.path.dirname(missing)
    os.makedirs(parent, exist_ok=True)
    owner = f"{prefix}{socket.gethostname()}-"
    _remove_orphans(parent, owner)
    work = tempfile.mkdtemp(prefix=f"{owner}{os.getpid()}-", dir=parent)
    previous = _raise_on_sigterm(dest)
    done = False
    try:
        out = os.path.join(work, "out")
        os.makedirs(out)
        yield work, out
        if os.path.exists(dest):  # moved aside first (a rename), so a kill never leaves it half-deleted
            os.replace(dest, os.path.join(work, "replaced"))
        os.replace(out, dest)
        done = True
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if not done:
            for path in created:
                try:
                    os.rmdir(path)  # only while empty
                except OSError:
                    break
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _raise_on_sigterm(dest: str):
    """Make SIGTERM unwind the stack (so ``finally`` blocks run) while a directory is staged; the
    handler it replaces, or None where signals cannot be set (not the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def stop(signum, frame):
        print(f"error: stopped by SIGTERM; the partial output was removed and {dest} is unchanged",
              file=sys.stderr, flush=True)
        raise SystemExit(128 + signum)

    return signal.signal(signal.SIGTERM, stop)


def _remove_orphans(parent: str, owner: str):
    """Remove scratch directories ``<owner><pid>-*`` in ``parent`` left by killed processes of this
    host (their pid no longer runs)."""
    for name in os.listdir(parent):
        pid = name[len(owner):].split("-", 1)[0] if name.startswith(owner) else ""
        if not pid.isdigit() or not os.path.isdir(os.path.join(parent, name)):
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
        except PermissionError:  # a live process of another user
            pass


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
