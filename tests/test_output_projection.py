"""output_projection.fusable_output: the fused loss takes an output layer without bias only (it
computes hidden @ W^T and nothing else)."""
from torch import nn


def test_biased_linear_output_is_not_fusable():
    from distill_plugins.output_projection import fusable_output

    m = nn.Module()
    m.decoder = nn.Module()
    m.decoder.output_projection = nn.Linear(4, 6, bias=True)
    assert fusable_output(m) is None
    m.decoder.output_projection = nn.Linear(4, 6, bias=False)
    assert fusable_output(m).weight is m.decoder.output_projection.weight
