"""Generation settings of the evaluation protocol, as the arguments fairseq's generator takes.

MiniLLM/DistiLLM/DSKD evaluate with Hugging Face ``generate(do_sample=True, top_k=0, top_p=1.0,
temperature=1.0, no_repeat_ngram_size=6, max_length=512)`` (spec section 5). In fairseq terms:
sampling with beam 1, ``sampling_topk``/``sampling_topp`` -1 for "off" (HF's 0 and 1.0), and
``max_len_b`` = the total length: prompt and response together hold at most ``max_length`` tokens
(fairseq then appends EOS, which is not text). The references left-pad every prompt to
max_prompt_length (256) and generate up to max_length minus that width, so a response has at most
``max_new_tokens`` = 512 - 256 = 256 tokens whatever its prompt's length (MiniLLM
data_utils/prompt_datasets.py collate; evaluate_main.py). In-training validation uses no n-gram blocking.
"""
import json
from argparse import Namespace
from dataclasses import asdict, dataclass

from ..errors import DistillError


@dataclass
class SamplingSettings:
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    temperature: float = 1.0
    no_repeat_ngram_size: int = 6  # 0: off
    max_length: int = 512  # prompt + response tokens
    max_new_tokens: int = 256  # response tokens (max_length - max_prompt_length; 0: only max_length)

    def check(self):
        if self.top_k < 0:
            raise DistillError(f"--top-k {self.top_k}: must be >= 0 (0 turns it off)")
        if not 0.0 < self.top_p <= 1.0:
            raise DistillError(f"--top-p {self.top_p}: must be in (0, 1] (1.0 turns it off)")
        if self.temperature <= 0:
            raise DistillError(f"--temperature {self.temperature}: must be > 0")
        if self.no_repeat_ngram_size < 0:
            raise DistillError(f"--no-repeat-ngram-size {self.no_repeat_ngram_size}: must be >= 0 (0 turns it off)")
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    def generator_args(self) -> Namespace:
        return fairseq_generation_args(
            sampling=True, beam=1, sampling_topk=self.top_k, sampling_topp=self.top_p,
            temperature=self.temperature, no_repeat_ngram_size=self.no_repeat_ngram_size,
            max_len_a=0, max_len_b=self.max_length, max_new_tokens=self.max_new_tokens or None,
        )


def fairseq_generation_args(**kwargs) -> Namespace:
    """A GenerationConfig-like namespace for ``task.build_generator``; HF-style "off" values
    (top-k 0, top-p >= 1) become fairseq's -1."""
    if kwargs.get("sampling_topk", -1) == 0:
        kwargs["sampling_topk"] = -1
    if kwargs.get("sampling_topp", -1.0) >= 1.0:
        kwargs["sampling_topp"] = -1.0
    return Namespace(**kwargs)


# In-training validation (--eval-rouge): the protocol's sampling without n-gram blocking.
VALIDATION_DEFAULTS = dict(
    sampling=True, beam=1, sampling_topk=-1, sampling_topp=-1.0, temperature=1.0,
    no_repeat_ngram_size=0, max_len_a=0, max_len_b=512, max_new_tokens=256,
)


def validation_generation_args(json_text: str) -> Namespace:
    """``--eval-rouge-args`` (JSON, fairseq generation names) merged over ``VALIDATION_DEFAULTS``."""
    try:
        given = json.loads(json_text or "{}")
    except json.JSONDecodeError as e:
        raise DistillError(f"--eval-rouge-args is not valid JSON ({e.msg}); e.g. '{{\"max_len_b\": 256}}'") from None
    if not isinstance(given, dict):
        raise DistillError("--eval-rouge-args must be a JSON object, e.g. '{\"max_len_b\": 256}'")
    unknown = sorted(set(given) - set(VALIDATION_DEFAULTS) - {"min_len", "lenpen", "unkpen"})
    if unknown:
        raise DistillError(
            f"--eval-rouge-args: unknown key {unknown[0]!r}; known: {', '.join(sorted(VALIDATION_DEFAULTS))}"
        )
    return fairseq_generation_args(**{**VALIDATION_DEFAULTS, **given})
