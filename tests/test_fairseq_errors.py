"""fairseq_errors: which exceptions become one-line messages, and that others keep their traceback."""
import subprocess
import sys

from distill_plugins.fairseq_errors import explain


def test_known_failures_and_their_causes_are_explained():
    assert "distill-train" in explain(AttributeError("'NoneType' object has no attribute 'xla_device'"))
    mismatch = RuntimeError("Error(s) in loading state_dict for X:\n\tsize mismatch for decoder.embed_tokens.weight: "
                            "copying a param with shape [357, 32] from checkpoint, the shape in current model is [333, 32].")
    wrapped = Exception("Cannot load model parameters from checkpoint c.pt; please ensure that the architectures match.")
    wrapped.__cause__ = mismatch
    assert explain(wrapped).startswith("Cannot load model parameters from checkpoint c.pt: --save-dir holds")
    assert "size mismatch for decoder.embed_tokens.weight" in explain(mismatch)
    assert "\n" not in explain(mismatch)
    assert explain(ValueError("something else")) is None and explain(KeyError("xla_device")) is None


def test_the_hook_prints_one_line_for_known_failures_only():
    code = ("import distill_plugins.fairseq_errors as f; f.install(); import sys; "
            "raise (OSError('Model file not found: x.pt') if sys.argv[1] == 'known' else ValueError('a bug'))")
    known = subprocess.run([sys.executable, "-c", code, "known"], capture_output=True, text=True)
    assert known.returncode == 1 and known.stderr == "fairseq-distill: error: Model file not found: x.pt; check --path\n"
    bug = subprocess.run([sys.executable, "-c", code, "bug"], capture_output=True, text=True)
    assert bug.returncode == 1 and "Traceback" in bug.stderr and "ValueError: a bug" in bug.stderr
