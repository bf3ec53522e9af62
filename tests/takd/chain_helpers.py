"""Helpers shared by the chain tests: default stage options, writing a chain file, reading the
manifest, and asserting a bad chain file fails with a one-line error and writes nothing."""
import json
import os

import pytest
import yaml

from distill_plugins.cli.chain import main as chain_main
from distill_plugins.errors import DistillError

DEFAULTS = {
    "cpu": True, "optimizer": "adam", "lr": "3e-3", "lr-scheduler": "inverse_sqrt", "warmup-updates": 5,
    "max-tokens": 1024, "log-format": "simple", "log-interval": 1, "no-epoch-checkpoints": True, "seed": 1,
    "num-workers": 0, "decoder-layers": 1, "decoder-ffn-embed-dim": 64, "decoder-attention-heads": 2,
    "max-update": 6,
}


def write_chain(path, chain):
    with open(path, "w") as f:
        yaml.safe_dump(chain, f, sort_keys=False)
    return str(path)


def manifest(out):
    with open(os.path.join(out, "manifest.json")) as f:
        return json.load(f)


def bad(chain, tmp_path, *extra):
    config = write_chain(tmp_path / "chain.yaml", chain)
    with pytest.raises(DistillError) as e:
        chain_main([config, "--output-dir", str(tmp_path / "out"), *extra])
    assert "\n" not in e.value.message and not os.path.exists(tmp_path / "out")
    return e.value.message
