"""--device of distill-seqkd, distill-cache-teacher and distill-miniplm (distill_plugins/devices.py): a name
torch does not know, CUDA that is not there or a GPU index past the visible ones end in one line, before
any work and with no output written."""
import pytest
import torch

from conftest import cli, run
from test_bad_input import assert_one_line_error
from distill_plugins.devices import resolve_device
from distill_plugins.errors import DistillError


def refused(spec, flag="--device"):
    with pytest.raises(DistillError) as e:
        resolve_device(spec, flag)
    assert "\n" not in str(e.value) and f"{flag} {spec}" in str(e.value)
    return str(e.value)


def test_resolve_device(monkeypatch):
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    for spec in ("gpu", "mps", "meta", "cuda:x", "cuda:-1", ""):
        assert "use auto, cpu, cuda or cuda:N" in refused(spec)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert "use --teacher-device cpu (or auto)" in refused("cuda:0", "--teacher-device")
    assert "use --device cpu" in refused("cuda")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert "only 2 CUDA devices visible (cuda:0 to cuda:1)" in refused("cuda:2")


@pytest.fixture(scope="module")
def commands(data_bin, teacher_ckpt, plain_lm_data):
    """Each CLI with valid inputs but for --device; OUT is replaced by the output path."""
    common = ["--data", data_bin, "--teacher", teacher_ckpt]
    return {
        "distill-seqkd": [*common, "--destdir", "OUT"],
        "distill-cache-teacher": [*common, "--out", "OUT"],
        "distill-miniplm": [*common, "--corpus", plain_lm_data, "--reference", teacher_ckpt, "--destdir", "OUT"],
    }


# cuda:99: no CUDA here (the message says so), or past the GPUs of a CUDA machine
@pytest.mark.parametrize("spec, needle", [("gpu", "use auto, cpu, cuda or cuda:N"), ("cuda:99", "--device cuda:99: "),
                                          ("cuda", "--device cpu (or auto)")])
@pytest.mark.parametrize("tool", ["distill-seqkd", "distill-cache-teacher", "distill-miniplm"])
def test_bad_device_is_one_line(tool, spec, needle, commands, tmp_path):
    if spec == "cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is there: --device cuda is valid")
    out = tmp_path / "out"
    argv = [str(out) if a == "OUT" else a for a in commands[tool]]
    proc = run([cli(tool), *argv, "--device", spec], check=False)
    assert_one_line_error(proc, f"--device {spec}", needle)
    assert not out.exists() and not list(tmp_path.iterdir())
