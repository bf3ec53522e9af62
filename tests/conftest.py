"""Shared fixtures: tiny instruction data, prepared data-bin and a tiny teacher, built once per test run
for both pytest workers through the real CLIs (distill-prepare -> fairseq-preprocess, fairseq-train)."""
import json
import os
import random
import shutil
import subprocess
import sys

import pytest

# Without a GPU, the Triton loss kernel runs in Triton's interpreter (tests/gpu/test_triton_kd.py); the
# flag is read when the kernel is defined, so it is set before anything imports distill_plugins.
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
USER_DIR = os.path.join(REPO, "distill_plugins")
BIN = os.path.dirname(sys.executable)

# The smallest model that still exercises every code path (1 layer, 32 dims).
TINY_MODEL = [
    "--arch", "kd_gpt2_tiny", "--decoder-layers", "1", "--decoder-embed-dim", "32",
    "--decoder-ffn-embed-dim", "64", "--decoder-attention-heads", "2",
]
TRAIN_COMMON = [
    "--user-dir", USER_DIR, "--task", "instruction_distillation", "--cpu",
    "--optimizer", "adam", "--lr", "3e-3", "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "5",
    "--max-tokens", "1024", "--log-format", "simple", "--log-interval", "1",
    "--no-epoch-checkpoints", "--seed", "1", "--num-workers", "0",
]

WORDS = ("apple banana cherry dog eagle fish grape house island jungle kite lemon mango night ocean "
         "pear queen river sun tree umbrella violet water yellow zebra").split()


def cli(name):
    """Path of a console script installed next to this Python (fairseq-train, distill-prepare...)."""
    return os.path.join(BIN, name)


def run(cmd, check=True, timeout=600, env=None, **kw):
    """Run a CLI; on an unexpected exit code fail with the tail of its output."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **(env or {}))
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, env=full_env, **kw)
    if check and proc.returncode != 0:
        pytest.fail(f"{cmd[0]} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def make_rows(n, seed):
    """Learnable toy instructions: repeat / reverse a few words; some with an input, one empty output."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = rng.sample(WORDS, rng.randint(2, 5))
        if i % 3 == 0:
            rows.append({"instruction": "Reverse the words.", "input": " ".join(words),
                         "output": " ".join(reversed(words))})
        else:
            rows.append({"instruction": "Repeat: " + " ".join(words), "input": "", "output": " ".join(words)})
    rows[0]["output"] = ""  # an empty response: trains EOS only
    return rows


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def built_once(tmp_path_factory, name, build):
    """The directory ``name``, made by ``build(path)`` once per test run and shared by the xdist
    workers (the first to take the lock builds it; the others wait and reuse it). Session fixtures
    built this way are read-only for the tests."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's directory, above each worker's own
    path = root / "shared" / name
    path.parent.mkdir(exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if not (path / ".built").exists():
            shutil.rmtree(path, ignore_errors=True)  # a build that failed on another worker
            path.mkdir()
            build(path)
            (path / ".built").touch()
    return path


@pytest.fixture(scope="session")
def tiny_jsonl(tmp_path_factory):
    def build(d):
        write_jsonl(d / "train.jsonl", make_rows(240, 0))
        write_jsonl(d / "valid.jsonl", make_rows(24, 1))
        write_jsonl(d / "test.jsonl", make_rows(16, 2))

    d = built_once(tmp_path_factory, "jsonl", build)
    return {split: str(d / f"{split}.jsonl") for split in ("train", "valid", "test")}


@pytest.fixture(scope="session")
def data_bin(tiny_jsonl, tmp_path_factory):
    def build(d):
        run([cli("distill-prepare"), "--train", tiny_jsonl["train"], "--valid", tiny_jsonl["valid"],
             "--test", tiny_jsonl["test"], "--destdir", d / "bin", "--vocab-size", "400"])

    return str(built_once(tmp_path_factory, "data", build) / "bin")


def train(data, save_dir, *extra, max_update=10, check=True, env=None):
    """fairseq-train on the tiny data; returns the CompletedProcess."""
    return run([cli("fairseq-train"), data, *TRAIN_COMMON, *TINY_MODEL, "--save-dir", save_dir,
                "--max-update", str(max_update), *extra], check=check, env=env)


@pytest.fixture(scope="session")
def teacher_ckpt(data_bin, tmp_path_factory):
    """A tiny SFT teacher (a little wider than the students)."""
    def build(save):
        train(data_bin, save, "--criterion", "cross_entropy", "--decoder-embed-dim", "48", max_update=30)

    return str(built_once(tmp_path_factory, "teacher", build) / "checkpoint_best.pt")


@pytest.fixture(scope="session")
def plain_lm_data(data_bin, tiny_jsonl, tmp_path_factory):
    """A pre-training corpus for --lm-data: the training rows as plain text, binarized by prepare_lm."""
    from distill_plugins.cli import prepare_lm

    d = tmp_path_factory.mktemp("lm")
    corpus = d / "corpus.txt"
    rows = [json.loads(line) for line in open(tiny_jsonl["train"])]
    corpus.write_text("\n".join(f"{r['instruction']} {r['input']} {r['output']}" for r in rows) + "\n\n")
    prepare_lm.main(["--data", data_bin, "--train", str(corpus), "--destdir", str(d / "bin")])
    return str(d / "bin")


@pytest.fixture
def one_torch_thread():
    """In-process generation on one thread, as the CLI subprocesses run (OMP_NUM_THREADS=1)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_model(task, seed, **overrides):
    """An in-memory kd_gpt2_tiny (1 layer, 16 dims, no dropout) on ``task``'s dictionary;
    ``overrides``: other architecture arguments."""
    import argparse

    import torch
    from fairseq.models import ARCH_CONFIG_REGISTRY, ARCH_MODEL_REGISTRY

    import distill_plugins  # noqa: F401

    torch.manual_seed(seed)
    args = argparse.Namespace(**{**dict(arch="kd_gpt2_tiny", decoder_layers=1, decoder_embed_dim=16,
                                        decoder_ffn_embed_dim=32, decoder_attention_heads=2, dropout=0.0,
                                        attention_dropout=0.0), **overrides})
    ARCH_CONFIG_REGISTRY["kd_gpt2_tiny"](args)
    return ARCH_MODEL_REGISTRY["kd_gpt2_tiny"].build_model(args, task)


def in_memory_kd_task(tokens_per_sample, words=30):
    """A real instruction_distillation task on a ``words``-word dictionary, a student and a
    different (untrained) teacher, built in-process: (task, student)."""
    from fairseq.data import Dictionary

    from distill_plugins.tasks.instruction_distillation import InstructionDistillationConfig, InstructionDistillationTask
    from distill_plugins.teacher import Teacher

    d = Dictionary()
    for i in range(words):
        d.add_symbol(f"w{i}")
    task = InstructionDistillationTask(InstructionDistillationConfig(tokens_per_sample=tokens_per_sample), d)
    student = tiny_model(task, seed=1)
    task.teachers = [Teacher(tiny_model(task, seed=2), path="<in memory>", sha256="0" * 64)]
    return task, student


# pytest-xdist (--dist loadfile) hands whole files to the 2 workers in collection order; the files
# with the longest runs go first, so that no long file starts last while the other worker idles.
LONGEST_FIRST = [
    "takd/test_chain.py", "cli/test_bad_input.py", "distributed/test_data_parallel.py",
    "cli/test_train_generate_score.py", "takd/test_chain_pretrained.py", "hf/test_hf_training.py",
    "cli/test_teacher_cache_cli.py", "hf/test_hf_errors.py", "generated/test_student_data_cli.py",
    "hf/test_hf_data_parallel.py", "cli/test_kd_impl.py", "distributed/test_minillm_data_parallel.py",
    "distributed/test_teacher_precision.py", "generated/test_buffer_resume_cli.py",
    "minillm/test_minillm_resume.py", "benchmarks/test_benchmark_smoke.py", "cli/test_cross_tokenizer_cli.py",
]


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    here = os.path.dirname(os.path.abspath(__file__))

    def key(item):
        return rank.get(os.path.relpath(str(item.fspath), here).replace(os.sep, "/"), len(rank))

    items.sort(key=key)  # stable: the order inside a file and among the other files is kept
