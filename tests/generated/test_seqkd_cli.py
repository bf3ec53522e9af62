"""distill-seqkd: the teacher's responses become a new data-bin with the same dictionary; a student trains on it."""
import json
import os


from conftest import cli, run, train
from distill_plugins.data.tokenizers import load_tokenizer
from distill_plugins.sampling import generate_responses
from distill_plugins.tasks.instruction_distillation import InstructionDistillationConfig, InstructionDistillationTask
from distill_plugins.teacher import Teacher


def test_seqkd_data_then_student(data_bin, teacher_ckpt, tmp_path):
    dest = tmp_path / "seqkd"
    # top-p 1e-9 keeps only the most likely token: greedy, so the rows can be checked one by one
    proc = run([cli("distill-seqkd"), "--data", data_bin, "--teacher", teacher_ckpt, "--destdir", dest,
                "--max-new-tokens", "6", "--top-p", "1e-9", "--batch-size", "64", "--device", "cpu"])
    assert "generated 240 responses" in proc.stdout
    assert open(dest / "dict.src.txt").read() == open(os.path.join(data_bin, "dict.src.txt")).read()
    rows = [json.loads(line) for line in open(dest / "train.jsonl")]
    src_rows = [json.loads(line) for line in open(os.path.join(data_bin, "train.jsonl"))]
    assert len(rows) == 240 and all(r["reference_output"] == s["output"] for r, s in zip(rows, src_rows))
    assert json.load(open(dest / "seqkd.json"))["top_p"] == 1e-9

    # each row holds the teacher's answer to *its own* prompt: regenerate a few rows one at a time
    task = InstructionDistillationTask.setup_task(InstructionDistillationConfig(data=data_bin, seed=1))
    teacher = Teacher.load(teacher_ckpt, task).model
    task.load_dataset("train")
    ds = task.dataset("train")
    tok = load_tokenizer(data_bin)
    for i in (0, 7, 100, 239):
        (resp,) = generate_responses(task, teacher, ds.collater([ds[i]]), sampling=False, max_len=1024)
        resp = resp[:6]
        resp = resp[:-1] if int(resp[-1]) == task.dictionary.eos() else resp
        assert rows[i]["output"] == tok.decode(task.dictionary.string(resp).split())

    proc = train(str(dest), tmp_path / "student", "--criterion", "kd", "--kd-ratio", "0.5",
                 "--teacher-path", teacher_ckpt, max_update=2)
    assert "num_updates=2" in proc.stdout + proc.stderr


def test_seqkd_bad_input(data_bin, teacher_ckpt, tmp_path):
    proc = run([cli("distill-seqkd"), "--data", data_bin, "--teacher", teacher_ckpt, "--destdir", tmp_path / "x",
                "--top-p", "0"], check=False)
    assert proc.returncode != 0 and "--top-p must be in (0, 1]" in proc.stderr and "Traceback" not in proc.stderr
    assert not os.path.exists(tmp_path / "x")
