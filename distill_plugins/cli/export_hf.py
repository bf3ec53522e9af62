"""distill-export-hf: a trained fairseq checkpoint -> a Hugging Face directory, loadable offline.

    distill-export-hf checkpoints/checkpoint_best.pt hf-student --data data-bin/dolly

Writes config.json, model.safetensors and the tokenizer files the data was prepared with, so that
``AutoModelForCausalLM.from_pretrained(OUTDIR)`` and ``AutoTokenizer.from_pretrained(OUTDIR)`` work.
Takes ``hf_causal_lm`` models (GPT-2 native or wrapped OPT/LLaMA/Qwen2...) and GPT-2-shaped
``transformer_lm`` students (``kd_gpt2_*``) trained from scratch on data prepared with an HF
tokenizer. LoRA adapters are merged into their weights; embedding rows go back to HF id order and
fairseq-only rows (absent specials) are dropped. The directory appears only when complete.
"""
import argparse
import os
import sys

from ..errors import DistillError
from ..staged_directory import check_output_dir, staged_directory


def get_parser():
    p = argparse.ArgumentParser(prog="distill-export-hf", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="fairseq checkpoint (.pt)")
    p.add_argument("outdir", help="Hugging Face directory to write")
    p.add_argument("--data", required=True, help="the data directory the model was trained on (its tokenizer)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUTDIR")
    return p


def load_fairseq_model(checkpoint: str, data: str):
    import distill_plugins  # noqa: F401  (registers the task and models)
    from fairseq import checkpoint_utils

    if not os.path.isfile(checkpoint):
        raise DistillError(f"checkpoint {checkpoint} does not exist")
    try:
        models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([checkpoint], arg_overrides={"data": data})
    except DistillError:
        raise
    except Exception as e:
        raise DistillError(f"{checkpoint} could not be loaded as a fairseq checkpoint ({type(e).__name__}: {e})") from None
    return models[0].eval(), cfg, task


def to_hf(model, cfg, data: str):
    """A ``transformers`` model with ``model``'s weights."""
    from fairseq.models.transformer_lm import TransformerLanguageModel

    from ..data.tokenizers import load_tokenizer_meta
    from ..hf import gpt2_native
    from ..hf.vocab import HFVocab
    from ..models.hf_causal_lm import _hf_model_with, is_hf_backed

    if is_hf_backed(model):
        return model.to_hf_model()
    if isinstance(model, TransformerLanguageModel):
        meta = load_tokenizer_meta(data)
        if meta.get("type") != "hf":
            raise DistillError(f"{data} was not prepared with a Hugging Face tokenizer; nothing to export it with")
        from transformers import GPT2LMHeadModel

        vocab = HFVocab.from_meta(meta)
        config = gpt2_native.gpt2_config_for(cfg.model, vocab)
        state = gpt2_native.fairseq_to_hf(model.state_dict(), config.n_layer, vocab)
        return _hf_model_with(GPT2LMHeadModel, config, state)
    raise DistillError(f"{type(model).__name__} cannot be exported; export supports hf_causal_lm and kd_gpt2_* models")


def main(argv=None):
    args = get_parser().parse_args(argv)
    out = check_output_dir(args.outdir, "OUTDIR", "config.json", args.overwrite,
                           [("CHECKPOINT", args.checkpoint), ("--data", args.data)])
    model, cfg, task = load_fairseq_model(args.checkpoint, args.data)
    from ..data.tokenizers import HFTokenizer, load_tokenizer

    tok = load_tokenizer(args.data)
    if not isinstance(tok, HFTokenizer):
        raise DistillError(f"{args.data} was not prepared with a Hugging Face tokenizer (--tokenizer hf)")
    hf_model = to_hf(model, cfg, args.data)
    for role in ("bos", "eos", "pad"):
        h = getattr(tok.tok, f"{role}_token_id")
        setattr(hf_model.config, f"{role}_token_id", h)
        if hf_model.generation_config is not None:
            setattr(hf_model.generation_config, f"{role}_token_id", h)
    with staged_directory(out, prefix=".export-") as (_work, staged):
        hf_model.save_pretrained(staged, safe_serialization=True)
        tok.tok.save_pretrained(staged)
    n = sum(p.numel() for p in hf_model.parameters())
    print(f"| wrote {out}: {hf_model.config.model_type}, {n:,} parameters, tokenizer of {args.data}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
