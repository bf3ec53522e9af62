"""Hugging Face conversion details the end-to-end HF tests cannot see: absent special rows are 0 on
import and dropped on export, an untied lm_head is refused by the native GPT-2 import (it would be
dropped silently), and the wrapped model's config holds fairseq ids."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # hf_fixtures


def test_absent_rows_are_zero_on_import_and_dropped_on_export():
    from distill_plugins.hf.vocab import HFVocab

    v = HFVocab(size=5, specials={"bos": None, "pad": None, "eos": 4, "unk": None})
    hf = torch.arange(1.0, 6.0)[:, None].expand(5, 3).clone()
    fs = v.to_fairseq_rows(hf)
    assert v.absent_rows() == [0, 1, 3]
    assert torch.all(fs[v.absent_rows()] == 0)
    assert torch.equal(fs[2], hf[4])
    assert torch.equal(v.to_hf_rows(fs), hf)


def test_untied_lm_head_is_refused_on_import():
    transformers = pytest.importorskip("transformers")
    from distill_plugins.errors import DistillError
    from distill_plugins.hf import gpt2_native
    from distill_plugins.hf.vocab import HFVocab

    config = transformers.GPT2Config(vocab_size=11, n_positions=8, n_embd=8, n_layer=1, n_head=2)
    state = {k: v.clone() for k, v in transformers.GPT2LMHeadModel(config).state_dict().items()}
    vocab = HFVocab(size=11, specials={"bos": None, "pad": None, "eos": 10, "unk": None})
    gpt2_native.hf_to_fairseq(state, config, vocab)  # tied: fine
    state["lm_head.weight"] = state["transformer.wte.weight"] + 1.0
    with pytest.raises(DistillError, match="lm_head.weight"):
        gpt2_native.hf_to_fairseq(state, config, vocab)


def test_wrapped_config_special_ids_are_fairseq_ids():
    pytest.importorskip("transformers")
    import hf_fixtures as F

    task, model, _ = F.build(F.prepared("gpt2"), "--arch", "hf_causal_lm", "--hf-model-dir", F.hf_dir("gpt2"),
                             "--hf-backend", "wrapped")
    c = model.decoder.hf.config
    assert c.eos_token_id == task.dictionary.eos()
    assert c.vocab_size == len(task.dictionary)
