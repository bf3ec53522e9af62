"""Option range checks of the criterions that other tests do not reach: skew_reverse_kl's alpha and
MiniLLM's gamma, cliprange (open at 1), reward scaling and clip, kd-ratio, and their edges."""
import pytest
from omegaconf import OmegaConf

import distill_plugins  # noqa: F401
from conftest import in_memory_kd_task
from distill_plugins.criterions.minillm import MiniLLMConfig, MiniLLMCriterion
from distill_plugins.errors import DistillError


def test_skew_reverse_kl_alpha_range():
    task, _ = in_memory_kd_task(tokens_per_sample=16)
    with pytest.raises(DistillError, match=r"--skew-alpha must be in \[0, 1\], got 1.5"):
        task.build_criterion(OmegaConf.create({"_name": "skew_reverse_kl", "skew_alpha": 1.5}))


@pytest.mark.parametrize("options, message", [
    ({"gamma": 1.5}, "--gamma must be in [0, 1]"),
    ({"gamma": -0.1}, "--gamma must be in [0, 1]"),
    ({"cliprange": 1.0}, "--cliprange must be in [0, 1)"),
    ({"reward_scaling": 0.0}, "--reward-scaling must be > 0"),
    ({"cliprange_reward": -1.0}, "--cliprange-reward must be >= 0"),
    ({"kd_ratio": 1.5}, "--kd-ratio must be in [0, 1]"),
])
def test_minillm_option_ranges(options, message):
    with pytest.raises(DistillError) as e:
        MiniLLMCriterion.check_options(MiniLLMConfig(**options), 1)
    assert message in str(e.value)
    for edge in ({"gamma": 0.0}, {"gamma": 1.0}, {"cliprange": 0.0}, {"cliprange_reward": 0.0}):
        MiniLLMCriterion.check_options(MiniLLMConfig(**edge), 1)
