"""The protocol's response cap: the references left-pad every prompt to max_prompt_length (256) and
generate up to max_length (512) minus that width, so no response is longer than 256 tokens, however
short its prompt (MiniLLM data_utils/prompt_datasets.py, evaluate_main.py). distill-evaluate caps at
--max-length - --max-prompt-tokens, --eval-rouge at 256, fairseq-generate at --max-response-tokens
(256; 0: only the total --max-len-b), with the prefill generator and with fairseq's SequenceGenerator.
Before, a response could fill all that its prompt left of the 512 tokens."""
import pytest

from conftest import USER_DIR, cli, run, write_jsonl
from test_ngram_blocking import FAVOURITE, crafted_ckpt, evaluate_responses  # noqa: F401 (crafted_ckpt: a fixture)


def test_distill_evaluate_caps_responses(crafted_ckpt, data_bin, tmp_path):
    ckpt, _ = crafted_ckpt  # wants its favourite token forever
    eval_file = write_jsonl(tmp_path / "short.jsonl", [{"prompt": "river sun tree", "output": "x"}])
    for max_prompt, cap in (("16", 32), ("40", 8)):  # --max-length 48
        (r,) = evaluate_responses(ckpt, data_bin, eval_file, tmp_path, "--no-repeat-ngram-size", "0",
                                  "--max-prompt-tokens", max_prompt)
        assert r["tokens"] == [FAVOURITE] * cap  # was 48 - 3 = 45 both times


def generated_lengths(ckpt, data_bin, tmp_path, *extra):
    out = tmp_path / "gen"
    run([cli("fairseq-generate"), data_bin, "--user-dir", USER_DIR, "--task", "instruction_distillation",
         "--path", ckpt, "--gen-subset", "test", "--sampling", "--beam", "1", "--max-len-b", "160",
         "--batch-size", "4", "--seed", "10", "--cpu", "--results-path", out, *extra])
    lines = [line.split("\t") for line in (out / "generate-test.txt").read_text().splitlines() if line.startswith("H-")]
    assert len(lines) == 16
    return [len(fields[2].split()) for fields in lines]


@pytest.mark.parametrize("generator", [[], ["--no-prompt-prefill"]], ids=["prefill", "sequence_generator"])
def test_fairseq_generate_caps_responses(generator, crafted_ckpt, data_bin, tmp_path):
    ckpt, _ = crafted_ckpt
    assert set(generated_lengths(ckpt, data_bin, tmp_path, "--max-response-tokens", "5", *generator)) == {5}
    uncapped = generated_lengths(ckpt, data_bin, tmp_path, "--max-response-tokens", "0", *generator)
    assert min(uncapped) > 5  # only the total 160 limits them
