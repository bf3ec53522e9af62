"""Output directories that appear whole or not at all (distill-prepare, prepare_lm).

A CLI writes into a scratch directory next to the destination; only when its block finishes
without an error does the scratch output replace the destination (``os.replace``: atomic on one
filesystem). On any error the scratch directory is removed and the destination is untouched.
"""
import contextlib
import os
import shutil
import tempfile


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
        if os.path.exists(dest):
            shutil.rmtree(dest)
        os.replace(out, dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
