"""distill-miniplm with Hugging Face teacher and reference directories: the log-likelihoods it writes
equal transformers' own float64 forward."""
import json
import os

import pytest

pytest.importorskip("transformers", reason="needs the hf extra (transformers)")

import torch  # noqa: E402

import hf_fixtures as F  # noqa: E402


def test_hf_teacher_and_reference_score_like_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    from distill_plugins.cli import miniplm, prepare_lm
    from distill_plugins.tasks.instruction_distillation import InstructionDistillationConfig, InstructionDistillationTask
    from distill_plugins.teacher import Teacher

    data = F.prepared("gpt2")
    rows = [json.loads(line) for line in open(F.jsonl_files()["train"])]
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(f"{r['instruction']} {r['input']} {r['output']}" for r in rows) + "\n")
    prepare_lm.main(["--data", data, "--train", str(text), "--destdir", str(tmp_path / "corpus")])
    teacher, reference = F.hf_dir("gpt2"), F.hf_dir("gpt2", small=True, seed=1)
    out = tmp_path / "refined"
    miniplm.main(["--data", data, "--corpus", str(tmp_path / "corpus"), "--teacher", teacher,
                  "--reference", reference, "--destdir", str(out), "--keep-fraction", "0.25"])
    lines = (out / "scores.tsv").read_text().splitlines()[1:]
    assert len(lines) == len(rows) and sum(line.endswith("\t1") for line in lines) == len(rows) // 4

    from fairseq.data import data_utils

    task = InstructionDistillationTask.setup_task(InstructionDistillationConfig(data=data))
    vocab = Teacher.load(teacher, task).model.hf_vocab
    docs = data_utils.load_indexed_dataset(str(tmp_path / "corpus" / "train"), task.dictionary)
    f2h = torch.tensor(vocab.fairseq_to_hf)
    for column, path in ((2, teacher), (3, reference)):
        hf = AutoModelForCausalLM.from_pretrained(path).eval().double()
        for i in (0, 5, len(rows) - 1):
            ids = f2h[docs[i].long()]
            assert (ids >= 0).all()
            with torch.no_grad():
                logp = torch.log_softmax(hf(input_ids=ids[None, :-1]).logits[0, :, :vocab.size], -1)
            # the first token is not scored (an HF model, with no BOS, could only give it log(1/V))
            want = logp.gather(-1, ids[1:, None]).sum().item()
            assert float(lines[i].split("\t")[column]) == pytest.approx(want, abs=1e-3), (path, i)
    assert os.path.isfile(out / "train.bin")
