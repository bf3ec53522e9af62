"""Hugging Face checkpoints in and out: reading local checkpoint directories, the id permutation
between an HF tokenizer and the fairseq dictionary, and the exact GPT-2 <-> transformer_lm
conversion. The fairseq model is ``distill_plugins/models/hf_causal_lm.py``; export is
``distill-export-hf`` (``distill_plugins/cli/export_hf.py``). Needs the ``hf`` extra
(transformers, tokenizers, safetensors); nothing here downloads from a hub."""
