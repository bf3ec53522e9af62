"""Generated sequences become next-token training examples: shift and masks, on a crafted generator."""
import torch

import distill_plugins  # noqa: F401
from distill_plugins.data.prompt_response_dataset import collate_examples
from distill_plugins.generated.responses import examples_from_responses, sample_responses
from distill_plugins.sampling import batch_from_responses, generate_responses
from distill_plugins.tasks.instruction_distillation import InstructionDistillationConfig, InstructionDistillationTask


class CraftedGenerator:
    """Stands in for fairseq's SequenceGenerator: echoes the forced prompt, then a known response."""

    def __init__(self, responses):
        self.responses = responses
        self.calls = []

    def generate(self, models, sample, prefix_tokens=None, bos_token=None):
        self.calls.append(prefix_tokens.clone())
        hypos = []
        for i, resp in enumerate(self.responses):
            n = int(sample["net_input"]["src_lengths"][i])
            toks = torch.cat([prefix_tokens[i, :n], resp])
            hypos.append([{"tokens": toks, "positional_scores": torch.zeros(len(toks)), "attention": None}])
        return hypos


def task_and_batch(data_bin, n=3):
    task = InstructionDistillationTask.setup_task(InstructionDistillationConfig(data=data_bin, seed=1))
    task.load_dataset("valid")
    ds = task.dataset("valid")
    return task, ds.collater([ds[i] for i in range(n)])


def test_generated_batch_is_shifted_and_masked(data_bin):
    task, sample = task_and_batch(data_bin)
    pad, eos = task.dictionary.pad(), task.dictionary.eos()
    # distinct recognisable ids: a finished response (ends with EOS), a cut one (no EOS), an empty one
    responses = [torch.tensor([101, 102, 103, eos]), torch.tensor([111, 112]), torch.tensor([eos])]
    gen = CraftedGenerator(responses)
    model = torch.nn.Linear(1, 1)
    got = generate_responses(task, model, sample, generator=gen)
    assert model.training  # restored after sampling in eval mode
    prompts = [sample["net_input"]["src_tokens"][i, 1: 1 + int(sample["prompt_lengths"][i])] for i in range(3)]
    assert all(torch.equal(gen.calls[0][i, : len(p)], p) for i, p in enumerate(prompts))  # prompts forced
    assert len({len(p) for p in prompts}) > 1  # and nothing after a shorter prompt (no response token leaks)
    assert all(gen.calls[0][i, len(p):].eq(pad).all() for i, p in enumerate(prompts))
    assert [r.tolist() for r in got] == [r.tolist() for r in responses]  # prompt stripped from hypotheses

    for batch in (collate_examples(examples_from_responses(sample, got, pad, eos, 512), pad),
                  batch_from_responses(sample, got, pad, eos, 512)):
        src, tgt = batch["net_input"]["src_tokens"], batch["target"]
        for i, (p, r) in enumerate(zip(prompts, responses)):
            n, L = len(p), len(p) + len(r)
            expected_src = [eos] + p.tolist() + r.tolist()[:-1]
            expected_tgt = [pad] * n + r.tolist()
            assert src[i, :L].tolist() == expected_src
            assert tgt[i, :L].tolist() == expected_tgt  # label of position t = input token t + 1
            assert tgt[i, L:].eq(pad).all() and src[i, L:].eq(pad).all()
            # the last prompt position predicts the first response token (DistiLLM's sampler drops it)
            assert tgt[i, n - 1] == pad and tgt[i, n] == r[0]
            assert int(batch["prompt_lengths"][i]) == n and int(batch["id"][i]) == int(sample["id"][i])
        assert batch["ntokens"] == sum(len(r) for r in responses)


def test_max_new_tokens_cuts_each_response(data_bin, monkeypatch):
    task, sample = task_and_batch(data_bin)
    eos = task.dictionary.eos()
    long = [torch.tensor([50 + k for k in range(9)] + [eos]), torch.tensor([60, 61, eos]), torch.tensor([70] * 4)]
    gen = CraftedGenerator(long)
    seen = {}

    def build(models, args, **kw):
        seen["max_len_b"] = args.max_len_b
        return gen

    monkeypatch.setattr(task, "build_generator", build)
    got = sample_responses(task, torch.nn.Linear(1, 1), sample, max_new_tokens=4, max_total=512)
    assert [g.tolist() for g in got] == [[50, 51, 52, 53], [60, 61, eos], [70] * 4]
    # the batch decodes the longest prompt + budget (EOS is forced after that, and removed)
    assert seen["max_len_b"] == int(sample["prompt_lengths"].max()) + 4
    # capped at a row of --tokens-per-sample: prompt + response may fill all of it
    sample_responses(task, torch.nn.Linear(1, 1), sample, max_new_tokens=400, max_total=64)
    assert seen["max_len_b"] == 64


class LengthLimitedGenerator(CraftedGenerator):
    """The crafted generator with fairseq's length settings: prompt + response at most ``limit``."""

    def __init__(self, responses, limit):
        super().__init__(responses)
        self.max_len_a, self.max_len_b, self.max_positions = 0, limit, 1024


def test_an_eos_sampled_at_the_last_free_step_is_kept_a_forced_one_dropped(data_bin):
    """fairseq forces EOS one past the limit (n + len = limit + 1): dropped, it was never sampled; an EOS
    the model chose at the last free position (n + len = limit) ends a response that stopped."""
    task, sample = task_and_batch(data_bin)
    eos = task.dictionary.eos()
    lengths = sample["prompt_lengths"].tolist()
    limit, w = max(lengths) + 4, task.dictionary.nspecial + 5
    sampled = [torch.tensor([w] * (limit - n - 1) + [eos]) for n in lengths]
    got = generate_responses(task, torch.nn.Linear(1, 1), sample, generator=LengthLimitedGenerator(sampled, limit))
    assert [r.tolist() for r in got] == [r.tolist() for r in sampled]
    forced = [torch.tensor([w] * (limit - n) + [eos]) for n in lengths]
    got = generate_responses(task, torch.nn.Linear(1, 1), sample, generator=LengthLimitedGenerator(forced, limit))
    assert [r.tolist() for r in got] == [r[:-1].tolist() for r in forced]
