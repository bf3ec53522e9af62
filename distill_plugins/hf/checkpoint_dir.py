"""Reading a local Hugging Face checkpoint directory: config.json, weights, tokenizer. No hub access.

Weights come from ``model.safetensors`` (or its sharded ``model.safetensors.index.json``). A pickle
checkpoint (``pytorch_model.bin``) is read only with ``--allow-pickle``: unpickling can execute
arbitrary code from the file. Even then it is read with ``torch.load(weights_only=True)``, torch's
restricted unpickler, which has had bypasses in the past, so converting such a checkpoint to
safetensors once, in a sandbox, is the better way.
"""
import json
import os
import re
from typing import Dict, Optional

import torch

from ..errors import DistillError, brief

# model_type in config.json -> how it runs here (see distill_plugins/models/hf_causal_lm.py)
SUPPORTED_MODEL_TYPES = {
    "gpt2": "native fairseq transformer_lm (or wrapped)",
    "opt": "wrapped HF module",
    "llama": "wrapped HF module (LLaMA, LLaMA-2, OpenLLaMA, TinyLLaMA)",
    "mistral": "wrapped HF module",
    "qwen2": "wrapped HF module (attention biases)",
}
SAFETENSORS_FILES = ("model.safetensors", "model.safetensors.index.json")
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


# Extra tensors that transformers itself skips on load: buffers older checkpoints saved (GPT-2's causal
# mask attn.bias and attn.masked_bias, RoPE's inv_freq, position_ids). Regexes over key names.
IGNORED_EXTRA_KEYS = (r"(^|\.)attn\.bias$", r"(^|\.)attn\.masked_bias$", r"rotary_emb\.inv_freq$",
                      r"(^|\.)position_ids$")


def ignored_extra_keys(hf_model=None) -> re.Pattern:
    """One regex of ``IGNORED_EXTRA_KEYS`` and the model class's own ``_keys_to_ignore_on_load_unexpected``."""
    patterns = IGNORED_EXTRA_KEYS + tuple(getattr(hf_model, "_keys_to_ignore_on_load_unexpected", None) or ())
    return re.compile("|".join(f"({p})" for p in patterns))


def is_hf_dir(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json"))


def read_config(path: str):
    """The ``transformers`` config of a checkpoint directory; refuses unsupported families."""
    from transformers import AutoConfig

    if not os.path.isdir(path):
        raise DistillError(f"{path} is not a directory; pass a Hugging Face checkpoint directory")
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise DistillError(
            f"{path} has no config.json, so it is not a Hugging Face checkpoint directory (config.json, "
            "model.safetensors, tokenizer files)"
        )
    try:
        with open(cfg_file) as f:
            model_type = json.load(f).get("model_type")
    except (OSError, ValueError) as e:
        raise DistillError(f"{cfg_file} could not be read ({e})") from None
    check_model_type(model_type, path)
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as e:  # transformers' own validation of the values (its last line says which)
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise DistillError(f"{cfg_file} is not a valid {model_type} config ({lines[-1] if lines else brief(e)}); "
                           "fix config.json") from None
    hidden, heads = getattr(config, "hidden_size", None), getattr(config, "num_attention_heads", None)
    if isinstance(hidden, int) and isinstance(heads, int) and (heads <= 0 or hidden % heads):
        raise DistillError(f"{cfg_file}: the hidden size {hidden} is not a multiple of the {heads} attention heads; "
                           "fix config.json")
    return config


def check_model_type(model_type: Optional[str], where: str):
    if model_type not in SUPPORTED_MODEL_TYPES:
        supported = ", ".join(sorted(SUPPORTED_MODEL_TYPES))
        raise DistillError(f"{where}: model_type {model_type!r} is not supported; supported: {supported}")


def config_from_json(text: str):
    """Rebuild a config stored in a fairseq checkpoint (``--hf-config``)."""
    from transformers import AutoConfig

    d = json.loads(text)
    model_type = d.pop("model_type", None)
    check_model_type(model_type, "the stored HF config")
    return AutoConfig.for_model(model_type, **d)


def config_to_json(config) -> str:
    return config.to_json_string(use_diff=False)


def weight_files(path: str, allow_pickle: bool):
    """The weight files of a checkpoint and whether they are safetensors."""
    for name in SAFETENSORS_FILES:
        if os.path.isfile(os.path.join(path, name)):
            return _shards(path, name), True
    for name in PICKLE_FILES:
        if os.path.isfile(os.path.join(path, name)):
            if not allow_pickle:
                raise DistillError(
                    f"{path} has only a pickle checkpoint ({name}), and loading a pickle can run arbitrary code; "
                    "convert it to model.safetensors, or pass --allow-pickle if you trust its source"
                )
            return _shards(path, name), False
    raise DistillError(
        f"{path} has no weights (model.safetensors or pytorch_model.bin); it is not a complete checkpoint"
    )


def _shards(path: str, name: str):
    if not name.endswith(".index.json"):
        return [os.path.join(path, name)]
    index = os.path.join(path, name)
    try:
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        if not files or not all(isinstance(s, str) for s in files):
            raise ValueError("it names no shard files")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise DistillError(f"{index} is not a valid weight index ({brief(e)}); it must map each tensor name to its "
                           "shard file under \"weight_map\" (re-save the checkpoint with save_pretrained)") from None
    return [os.path.join(path, s) for s in files]


def load_state_dict(path: str, allow_pickle: bool = False) -> Dict[str, torch.Tensor]:
    files, safe = weight_files(path, allow_pickle)
    state = {}
    for file in files:
        if not os.path.isfile(file):
            raise DistillError(f"weight shard {file} is missing")
        try:
            if safe:
                from safetensors.torch import load_file

                state.update(load_file(file, device="cpu"))
            else:
                state.update(torch.load(file, map_location="cpu", weights_only=True))
        except Exception as e:  # truncated or foreign file: one line
            raise DistillError(f"{file} could not be read ({type(e).__name__}: {e})") from None
    return state


def has_tokenizer(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES)


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    if not has_tokenizer(path):
        raise DistillError(f"{path} has no tokenizer files (tokenizer.json, tokenizer.model or vocab.json)")
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:
        raise DistillError(f"the tokenizer in {path} could not be loaded ({type(e).__name__}: {e})") from None


def sha256_dir(path: str) -> str:
    """sha256 over config.json and the weight files (names and bytes), to record a teacher directory."""
    import hashlib

    h = hashlib.sha256()
    names = ["config.json"] + sorted(
        f for f in os.listdir(path) if f.endswith((".safetensors", ".bin", ".index.json"))
    )
    for name in names:
        h.update(name.encode() + b"\0")
        with open(os.path.join(path, name), "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()
