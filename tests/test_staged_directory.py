"""staged_directory: the destination appears whole or not at all, also on SIGTERM, and scratch
directories of killed processes are removed by the next run."""
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

from distill_plugins.staged_directory import staged_directory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_success_replaces_and_error_leaves_destination(tmp_path):
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "old").write_text("old")
    with staged_directory(str(dest), prefix=".t-") as (_work, out):
        open(os.path.join(out, "new"), "w").write("new")
    assert sorted(os.listdir(dest)) == ["new"]
    with pytest.raises(RuntimeError):
        with staged_directory(str(dest), prefix=".t-") as (_work, out):
            open(os.path.join(out, "half"), "w").write("x")
            raise RuntimeError("boom")
    assert sorted(os.listdir(dest)) == ["new"]
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_a_failed_run_removes_the_parent_directories_it_made(tmp_path):
    """Before: an empty a/b/ stayed behind after a failed run into a/b/dest."""
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "kept").write_text("x")
    for dest in (tmp_path / "new" / "deeper" / "dest", tmp_path / "a" / "b" / "dest"):
        with pytest.raises(RuntimeError):
            with staged_directory(str(dest), prefix=".t-"):
                raise RuntimeError("boom")
    assert sorted(os.listdir(tmp_path)) == ["a"] and sorted(os.listdir(tmp_path / "a")) == ["kept"]
    with staged_directory(str(tmp_path / "new" / "dest"), prefix=".t-") as (_work, out):
        open(os.path.join(out, "f"), "w").write("ok")
    assert sorted(os.listdir(tmp_path / "new")) == ["dest"]


def test_sigterm_removes_scratch_and_keeps_destination(tmp_path):
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "old").write_text("old")
    script = textwrap.dedent(f"""
        import os, signal
        from distill_plugins.staged_directory import staged_directory
        with staged_directory({str(dest)!r}, prefix=".t-") as (_work, out):
            open(os.path.join(out, "half"), "w").write("x")
            os.kill(os.getpid(), signal.SIGTERM)
            import time; time.sleep(30)
        print("not reached")
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    assert "not reached" not in proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "SIGTERM" in lines[0] and str(dest) in lines[0], proc.stderr
    assert sorted(os.listdir(tmp_path)) == ["out"]
    assert sorted(os.listdir(dest)) == ["old"]


def test_the_previous_sigterm_handler_is_restored(tmp_path):
    def mine(signum, frame):
        pass

    before = signal.signal(signal.SIGTERM, mine)
    try:
        with staged_directory(str(tmp_path / "out"), prefix=".t-"):
            assert signal.getsignal(signal.SIGTERM) is not mine  # unwinds the stack while staging
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, before)


def test_scratch_of_a_killed_process_is_removed_by_the_next_run(tmp_path):
    host = socket.gethostname()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = tmp_path / f".t-{host}-{dead.pid}-abc"
    live = tmp_path / f".t-{host}-{os.getppid()}-abc"  # a running process: kept
    other = tmp_path / f".t-otherhost-{dead.pid}-abc"  # another host's pids are not ours to judge
    for d in (orphan, live, other):
        (d / "out").mkdir(parents=True)
    with staged_directory(str(tmp_path / "out"), prefix=".t-") as (work, _out):
        assert os.path.basename(work).startswith(f".t-{host}-{os.getpid()}-")
    assert sorted(os.listdir(tmp_path)) == sorted(["out", live.name, other.name])
