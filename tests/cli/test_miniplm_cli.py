"""distill-miniplm end to end: prepare_lm -> a reference LM by fairseq-train --task language_modeling ->
difference sampling -> fairseq-train --task language_modeling on the refined corpus; bad input."""
import json
import os

import pytest
import torch

from conftest import USER_DIR, cli, run

LM_TRAIN = ["--user-dir", USER_DIR, "--task", "language_modeling", "--cpu", "--optimizer", "adam", "--lr", "3e-3",
            "--max-tokens", "1024", "--tokens-per-sample", "64", "--required-batch-size-multiple", "1",
            "--log-format", "simple", "--log-interval", "1", "--no-epoch-checkpoints", "--seed", "1",
            "--num-workers", "0", "--arch", "kd_gpt2_tiny", "--decoder-layers", "1", "--decoder-embed-dim", "32",
            "--decoder-ffn-embed-dim", "64", "--decoder-attention-heads", "2", "--criterion", "cross_entropy"]


@pytest.fixture(scope="module")
def corpus(data_bin, tiny_jsonl, tmp_path_factory):
    """The training rows as a plain-text corpus (train + valid), binarized, and a reference LM
    trained briefly on it by fairseq's own language_modeling task."""
    from distill_plugins.cli import prepare_lm

    d = tmp_path_factory.mktemp("miniplm")
    texts = {}
    for split in ("train", "valid"):
        rows = [json.loads(line) for line in open(tiny_jsonl[split])]
        texts[split] = d / f"{split}.txt"
        texts[split].write_text("\n".join(f"{r['instruction']} {r['input']} {r['output']}" for r in rows) + "\n")
    prepare_lm.main(["--data", data_bin, "--train", str(texts["train"]), "--valid", str(texts["valid"]),
                     "--destdir", str(d / "bin")])
    run([cli("fairseq-train"), d / "bin", *LM_TRAIN, "--max-update", "3", "--save-dir", d / "reference"])
    return {"dir": str(d / "bin"), "text": str(texts["train"]), "reference": str(d / "reference" / "checkpoint_last.pt")}


def read_tsv(path):
    lines = open(path).read().splitlines()
    header = lines[0].split("\t")
    return [dict(zip(header, line.split("\t"))) for line in lines[1:]]


def documents(prefix, dictionary):
    from fairseq.data import data_utils

    ds = data_utils.load_indexed_dataset(prefix, dictionary)
    return [ds[i].tolist() for i in range(len(ds))]


def test_refines_the_corpus_and_fairseq_trains_on_it(data_bin, teacher_ckpt, corpus, tmp_path):
    from fairseq.data import Dictionary

    from distill_plugins.tasks.instruction_distillation import InstructionDistillationConfig, InstructionDistillationTask
    from distill_plugins.teacher import Teacher

    out = tmp_path / "refined"
    proc = run([cli("distill-miniplm"), "--data", data_bin, "--corpus", corpus["dir"], "--teacher", teacher_ckpt,
                "--reference", corpus["reference"], "--destdir", out, "--keep-fraction", "0.3",
                "--text", corpus["text"], "--max-tokens", "512"])
    assert "scored in windows of 64 tokens" in proc.stdout  # the reference LM was trained on 64 (the teacher on 512)
    assert "kept 72 documents" in proc.stdout
    rows = read_tsv(out / "scores.tsv")
    dictionary = Dictionary.load(os.path.join(corpus["dir"], "dict.txt"))
    original = documents(os.path.join(corpus["dir"], "train"), dictionary)
    assert len(rows) == len(original) == 240
    # every score is the per-token log-likelihood difference of its row; the kept rows are the top 30%
    for r in rows:
        want = (float(r["teacher_logprob"]) - float(r["reference_logprob"])) / int(r["tokens"])
        assert float(r["score"]) == pytest.approx(want, rel=1e-5, abs=1e-6)
        assert int(r["tokens"]) == len(original[int(r["index"])]) - 1  # the first token is not scored
    ranked = sorted(range(len(rows)), key=lambda i: (-float(rows[i]["score"]), i))
    kept = sorted(ranked[:72])
    assert [i for i, r in enumerate(rows) if r["kept"] == "1"] == kept
    # the refined split holds exactly those documents, in corpus order; the text too; valid is unchanged
    assert documents(str(out / "train"), dictionary) == [original[i] for i in kept]
    lines = [line.strip() for line in open(corpus["text"]) if line.strip()]
    assert (out / "train.txt").read_text().splitlines() == [lines[i] for i in kept]
    for f in ("valid.bin", "valid.idx", "dict.txt"):
        assert (out / f).read_bytes() == open(os.path.join(corpus["dir"], f), "rb").read()
    record = json.loads((out / "miniplm.json").read_text())
    assert record["kept_documents"] == 72 and record["documents"] == 240 and record["score"] == "difference"
    # the teacher's log-likelihoods equal an independent float64 forward of each whole document
    task = InstructionDistillationTask.setup_task(InstructionDistillationConfig(data=data_bin))
    model = Teacher.load(teacher_ckpt, task).model.double()
    for i in (0, 7, 131, 239):
        full = torch.tensor([[dictionary.eos()] + original[i]])
        picked = torch.log_softmax(model(full[:, :-1])[0][0].double(), -1).gather(-1, full[0, 1:, None])
        logp = picked[1:].sum()  # from the second token on (MiniPLM's shifted labels)
        assert float(rows[i]["teacher_logprob"]) == pytest.approx(logp.item(), abs=1e-3)
    # fairseq's own language_modeling task trains on the refined corpus
    proc = run([cli("fairseq-train"), out, *LM_TRAIN, "--max-update", "2", "--no-save"])
    assert "loaded 72 examples" in proc.stdout + proc.stderr and "valid on 'valid' subset" in proc.stdout + proc.stderr


def test_ratio_score_keeps_the_highest_ratio(data_bin, teacher_ckpt, corpus, tmp_path, monkeypatch):
    from distill_plugins.cli import miniplm

    args = ["--data", data_bin, "--corpus", corpus["dir"], "--teacher", teacher_ckpt, "--reference",
            corpus["reference"], "--score", "ratio", "--window", "16"]
    miniplm.main([*args, "--destdir", str(tmp_path / "ratio")])
    rows = read_tsv(tmp_path / "ratio" / "scores.tsv")
    monkeypatch.setattr(miniplm, "BLOCK_DOCUMENTS", 7)  # the corpus read and scored 7 documents at a time
    miniplm.main([*args, "--destdir", str(tmp_path / "blocks"), "--max-tokens", "100"])
    for a, b in zip(rows, read_tsv(tmp_path / "blocks" / "scores.tsv"), strict=True):
        assert a["kept"] == b["kept"] and float(a["score"]) == pytest.approx(float(b["score"]), rel=1e-5)
        for key in ("teacher_logprob", "reference_logprob"):
            assert float(a[key]) == pytest.approx(float(b[key]), abs=1e-4)
    out = tmp_path / "ratio"
    ratio = [float(r["teacher_logprob"]) / float(r["reference_logprob"]) for r in rows]
    for r, want in zip(rows, ratio):
        assert float(r["score"]) == pytest.approx(want, rel=1e-5)
    ranked = sorted(range(len(rows)), key=lambda i: (-float(rows[i]["score"]), i))
    assert [i for i, r in enumerate(rows) if r["kept"] == "1"] == sorted(ranked[:120])
    assert json.loads((out / "miniplm.json").read_text())["window"] == 16


def test_bad_input_is_one_line_and_writes_nothing(data_bin, teacher_ckpt, corpus, tmp_path):
    from distill_plugins.cli import miniplm
    from distill_plugins.errors import DistillError

    out = tmp_path / "out"
    base = ["--data", data_bin, "--corpus", corpus["dir"], "--teacher", teacher_ckpt,
            "--reference", corpus["reference"], "--destdir", str(out)]
    other_dict = tmp_path / "other"
    other_dict.mkdir()
    for f in ("train.bin", "train.idx"):
        (other_dict / f).write_bytes(open(os.path.join(corpus["dir"], f), "rb").read())
    (other_dict / "dict.txt").write_text("alpha 5\nbeta 3\n")
    short_text = tmp_path / "short.txt"
    short_text.write_text("one document\n\nanother\n")
    cases = [
        (["--keep-fraction", "0"], "--keep-fraction must be in (0, 1]"),
        (["--keep-fraction", "1.5"], "--keep-fraction must be in (0, 1]"),
        (["--keep-fraction", "0.001"], "keeps no document of 240"),
        (["--reference", str(tmp_path / "missing.pt")], "--reference"),
        (["--corpus", data_bin], "has no train.bin"),
        (["--corpus", str(other_dict)], "differs from --data's dictionary"),
        (["--text", str(short_text)], "has 2 non-empty lines but the corpus split has 240"),
        (["--window", "1024", "--max-tokens", "512"], "--max-tokens 512 is below the window"),
        (["--window", "-1"], "--window must be >= 1"),
        (["--reference", data_bin + "/dict.src.txt"], "reference checkpoint"),
    ]
    for extra, message in cases:
        with pytest.raises(DistillError) as e:
            miniplm.main(base + extra)
        assert message in str(e.value) and "\n" not in str(e.value), (extra, str(e.value))
        assert not out.exists(), extra
        assert not [p for p in os.listdir(tmp_path) if p.startswith(".miniplm-")], extra
    out.mkdir()
    proc = run([cli("distill-miniplm"), *base], check=False)  # the real CLI: exit 1, one line, no traceback
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("fairseq-distill: error:") and "Traceback" not in proc.stderr
    assert "already exists; pass --overwrite" in proc.stderr


def test_two_workers_write_what_one_process_writes(data_bin, teacher_ckpt, corpus, tmp_path):
    """torchrun, 2 gloo workers on CPU: each scores its own blocks; worker 0 writes the same output."""
    args = ["--data", data_bin, "--corpus", corpus["dir"], "--teacher", teacher_ckpt,
            "--reference", corpus["reference"], "--text", corpus["text"]]
    run([cli("distill-miniplm"), *args, "--destdir", tmp_path / "one"])
    proc = run([cli("torchrun"), "--standalone", "--nproc-per-node", "2", "-m", "distill_plugins.cli.miniplm", *args,
                "--destdir", tmp_path / "two"])
    assert "by 2 workers" in proc.stdout and proc.stdout.count("| kept ") == 1  # worker 0 reports and writes
    one, two = read_tsv(tmp_path / "one" / "scores.tsv"), read_tsv(tmp_path / "two" / "scores.tsv")
    for a, b in zip(one, two, strict=True):
        assert a["kept"] == b["kept"] and a["tokens"] == b["tokens"]
        for key in ("teacher_logprob", "reference_logprob"):
            assert float(a[key]) == pytest.approx(float(b[key]), abs=1e-4)
    for f in ("train.bin", "train.idx", "train.txt", "valid.bin"):
        assert (tmp_path / "one" / f).read_bytes() == (tmp_path / "two" / f).read_bytes(), f
    assert json.loads((tmp_path / "two" / "miniplm.json").read_text())["workers"] == 2


def test_blocks_are_split_over_the_workers():
    from distill_plugins.cli import miniplm

    for n, world in ((240, 2), (10, 3), (1, 2), (100_000, 4)):
        blocks = [miniplm.worker_blocks(n, r, world) for r in range(world)]
        covered = sorted(i for bs in blocks for s, e in bs for i in range(s, e))
        assert covered == list(range(n))  # every document exactly once
        if n >= world:
            assert all(blocks)  # every worker has work
