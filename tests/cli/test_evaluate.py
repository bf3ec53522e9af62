"""distill-evaluate and distill-compare on the tiny teacher: the MiniLLM/DistiLLM protocol end to end.

The Rouge-L in the report is recomputed here with rouge-score directly from the written responses
(single and multiple references); seeds reproduce and differ; long prompts are cut and counted;
bad input ends with a one-line error and writes nothing.
"""
import json
import os
import shutil

import numpy as np
import pytest
from rouge_score import rouge_scorer

from conftest import cli, make_rows, run, write_jsonl
from distill_plugins.cli import compare, evaluate, score
from distill_plugins.data.instruction_jsonl import render_prompt
from distill_plugins.data.tokenizers import load_tokenizer

MAX_PROMPT = 128
SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


def direct_rouge(pred, refs):
    return max(100 * SCORER.score(r, pred)["rougeL"].fmeasure for r in refs)


def read_jsonl(path):
    return [json.loads(line) for line in open(path)]


@pytest.fixture(scope="module")
def eval_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("evalsets")
    single = make_rows(12, 7)
    multi = [dict(r, output=[r["output"], "zebra water", r["instruction"]]) for r in make_rows(10, 8)]
    long_rows = make_rows(6, 9)
    long_rows[2]["input"] = " ".join(["river"] * 300)  # far over the prompt limit
    return {"single": write_jsonl(d / "single.jsonl", single), "multi": write_jsonl(d / "multi.jsonl", multi),
            "long": write_jsonl(d / "long.jsonl", long_rows)}


@pytest.fixture(scope="module")
def evaluated(teacher_ckpt, data_bin, eval_files, tmp_path_factory):
    """One real CLI run with the paper defaults except two seeds and shorter lengths (CPU time)."""
    out = tmp_path_factory.mktemp("evaluated")
    proc = run([cli("distill-evaluate"), teacher_ckpt, "--data", data_bin, "--eval-files", *eval_files.values(),
                "--seeds", "10", "20", "--cpu", "--batch-size", "4", "--json", out / "teacher.json",
                "--max-prompt-tokens", str(MAX_PROMPT), "--max-length", "192",
                "--responses", out / "responses.jsonl", "--name", "teacher"])
    return {"dir": out, "proc": proc, "result": json.load(open(out / "teacher.json")),
            "responses": read_jsonl(out / "responses.jsonl")}


def test_report_equals_rouge_score_on_the_responses(evaluated, eval_files):
    run_ = evaluated["result"]["runs"][0]
    assert [f["name"] for f in run_["files"]] == ["single", "multi", "long"]
    for f in run_["files"]:
        rows = read_jsonl(eval_files[f["name"]])
        refs = [r["output"] if isinstance(r["output"], list) else [r["output"]] for r in rows]
        per_seed = []
        for seed in (10, 20):
            resp = {r["id"]: r["response"] for r in evaluated["responses"]
                    if r["eval_set"] == f["name"] and r["seed"] == seed}
            assert sorted(resp) == list(range(len(rows)))  # every prompt answered, none dropped
            want = float(np.mean([direct_rouge(resp[i], refs[i]) for i in range(len(rows))]))
            assert f["per_seed"][str(seed)] == pytest.approx(want, abs=1e-9)
            per_seed.append(want)
        assert f["rouge_l"] == pytest.approx(np.mean(per_seed)) and f["rouge_l_std"] == pytest.approx(np.std(per_seed))
        assert f["examples"] == len(rows) and f["seeds"] == 2
        assert f["responses_per_s"] > 0 and f["tokens_per_s"] > 0 and f["generated_tokens"] >= 2 * len(rows)
    # the multi-reference set really takes the max: a response equal to a 2nd reference scores 100
    assert direct_rouge("zebra water", ["something else", "zebra water"]) == 100.0


def test_protocol_defaults_progress_and_markdown(evaluated):
    defaults = evaluate.get_parser().parse_args(["ckpt.pt", "--data", "d"])
    assert (defaults.top_k, defaults.top_p, defaults.temperature, defaults.no_repeat_ngram_size) == (0, 1.0, 1.0, 6)
    assert (defaults.max_prompt_tokens, defaults.max_length, defaults.seeds) == (256, 512, [10, 20, 30, 40, 50])
    protocol = evaluated["result"]["protocol"]  # the settings used are recorded
    assert protocol["top_k"] == 0 and protocol["top_p"] == 1.0 and protocol["temperature"] == 1.0
    assert protocol["no_repeat_ngram_size"] == 6 and protocol["max_length"] == 192
    assert protocol["max_prompt_tokens"] == MAX_PROMPT and protocol["seeds"] == [10, 20]
    assert "100%" in evaluated["proc"].stderr  # the progress bar ran to the end
    md = (evaluated["dir"] / "teacher.md").read_text()  # default: next to --json
    assert "| teacher |" in md and "responses/s" in md
    assert md in evaluated["proc"].stdout


def test_long_prompts_are_cut_and_counted(evaluated, eval_files, data_bin):
    tok = load_tokenizer(data_bin)
    files = {f["name"]: f for f in evaluated["result"]["runs"][0]["files"]}
    for name, path in eval_files.items():
        longer = sum(len(tok.encode(render_prompt(r))) > MAX_PROMPT for r in read_jsonl(path))
        assert files[name]["prompts_truncated"] == longer
    assert files["long"]["prompts_truncated"] == 1
    assert f"long: 1 of 6 prompts cut to their first {MAX_PROMPT} tokens" in evaluated["proc"].stderr


def test_same_seed_same_outputs_different_seeds_differ(evaluated, teacher_ckpt, data_bin, eval_files, tmp_path):
    again = tmp_path / "again.jsonl"
    run([cli("distill-evaluate"), teacher_ckpt, "--data", data_bin, "--eval-files", eval_files["single"],
         "--seeds", "10", "--cpu", "--batch-size", "4", "--no-progress", "--responses", again,
         "--max-prompt-tokens", str(MAX_PROMPT), "--max-length", "192"])
    first = {r["id"]: r["tokens"] for r in evaluated["responses"] if r["eval_set"] == "single" and r["seed"] == 10}
    other = {r["id"]: r["tokens"] for r in evaluated["responses"] if r["eval_set"] == "single" and r["seed"] == 20}
    assert {r["id"]: r["tokens"] for r in read_jsonl(again)} == first
    assert sum(first[i] != other[i] for i in first) >= len(first) // 2


def test_scores_generation_files_like_distill_score(data_bin, tmp_path):
    """An existing fairseq-generate output (H- lines) is scored, one file per seed."""
    rows = read_jsonl(os.path.join(data_bin, "test.jsonl"))
    tok = load_tokenizer(data_bin)
    files, want = [], []
    for k, picks in enumerate((["▁dog", "▁apple"], ["▁sun"])):
        path = tmp_path / f"gen{k}.txt"
        with open(path, "w") as f:
            for i in range(len(rows)):
                f.write(f"S-{i}\tprompt\nH-{i}\t-1.0\t{' '.join(picks)}\nD-{i}\t-1.0\tx\n")
        text = tok.decode(picks)
        want.append(np.mean([direct_rouge(text, [r["output"]]) for r in rows]))
        files.append(str(path))
    evaluate.main(files + ["--data", data_bin, "--json", str(tmp_path / "g.json")])
    score.main([data_bin, *files, "--json", str(tmp_path / "s.json")])
    got, ref = json.load(open(tmp_path / "g.json")), json.load(open(tmp_path / "s.json"))
    f = got["runs"][0]["files"][0]
    assert f["rouge_l"] == pytest.approx(np.mean(want)) and f["rouge_l_std"] == pytest.approx(np.std(want))
    assert f["rouge_l"] == pytest.approx(ref["rouge_l"]) and f["examples"] == len(rows)


def test_directory_of_checkpoints_names_the_best(teacher_ckpt, data_bin, eval_files, tmp_path):
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    shutil.copy(teacher_ckpt, ckpts / "checkpoint_2_20.pt")
    shutil.copy(teacher_ckpt, ckpts / "checkpoint_1_10.pt")
    evaluate.main([str(ckpts), "--data", data_bin, "--eval-files", eval_files["single"], "--seeds", "10",
                   "--max-prompt-tokens", "100", "--max-length", "128", "--cpu", "--no-progress",
                   "--json", str(tmp_path / "d.json")])
    result = json.load(open(tmp_path / "d.json"))
    assert [r["name"] for r in result["runs"]] == ["checkpoint_1_10", "checkpoint_2_20"]  # natural order
    scores = [r["files"][0]["rouge_l"] for r in result["runs"]]
    assert scores[0] == scores[1]  # same weights, same seed: same samples
    assert result["best"]["single"] in ("checkpoint_1_10", "checkpoint_2_20")


def one_line_error(excinfo, *words):
    msg = str(excinfo.value)
    assert "\n" not in msg and "Traceback" not in msg
    for w in words:
        assert w in msg, msg


def bad_rows(kind, tmp_path):
    if kind == "missing output":
        return write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "c"}])
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    return str(path)


@pytest.mark.parametrize("kind,words", [("missing output", ["bad.jsonl:2", "'output'"]),
                                        ("empty", ["empty.jsonl", "no examples"])])
def test_bad_eval_files_fail_before_any_output(kind, words, teacher_ckpt, data_bin, eval_files, tmp_path):
    bad = bad_rows(kind, tmp_path)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        evaluate.main([teacher_ckpt, "--data", data_bin, "--eval-files", eval_files["single"], bad,
                       "--json", str(out / "r.json"), "--responses", str(out / "resp.jsonl"), "--cpu"])
    one_line_error(e, *words)
    assert not out.exists()


def test_missing_checkpoint_is_a_one_line_error(data_bin, tmp_path):
    proc = run([cli("distill-evaluate"), tmp_path / "nope.pt", "--data", data_bin, "--json", tmp_path / "r.json"],
               check=False)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr and "nope.pt does not exist" in lines[-1]
    assert os.listdir(tmp_path) == []


def test_compare_table_and_bar_chart(evaluated, tmp_path):
    # a second "run": the same result relabeled, and a distill-score result
    score_json = tmp_path / "score.json"
    score_json.write_text(json.dumps({"name": None, "split": "single", "examples": 12, "seeds": 5,
                                      "rouge_l": 30.0, "rouge_l_std": 1.5}))
    t = evaluated["dir"] / "teacher.json"
    md, png = tmp_path / "cmp.md", tmp_path / "cmp.png"
    compare.main([str(t), str(t), str(score_json), "--names", "SFT", "KD", "SKL", "--md", str(md), "--png", str(png)])
    table = md.read_text().splitlines()
    assert table[0] == "| run | single | multi | long |"
    assert [line.split("|")[1].strip() for line in table[2:]] == ["SFT", "KD", "SKL"]
    assert "**30.00 ± 1.50**" in table[4] and table[4].endswith("| - | - |")  # best in bold; missing sets
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    with pytest.raises(SystemExit) as e:
        compare.main([str(t), str(score_json), "--names", "only-one", "--md", str(tmp_path / "x.md")])
    one_line_error(e, "--names")
    assert not (tmp_path / "x.md").exists()
