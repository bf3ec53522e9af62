"""distill-train --help lists the chosen task's, criterion's and model's options (fairseq-train's
--help stops before adding them)."""
from conftest import cli, run


def test_help_lists_task_criterion_and_model_options(data_bin):
    proc = run([cli("distill-train"), data_bin, "--task", "instruction_distillation", "--criterion", "skew_kl",
                "--arch", "kd_gpt2_tiny", "--help"])
    for option in ("--teacher-path", "--tokens-per-sample", "--skew-alpha", "--kd-ratio", "--decoder-layers"):
        assert option in proc.stdout, option
    general = run([cli("distill-train"), "--help"])  # nothing chosen yet: fairseq's general help
    assert general.stdout.startswith("usage: distill-train") and "--teacher-path" not in general.stdout
