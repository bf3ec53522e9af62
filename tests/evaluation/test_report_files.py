"""Result files are written whole (temporary file + rename) with the permissions a plain open() gives."""
import json
import os
import stat

import pytest

from distill_plugins.chain.manifest import write_json_atomic as write_manifest
from distill_plugins.evaluation.report_files import write_json_atomic


@pytest.mark.parametrize("write", [write_json_atomic, write_manifest], ids=["report", "manifest"])
def test_atomic_files_follow_the_umask(tmp_path, write):
    old = os.umask(0o022)
    try:
        path = tmp_path / "sub" / "result.json"
        write(str(path), {"rouge_l": 1.5})
        plain = tmp_path / "plain.json"
        plain.write_text("{}")
    finally:
        os.umask(old)
    assert json.loads(path.read_text()) == {"rouge_l": 1.5}
    assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode) == 0o644  # mkstemp gave 0600
    assert os.listdir(path.parent) == ["result.json"]  # no temporary file left


def test_failed_write_leaves_nothing(tmp_path):
    path = tmp_path / "result.json"
    with pytest.raises(TypeError):
        write_json_atomic(str(path), {"bad": object()})
    assert os.listdir(tmp_path) == []
