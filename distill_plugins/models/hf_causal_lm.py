"""``--arch hf_causal_lm``: a local Hugging Face checkpoint as a fairseq language model.

    fairseq-train DATA --task instruction_distillation --arch hf_causal_lm --hf-model-dir DIR ...

Design (why two backends):

* **GPT-2 -> native** fairseq ``transformer_lm`` (``NativeGPT2LM``). GPT-2 *is* fairseq's pre-LN
  decoder (learned positions with fairseq's 2-row padding offset, ``gelu_accurate`` = HF
  ``gelu_new``, unscaled tied embeddings), so its weights convert exactly (``hf/gpt2_native.py``)
  and training keeps fairseq's own decoder, which trained this shape ~1.9x faster than HF's module
  (``shared/specs/perf_anchors.md``). ``--hf-backend wrapped`` runs GPT-2 through HF instead.
* **OPT, LLaMA, Mistral, Qwen2 -> wrapped** HF module (``HFDecoder``). They differ from
  transformer_lm in more than layout (OPT: ReLU, project_in/out for 350m, post-LN for 350m;
  LLaMA: RMSNorm, RoPE, SwiGLU, grouped-query attention, no biases; Qwen2: q/k/v biases), so
  re-implementing each in fairseq would be a second, unverified copy of HF's code. The HF module is
  built from config.json, its weights read from safetensors, and wrapped as a
  ``FairseqIncrementalDecoder``: fairseq-train (checkpoints, DDP, fp16/bf16) and fairseq-generate
  work unchanged; incremental decoding keeps HF's ``past_key_values`` cache in fairseq's
  ``incremental_state`` and reorders it for beam search.

Both backends index the vocabulary by fairseq dictionary id: the embedding and output rows are
permuted on import and back on export (``hf/vocab.py``); rows no HF token maps to get the logit
``ABSENT_LOGIT``. The data must be prepared with the checkpoint's tokenizer
(``distill-prepare --tokenizer hf --hf-tokenizer DIR``), which is checked. The HF config is stored
in the checkpoint (``--hf-config``), so a trained checkpoint loads without the HF directory.
``--lora-rank r`` trains LoRA adapters only (``distill_plugins/lora.py``).

No BOS (spec 5): fairseq's LMs start every sequence with ``</s>`` as BOS, but the references feed a
Hugging Face model the prompt's own tokens only (``add_special_tokens=False``), so both backends
never show it column 0: the rest runs exactly as transformers does (positions from 0 at the first
prompt token), and column 0's output is a constant row (zero hidden state: uniform over the present
tokens), which no label reads since the prompt is never a label (``without_bos``, ``hide_bos``).

``--kd-impl fused``: every supported family's logits are ``lm_head(last hidden state)``, a bias-free
linear layer (tied to the input embedding or not; none of them scales or caps its logits), then the
absent rows; ``fused_output`` hands exactly that to the fused loss, on both backends.
"""
import copy
import logging
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from fairseq import utils
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.models import FairseqIncrementalDecoder, FairseqLanguageModel, register_model
from fairseq.models.transformer import TransformerDecoder
from fairseq.models.transformer_lm import TransformerLanguageModel
from omegaconf import open_dict

from ..chunked_divergences import FixedColumns
from ..errors import DistillError
from ..hf import checkpoint_dir as hfdir
from ..hf import gpt2_native
from ..hf.vocab import ABSENT_LOGIT, HFVocab, tokenizer_fingerprint
from ..lora import apply_lora, has_lora, load_base_weights, merge_lora
from ..output_projection import FusedOutput

logger = logging.getLogger(__name__)


@dataclass
class HFCausalLMConfig(FairseqDataclass):
    hf_model_dir: Optional[str] = field(
        default=None, metadata={"help": "Hugging Face checkpoint directory whose config and weights start the model"}
    )
    hf_config: Optional[str] = field(
        default=None,
        metadata={"help": "the HF config as JSON; filled from --hf-model-dir and stored in checkpoints"},
    )
    hf_backend: ChoiceEnum(["auto", "native", "wrapped"]) = field(
        default="auto", metadata={"help": "auto: native fairseq transformer_lm for GPT-2, the wrapped HF module otherwise"}
    )
    lora_rank: int = field(default=0, metadata={"help": "train LoRA adapters of this rank instead of all weights (0: off)"})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA scale alpha (update = alpha / rank * B A)"})
    lora_targets: str = field(
        default="q,v", metadata={"help": "comma-separated: q,k,v,o,gate,up,down or module-name suffixes"}
    )


# -- vocabulary and tokenizer checks ----------------------------------------------------------
def data_vocab(task):
    """The HF vocabulary the task's data was prepared with; refuses data of another tokenizer."""
    from ..data.tokenizers import load_tokenizer_meta

    data = utils.split_paths(task.cfg.data)[0]
    meta = load_tokenizer_meta(data)
    if meta.get("type") != "hf":
        raise DistillError(
            f"the data in {data} was prepared with the {meta.get('type')} tokenizer, but a Hugging Face checkpoint "
            "needs its own; prepare it with distill-prepare --tokenizer hf --hf-tokenizer <checkpoint dir>"
        )
    vocab = HFVocab.from_meta(meta)
    vocab.check_dictionary(task.target_dictionary, data)
    return vocab, meta, data


def check_same_tokenizer(model_dir: str, meta: dict, data: str, role: str = "model"):
    """The checkpoint's tokenizer must be the data's token for token (vocab, merges, specials)."""
    if not hfdir.has_tokenizer(model_dir):
        logger.warning(f"{model_dir} has no tokenizer files: cannot check that it matches the data's tokenizer")
        return
    if tokenizer_fingerprint(hfdir.load_tokenizer(model_dir)) != meta.get("fingerprint"):
        hint = (
            "teacher and student must share one tokenizer token for token, or use cross-tokenizer KD "
            "(distill-prepare --teacher-hf-tokenizer, then --criterion uld, min_ed or dskd_cma with --teacher-data)" if role == "teacher"
            else f"prepare the data with distill-prepare --tokenizer hf --hf-tokenizer {model_dir}"
        )
        raise DistillError(f"the {role} {model_dir} has a different tokenizer than the data in {data}; {hint}")


def _hf_ids_config(config, vocab: HFVocab):
    """A copy of ``config`` indexed by fairseq ids: vocab_size and the special token ids."""
    c = copy.deepcopy(config)
    c.vocab_size = len(vocab)
    inv = vocab.hf_to_fairseq
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        h = getattr(c, name, None)
        if isinstance(h, int):
            setattr(c, name, inv[h] if 0 <= h < vocab.size and inv[h] >= 0 else None)
    return c


# -- the two backends -----------------------------------------------------------------------
class HFBackedModel:
    """What both backends offer: the HF config/vocabulary they came from, weight import, export."""

    backend = "?"
    hf_config = None  # the original HF config (HF vocabulary)
    hf_vocab: HFVocab = None

    def record_config(self, cfg):
        """Store the HF config in the model cfg that fairseq saves with every checkpoint."""
        text = hfdir.config_to_json(self.hf_config)
        if isinstance(cfg, dict) or hasattr(cfg, "_metadata"):  # omegaconf
            with open_dict(cfg):
                cfg.hf_config = text
        else:
            cfg.hf_config = text

    def load_hf_weights(self, state: Dict[str, torch.Tensor]):
        raise NotImplementedError

    def to_hf_model(self):
        """A ``transformers`` model of the HF vocabulary with these weights (LoRA merged)."""
        raise NotImplementedError


# model_type -> its ForCausalLM computes logits = lm_head(base_model(...).last_hidden_state), nothing more
# (checked in transformers 5.x: no logit scale, soft-capping or bias); others would not be fused
PLAIN_HEAD_MODEL_TYPES = ("gpt2", "opt", "llama", "mistral", "qwen2")


def _mask_absent_rows(logits: torch.Tensor, absent: torch.Tensor) -> torch.Tensor:
    return logits.index_fill(-1, absent, ABSENT_LOGIT) if absent.numel() else logits


def _fused_output(weight: torch.Tensor, absent: torch.Tensor) -> FusedOutput:
    """The projection for ``--kd-impl fused``: ``weight``, then the absent rows' constant logit."""
    return FusedOutput(weight, FixedColumns(absent, ABSENT_LOGIT) if absent.numel() else None)


class AbsentRowsProjection(torch.nn.Module):
    """fairseq's tied output layer (same ``weight`` key) whose absent vocabulary rows get
    ``ABSENT_LOGIT``. Deliberately not an ``nn.Linear``: code that multiplies hidden states by
    ``weight`` itself (chunked losses) would skip the mask, so it must take the logits path."""

    def __init__(self, weight: torch.nn.Parameter, vocab: HFVocab):
        super().__init__()
        self.weight = weight
        self.register_buffer("absent_rows", torch.tensor(vocab.absent_rows(), dtype=torch.long), persistent=False)

    def forward(self, features):
        return _mask_absent_rows(torch.nn.functional.linear(features, self.weight), self.absent_rows)

    def fused_output(self) -> FusedOutput:
        return _fused_output(self.weight, self.absent_rows)


# -- no BOS ------------------------------------------------------------------------------------
EMPTY_EXTRA = {"attn": [None], "inner_states": None}


def without_bos(tokens: torch.Tensor) -> torch.Tensor:
    """The columns an HF-backed model reads: all but column 0 (fairseq's ``</s>``-as-BOS)."""
    return tokens[:, 1:]


def with_start_row(out: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """``out`` for columns 1.. with column 0's constant ``start`` row [B, 1, C] in front."""
    return torch.cat([start.to(out.dtype), out], 1)


def hide_bos(padding: torch.Tensor, positions: torch.Tensor):
    """``prompt_prefill.decoder_step``'s inputs for an HF-backed model: each left-padded row's first
    real token (the BOS) becomes padding, and positions count from the token after it. Also returns
    which of the new tokens (the last ``positions.size(1)`` columns) are that BOS."""
    first = (~padding).long().argmax(1)
    bos = torch.zeros_like(padding).scatter_(1, first.unsqueeze(1), True) & ~padding
    return padding | bos, (positions - 1).clamp(min=0), bos[:, -positions.size(1):]


def start_rows_at_bos(logits: torch.Tensor, is_bos: torch.Tensor, start, last_only: bool):
    """A prefill's logits with the BOS positions' output replaced by the start row (``start()``, made
    only if needed), as a full forward gives it (the network never ran on the BOS; for an empty
    prompt it is the next-token distribution)."""
    where = is_bos[:, -1:] if last_only else is_bos
    if not bool(where.any()):
        return logits
    return torch.where(where.unsqueeze(-1), start().to(logits.dtype), logits)


class NoBOSTransformerDecoder(TransformerDecoder):
    """fairseq's decoder for an imported GPT-2, without BOS: the network reads columns 1.. (positions
    from HF's 0); column 0 gives the output layer's value at a zero hidden state. Same parameters
    and state-dict keys as ``TransformerDecoder`` (the class of the decoder fairseq builds is
    swapped for this one)."""

    reads_without_bos = True  # takes max_positions() + 1 fairseq columns (teacher.Teacher.check_positions)

    def _start_row(self, tokens, features_only: bool):
        h = self.output_projection.weight.new_zeros(tokens.size(0), 1, self.output_embed_dim)
        return h if features_only else self.output_layer(h)

    def forward(self, prev_output_tokens, encoder_out=None, incremental_state=None, features_only=False, **kwargs):
        tokens = without_bos(prev_output_tokens)
        if tokens.size(1) == 0:  # only the BOS so far (the generator's first step): nothing to run
            return self._start_row(prev_output_tokens, features_only), EMPTY_EXTRA
        out, extra = super().forward(tokens, encoder_out=encoder_out, incremental_state=incremental_state,
                                     features_only=features_only, **kwargs)
        if incremental_state is None:
            out = with_start_row(out, self._start_row(prev_output_tokens, features_only))
        return out, extra

    def supports_prefill(self) -> bool:
        return True

    def prefill_step(self, tokens, padding, positions, incremental_state, last_only: bool = True):
        from ..prompt_prefill import fairseq_decoder_step

        padding, positions, is_bos = hide_bos(padding, positions)
        logits = fairseq_decoder_step(self, tokens, padding, positions, incremental_state, last_only)
        return start_rows_at_bos(logits, is_bos, lambda: self._start_row(tokens, False), last_only)


class NativeGPT2LM(HFBackedModel, TransformerLanguageModel):
    """GPT-2 as fairseq's own transformer_lm (exact conversion, fairseq's speed)."""

    backend = "native"

    @classmethod
    def from_hf_config(cls, config, vocab: HFVocab, task):
        reason = gpt2_native.native_incompatibility(config)
        if reason:
            raise DistillError(f"this GPT-2 config cannot run natively ({reason}); use --hf-backend wrapped")
        args = gpt2_native.fairseq_args(config)
        model = TransformerLanguageModel.build_model.__func__(cls, args, task)
        model.args = args
        model.decoder.__class__ = NoBOSTransformerDecoder  # fairseq builds a TransformerDecoder: same module
        model.decoder.output_projection = AbsentRowsProjection(model.decoder.output_projection.weight, vocab)
        return model

    def load_hf_weights(self, state):
        load_base_weights(self, gpt2_native.hf_to_fairseq(state, self.hf_config, self.hf_vocab))

    def to_hf_model(self):
        from transformers import GPT2LMHeadModel

        merge_lora(self)
        config = gpt2_native.gpt2_config_for(self.args, self.hf_vocab, base=self.hf_config)
        state = gpt2_native.fairseq_to_hf(self.state_dict(), config.n_layer, self.hf_vocab)
        return _hf_model_with(GPT2LMHeadModel, config, state)


def _hf_model_with(model_cls_or_config, config, state):
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    with no_init_weights():
        if isinstance(model_cls_or_config, type):
            model = model_cls_or_config(config)
        else:
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.tie_weights()
    load_base_weights(model, state, ignore_missing=_tied_output_keys(model))
    return model.eval()


def _tied_output_keys(hf_model) -> List[str]:
    """Output-layer keys a checkpoint may omit because they are tied to the input embedding."""
    if not getattr(hf_model.config, "tie_word_embeddings", False):
        return []
    return [n + ".weight" for n in _module_names(hf_model, hf_model.get_output_embeddings())]


def _module_names(root, module) -> List[str]:
    return [n for n, m in root.named_modules() if m is module] if module is not None else []


class HFDecoder(FairseqIncrementalDecoder):
    """A ``transformers`` causal LM as a fairseq incremental decoder, indexed by fairseq ids."""

    reads_without_bos = True  # takes max_positions() + 1 fairseq columns (teacher.Teacher.check_positions)

    def __init__(self, dictionary, config, vocab: HFVocab):
        super().__init__(dictionary)
        from transformers import AutoModelForCausalLM
        from transformers.initialization import no_init_weights

        with no_init_weights():  # every weight is loaded right after (HF weights or a checkpoint)
            self.hf = AutoModelForCausalLM.from_config(_hf_ids_config(config, vocab), dtype=torch.float32)
        self.hf.tie_weights()  # skipped under no_init_weights
        self.register_buffer("absent_rows", torch.tensor(vocab.absent_rows(), dtype=torch.long), persistent=False)
        # RoPE frequencies stay fp32 when fairseq casts the model to fp16/bf16 (HF computes RoPE in fp32)
        self._fp32_buffers = [
            (mod, name, buf.detach().clone().float())
            for mod in self.hf.modules() for name, buf in mod.named_buffers(recurse=False) if "inv_freq" in name
        ]

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        for mod, name, fp32 in getattr(self, "_fp32_buffers", []):
            setattr(mod, name, fp32.to(getattr(mod, name).device))
        return self

    def vocab_param_names(self) -> List[str]:
        """Names (relative to ``self.hf``) of the tensors with one row per token."""
        names = []
        for module in (self.hf.get_input_embeddings(), self.hf.get_output_embeddings()):
            for n in _module_names(self.hf, module):
                names += [f"{n}.{p}" for p, _ in module.named_parameters(recurse=False)]
        return sorted(set(names))

    def fused_output(self) -> Optional[FusedOutput]:
        """``lm_head``'s weight and the absent rows, when the logits are exactly ``lm_head(hidden)``."""
        head = self.hf.get_output_embeddings()
        if self.hf.config.model_type not in PLAIN_HEAD_MODEL_TYPES or not isinstance(head, torch.nn.Linear) \
                or head.bias is not None:
            return None
        return _fused_output(head.weight, self.absent_rows)

    def _start_row(self, tokens, features_only: bool):
        """Column 0's output (no BOS): lm_head of a zero hidden state, with the absent rows."""
        head = self.hf.get_output_embeddings().weight
        h = head.new_zeros(tokens.size(0), 1, head.size(1))
        return h if features_only else _mask_absent_rows(head.new_zeros(tokens.size(0), 1, head.size(0)),
                                                         self.absent_rows)

    def forward(self, prev_output_tokens, encoder_out=None, incremental_state=None, features_only=False, **kwargs):
        tokens = without_bos(prev_output_tokens)
        start = lambda: self._start_row(prev_output_tokens, features_only)  # noqa: E731  (not on cached steps)
        if features_only:  # the hidden states lm_head takes (for --kd-impl fused)
            if incremental_state is not None:
                raise NotImplementedError("hf_causal_lm: features_only without incremental decoding only")
            if tokens.size(1) == 0:
                return start(), EMPTY_EXTRA
            hidden = self.hf.base_model(input_ids=tokens, use_cache=False).last_hidden_state
            return with_start_row(hidden, start()), EMPTY_EXTRA
        if incremental_state is None:
            if tokens.size(1) == 0:
                return start(), EMPTY_EXTRA
            logits = self.hf(input_ids=tokens, use_cache=False).logits
            return with_start_row(_mask_absent_rows(logits, self.absent_rows), start()), EMPTY_EXTRA
        state = self.get_incremental_state(incremental_state, "hf")
        cache = state["cache"] if state else None
        past = cache.get_seq_length() if cache is not None else 0
        if tokens.size(1) <= past:  # only the BOS so far (the generator's first step)
            return start(), EMPTY_EXTRA
        out = self.hf(input_ids=tokens[:, past:], past_key_values=cache, use_cache=True)
        self.set_incremental_state(incremental_state, "hf", {"cache": out.past_key_values})
        return _mask_absent_rows(out.logits, self.absent_rows), EMPTY_EXTRA

    def supports_prefill(self) -> bool:
        return True

    def prefill_step(self, tokens, padding, positions, incremental_state, last_only: bool = True):
        """``prompt_prefill.decoder_step``: HF's own left-padding inputs (attention mask over the
        cache and the new tokens, explicit position ids), cache in ``incremental_state``."""
        padding, positions, is_bos = hide_bos(padding, positions)
        state = self.get_incremental_state(incremental_state, "hf")
        out = self.hf(input_ids=tokens, attention_mask=(~padding).long(), position_ids=positions,
                      past_key_values=state["cache"] if state else None, use_cache=True,
                      logits_to_keep=1 if last_only else 0)
        self.set_incremental_state(incremental_state, "hf", {"cache": out.past_key_values})
        logits = _mask_absent_rows(out.logits, self.absent_rows)
        return start_rows_at_bos(logits, is_bos, lambda: self._start_row(tokens, False), last_only)

    def reorder_incremental_state(self, incremental_state, new_order):
        state = self.get_incremental_state(incremental_state, "hf")
        if state and state["cache"] is not None:
            state["cache"].reorder_cache(new_order)

    def max_positions(self):
        c = self.hf.config
        return getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", None) or 1_000_000


def build_hf_model(cfg: HFCausalLMConfig, task, role: str = "model"):
    """The fairseq model for ``cfg``: from the stored config (a checkpoint) or from ``--hf-model-dir``
    (config, tokenizer check, weights), then LoRA if asked."""
    vocab, meta, data = data_vocab(task)
    load_weights = False
    if cfg.hf_config:
        config = hfdir.config_from_json(cfg.hf_config)
    elif cfg.hf_model_dir:
        config = hfdir.read_config(cfg.hf_model_dir)
        check_same_tokenizer(cfg.hf_model_dir, meta, data, role)
        load_weights = True
    else:
        raise DistillError("--arch hf_causal_lm needs --hf-model-dir DIR (a Hugging Face checkpoint directory)")
    backend = cfg.hf_backend
    if backend == "auto":
        backend = "native" if gpt2_native.native_incompatibility(config) is None else "wrapped"
    if backend == "native":
        model = NativeGPT2LM.from_hf_config(config, vocab, task)
    else:
        model = HFCausalLM(HFDecoder(task.target_dictionary, config, vocab))
    model.hf_config, model.hf_vocab = config, vocab
    if load_weights:
        allow_pickle = bool(getattr(task.cfg, "allow_pickle", False))
        state = hfdir.load_state_dict(cfg.hf_model_dir, allow_pickle=allow_pickle)
        try:
            model.load_hf_weights(state)
        except DistillError as e:
            raise DistillError(f"{role} {cfg.hf_model_dir}: {e.message}") from None
        logger.info(f"{role} {cfg.hf_model_dir}: {config.model_type}, {backend} backend, "
                    f"{sum(p.numel() for p in model.parameters()):,} parameters")
    if cfg.lora_rank:
        names = apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
        n = sum(p.numel() for p in model.parameters() if p.requires_grad)
        logger.info(f"LoRA rank {cfg.lora_rank} on {len(names)} matrices: {n:,} trainable parameters")
    return model


@register_model("hf_causal_lm", dataclass=HFCausalLMConfig)
class HFCausalLM(HFBackedModel, FairseqLanguageModel):
    """The wrapped backend (and the registered model; GPT-2 builds a ``NativeGPT2LM``)."""

    backend = "wrapped"

    @classmethod
    def build_model(cls, cfg, task):
        return build_hf_model(cfg, task)

    def load_hf_weights(self, state):
        dec = self.decoder
        own = dec.hf.state_dict()
        prefix = getattr(dec.hf, "base_model_prefix", "")
        if prefix and not any(k in own for k in state) and any(f"{prefix}.{k}" in own for k in state):
            state = {f"{prefix}.{k}": v for k, v in state.items()}  # a base-model checkpoint
        state = dict(state)
        for name in dec.vocab_param_names():
            if name in state:
                state[name] = self.hf_vocab.to_fairseq_rows(state[name])
        load_base_weights(dec.hf, state, ignore_missing=_tied_output_keys(dec.hf),
                          ignore_unexpected=hfdir.ignored_extra_keys(dec.hf))

    def to_hf_model(self):
        merge_lora(self)
        dec = self.decoder
        config = copy.deepcopy(self.hf_config)
        config.vocab_size = self.hf_vocab.size
        state = dec.hf.state_dict()
        for name in dec.vocab_param_names():
            state[name] = self.hf_vocab.to_hf_rows(state[name])
        return _hf_model_with(None, config, state)


def build_from_hf_dir(path: str, task, role: str = "teacher"):
    """An HF checkpoint directory as a fairseq model for ``task`` (no LoRA): the teacher loader."""
    return build_hf_model(HFCausalLMConfig(hf_model_dir=path), task, role=role)


def is_hf_backed(model) -> bool:
    return isinstance(model, HFBackedModel)


__all__ = ["HFCausalLM", "NativeGPT2LM", "HFDecoder", "build_from_hf_dir", "is_hf_backed", "has_lora"]
