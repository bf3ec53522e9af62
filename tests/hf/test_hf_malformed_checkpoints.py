"""Hugging Face directories as they come: the extra buffers transformers itself skips load; a config
and weights that disagree, or a broken index, are refused with one line (never a traceback, never a
silently truncated model); an export that cannot be GPT-2 says why."""
import json
import os
import shutil

import pytest

pytest.importorskip("transformers", reason="needs the hf extra (transformers)")

import torch  # noqa: E402

import hf_fixtures as F  # noqa: E402
from conftest import TRAIN_COMMON, cli, run  # noqa: E402
from distill_plugins.errors import DistillError  # noqa: E402


def variant(tmp_path, family, add=None, drop=None, config=None, index=None):
    """A copy of ``F.hf_dir(family)`` with tensors added/dropped, config.json values changed or the
    weights replaced by a (broken) sharded index."""
    from safetensors.torch import load_file, save_file

    d = tmp_path / f"{family}-variant"
    shutil.copytree(F.hf_dir(family), d)
    weights = d / "model.safetensors"
    if add or drop:
        state = load_file(str(weights))
        state.update(add or {})
        for key in drop or ():
            state.pop(key)
        save_file(state, str(weights))
    if config:
        c = json.loads((d / "config.json").read_text())
        c.update(config)
        (d / "config.json").write_text(json.dumps(c))
    if index is not None:
        weights.unlink()
        (d / "model.safetensors.index.json").write_text(index)
    return str(d)


def build(family, model_dir, backend="auto"):
    return F.build(F.prepared(family), "--arch", "hf_causal_lm", "--hf-model-dir", model_dir,
                   "--hf-backend", backend)[1]


CAUSAL_MASK = torch.tril(torch.ones(1, 1, 128, 128, dtype=torch.bool))
IGNORABLE = [  # (family, backend, extra tensors older checkpoints hold)
    ("gpt2", "native", {"transformer.h.0.attn.bias": CAUSAL_MASK, "transformer.h.1.attn.masked_bias": torch.tensor(-1e4)}),
    ("gpt2", "wrapped", {"transformer.h.0.attn.bias": CAUSAL_MASK, "transformer.h.1.attn.masked_bias": torch.tensor(-1e4)}),
    ("llama", "auto", {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4)}),
]


@pytest.mark.parametrize("family,backend,extra", IGNORABLE, ids=["gpt2-native", "gpt2-wrapped", "llama"])
def test_buffers_transformers_skips_are_skipped(tmp_path, family, backend, extra):
    clean = build(family, F.hf_dir(family), backend).state_dict()
    loaded = build(family, variant(tmp_path, family, add=extra), backend).state_dict()
    assert clean.keys() == loaded.keys() and all(torch.equal(clean[k], loaded[k]) for k in clean)


MALFORMED = [  # (id, family, variant arguments, what the one line must say)
    ("gpt2-config-fewer-layers", "gpt2", dict(config={"n_layer": 1}),
     "tensors that config.json's GPT-2 (n_layer 1) does not use: h.1.attn.c_attn.bias"),
    ("gpt2-config-more-layers", "gpt2", dict(config={"n_layer": 3}),
     "the weights have no h.2.attn.c_attn.weight, which config.json's GPT-2 (n_layer 3) needs"),
    ("gpt2-unknown-tensor", "gpt2", dict(add={"transformer.h.0.mlp.extra.weight": torch.ones(2)}),
     "does not use: h.0.mlp.extra.weight"),
    ("llama-unknown-tensor", "llama", dict(add={"model.layers.0.mlp.extra.weight": torch.ones(2)}),
     "unexpected ['model.layers.0.mlp.extra.weight']"),
    ("gpt2-no-final-norm", "gpt2", dict(drop=["transformer.ln_f.weight"]), "the weights have no ln_f.weight"),
    ("gpt2-wrong-shape", "gpt2", dict(add={"transformer.h.0.mlp.c_fc.weight": torch.zeros(3, 3)}),
     "decoder.layers.0.fc1.weight (3, 3) where the model has (128, 32)"),
    ("llama-wrong-shape", "llama", dict(add={"model.layers.0.mlp.up_proj.weight": torch.zeros(3, 3)}),
     "model.layers.0.mlp.up_proj.weight (3, 3) where the model has (64, 32)"),
    ("gpt2-heads", "gpt2", dict(config={"n_head": 3}), "the hidden size 32 is not a multiple of the 3 attention heads"),
    ("llama-heads", "llama", dict(config={"num_attention_heads": 3}), "is not a valid llama config"),
    ("index-not-json", "gpt2", dict(index="{not json"), "model.safetensors.index.json is not a valid weight index"),
    ("index-without-map", "gpt2", dict(index='{"metadata": {}}'), "KeyError: 'weight_map'"),
]


@pytest.mark.parametrize("family,kw,says", [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_directory_is_one_line(tmp_path, family, kw, says):
    with pytest.raises(DistillError) as e:
        build(family, variant(tmp_path, family, **kw))
    message = str(e.value)
    assert says in message and "\n" not in message, message
    assert "config.json" in message or "index" in message, message  # what to fix


def test_fairseq_train_on_a_truncating_config_fails_before_training(tmp_path):
    model_dir = variant(tmp_path, "gpt2", config={"n_layer": 1})
    proc = run([cli("fairseq-train"), F.prepared("gpt2"), *TRAIN_COMMON, "--save-dir", tmp_path / "ck",
                "--max-update", "1", "--arch", "hf_causal_lm", "--hf-model-dir", model_dir], check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    err = proc.stderr.strip().splitlines()[-1]
    assert err.startswith(f"fairseq-distill: error: model {model_dir}: the weights hold tensors"), err
    assert not os.path.exists(tmp_path / "ck" / "checkpoint_last.pt")


def test_export_without_positional_embeddings_says_why(tmp_path):
    data = F.prepared("gpt2")
    task, model, cfg = F.build(data, "--arch", "kd_gpt2_tiny", "--decoder-layers", "1", "--decoder-embed-dim", "32",
                               "--decoder-ffn-embed-dim", "64", "--decoder-attention-heads", "2",
                               "--no-token-positional-embeddings")
    ckpt = F.save_checkpoint(tmp_path / "checkpoint.pt", model, cfg, task)
    proc = run([cli("distill-export-hf"), ckpt, str(tmp_path / "hf"), "--data", data], check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    err = proc.stderr.strip().splitlines()[-1]
    assert "is not GPT-2-shaped (needs learned positions)" in err, err
    assert not (tmp_path / "hf").exists()
