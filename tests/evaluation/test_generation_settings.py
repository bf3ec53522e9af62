"""In-training validation generation (--eval-rouge) follows the references' validation (spec 5): sampling
with top-k 0, top-p 1, T 1, no n-gram blocking (only the test protocol blocks 6-grams), 512 tokens in
all and responses of at most 256."""
from distill_plugins.evaluation.generation_settings import validation_generation_args


def test_validation_defaults():
    a = validation_generation_args("")
    assert (a.sampling, a.beam, a.sampling_topk, a.sampling_topp, a.temperature, a.no_repeat_ngram_size,
            a.max_len_b, a.max_new_tokens) == (True, 1, -1, -1.0, 1.0, 0, 512, 256)
