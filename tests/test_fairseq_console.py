"""fairseq CLIs print fairseq-formatted logs without its dependencies' deprecation notices
(distill_plugins/fairseq_console.py), through the real fairseq-generate, and only those notices go."""
import logging
import sys
import warnings

from conftest import USER_DIR, cli, run

from distill_plugins import fairseq_console


def test_fairseq_generate_logs_in_fairseqs_format_without_dependency_notices(data_bin, teacher_ckpt, tmp_path):
    proc = run([cli("fairseq-generate"), data_bin, "--user-dir", USER_DIR, "--task", "instruction_distillation",
                "--path", teacher_ckpt, "--gen-subset", "test", "--beam", "1", "--max-len-b", "40",
                "--batch-size", "16", "--cpu"])
    err = proc.stderr
    assert " | INFO | fairseq_cli.generate | " in err  # fairseq's format, not "INFO:fairseq_cli.generate:"
    assert "DEBUG" not in err and "hydra" not in err and "pin_memory" not in err
    # every prompt (~80 tokens) fills --max-len-b 40: one warning names the cause and the protocol's value
    assert err.count("their responses are empty: --max-len-b 40 is the total length") == 1


def test_only_the_listed_notices_are_filtered(monkeypatch):
    monkeypatch.delenv("PYTHONWARNINGS", raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert fairseq_console.silence_dependency_notices()
        warnings.warn("hydra.experimental.initialize() is no longer experimental. Use hydra.initialize()")
        warnings.warn("\nThe version_base parameter is not specified.")
        warnings.warn("`torch.cuda.amp.autocast(args...)` is deprecated.", FutureWarning)
        warnings.warn("some other notice")
        warnings.warn("`torch.cuda.amp.autocast(args...)` is deprecated.", UserWarning)  # other category
    assert [str(w.message) for w in caught] == ["some other notice", "`torch.cuda.amp.autocast(args...)` is deprecated."]


def test_users_own_warning_filters_are_left_alone(monkeypatch):
    monkeypatch.setenv("PYTHONWARNINGS", "default")
    with warnings.catch_warnings():
        before = list(warnings.filters)
        assert not fairseq_console.silence_dependency_notices()
        assert warnings.filters == before


def test_log_format_is_restored_only_for_the_wav2vec_basic_config(monkeypatch):
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    monkeypatch.setitem(sys.modules, "fairseq.models.wav2vec.wav2vec2_classification", object())
    monkeypatch.delenv("LOGLEVEL", raising=False)
    try:
        root.handlers[:] = []
        logging.basicConfig(level=logging.DEBUG)  # what that module does at import
        assert fairseq_console.restore_log_format()
        assert root.level == logging.INFO and root.handlers[0].formatter._fmt == fairseq_console.FAIRSEQ_LOG_FORMAT
        root.handlers[:] = []
        logging.basicConfig(level=logging.DEBUG, format="%(message)s")  # someone's own configuration
        assert not fairseq_console.restore_log_format() and root.level == logging.DEBUG
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
