"""The frozen teacher: loaded once, never a submodule of the student or the criterion.

fairseq's Trainer puts every parameter of the model and the criterion into the optimizer, the
checkpoint and the DDP/FSDP wrapper (``../shared/specs/fairseq_notes.md`` section 3), so the teacher
lives in a plain Python object held by the task. It is in eval mode, has ``requires_grad=False``,
runs under ``torch.no_grad`` in its own dtype, and is moved to the student's device on first use.
The student's checkpoint records the teacher's path and sha256 (task state), never its weights.
"""
import hashlib
import logging
import os
from typing import Optional

import torch
from fairseq import checkpoint_utils

from .errors import DistillError, brief

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def dictionary_fingerprint(dictionary) -> dict:
    """Size and sha256 of a fairseq dictionary's symbols, to compare teacher and student vocabularies."""
    h = hashlib.sha256("\n".join(dictionary.symbols).encode("utf-8")).hexdigest()
    return {"size": len(dictionary), "sha256": h}


class Teacher:
    """A frozen fairseq model giving logits for the student's batches."""

    def __init__(self, model, path: str, sha256: str, dtype: str = "fp32", device: Optional[str] = None):
        self.model = model.eval().requires_grad_(False)
        self._run = self.model  # the callable of the forward: the model, or its torch.compile wrapper
        self.path, self.sha256 = path, sha256
        self.sharded = False  # parameters split over the workers (--teacher-sharding fsdp)
        self.trained_length = None  # --tokens-per-sample of its training, where the checkpoint says
        self.dtype = DTYPES[dtype]
        self.device = torch.device(device) if device not in (None, "auto") else None
        self.model.to(dtype=self.dtype)
        if self.device is not None:
            self.model.to(self.device)

    def compile(self) -> None:
        """Run the forward through ``torch.compile`` (``--teacher-compile``): the teacher is frozen,
        so its graph is compiled once per input shape class; parameters stay shared with ``model``."""
        if self.sharded:
            logger.warning("--teacher-compile: a sharded teacher (--teacher-sharding fsdp) runs uncompiled")
            return
        self._run = torch.compile(self.model, dynamic=None)

    def shard(self, device) -> None:
        """Split the parameters over the data-parallel workers (``teacher_sharding.py``); the
        teacher then lives on ``--teacher-device`` if given, else ``device`` (the student's)."""
        from .teacher_sharding import is_sharded, shard_teacher

        self.device = self.device or torch.device(device)
        self.model = shard_teacher(self.model, self.device)
        self._run = self.model
        self.sharded = is_sharded(self.model)

    @classmethod
    def load(cls, path: str, task, dtype: str = "fp32", device: Optional[str] = None,
             role: str = "teacher", flag: Optional[str] = None, teacher_data: Optional[str] = None) -> "Teacher":
        """Load a teacher checkpoint for ``task``'s data; refuse a teacher of another vocabulary.
        ``role`` names the model in messages (another frozen model, e.g. MiniPLM's reference LM) and
        ``flag`` the option that gave the path (default: --teacher-path for the teacher);
        ``teacher_data``: ``task`` is the teacher's tokenization (--teacher-data), for the messages."""
        hint = flag or ("--teacher-path" if role == "teacher" else "its path")
        if os.path.isdir(path):
            if not os.path.isfile(os.path.join(path, "config.json")):
                example = os.path.join(path, "checkpoint_best.pt")
                raise DistillError(f"{role} {path} has no config.json, so it is not a Hugging Face checkpoint "
                                   f"directory; for a fairseq checkpoint pass its file, e.g. {hint} {example}")
            return cls.load_hf_dir(path, task, dtype=dtype, device=device, role=role)
        if not os.path.isfile(path):
            raise DistillError(f"{role} checkpoint {path} does not exist; check {hint}")
        if not os.access(path, os.R_OK):
            raise DistillError(f"{role} checkpoint {path} is not readable; check its permissions")
        try:
            state = checkpoint_utils.load_checkpoint_to_cpu(path)
        except Exception as e:  # a truncated or foreign file: say so in one line
            raise DistillError(
                f"{role} checkpoint {path} could not be loaded ({brief(e)}); it is truncated or not a "
                f"fairseq checkpoint: check {hint}"
            ) from None
        if "model" not in state or "cfg" not in state:
            raise DistillError(f"{role} {path} is not a fairseq checkpoint (no 'model'/'cfg'); check {hint}")
        student = dictionary_fingerprint(task.target_dictionary)
        recorded = (state.get("task_state") or {}).get("dictionary")
        if recorded is None:  # a checkpoint of another task: compare the embedding table's rows
            emb = state["model"].get("decoder.embed_tokens.weight")
            if emb is None:
                raise DistillError(f"{role} {path} records no dictionary and has no decoder.embed_tokens.weight to "
                                   "compare with the data's; pass a checkpoint fairseq-train wrote for this data, or "
                                   "a Hugging Face directory")
            recorded = {"size": emb.size(0), "sha256": None}
        if recorded["size"] != student["size"] or (
            recorded["sha256"] is not None and recorded["sha256"] != student["sha256"]
        ):
            same_size = " but other symbols" if recorded["size"] == student["size"] else ""
            if teacher_data:
                raise DistillError(
                    f"{role} dictionary (size {recorded['size']}) differs from that of --teacher-data {teacher_data} "
                    f"(size {student['size']}{same_size}); pass the teacher trained on that tokenization")
            raise DistillError(
                f"{role} dictionary (size {recorded['size']}) differs from the student's (size "
                f"{student['size']}{same_size}); prepare the student's data with the teacher's tokenizer and dictionary, "
                "or distil across tokenizers (--criterion uld, min_ed or dskd_cma with --teacher-data, README)"
            )
        from fairseq import utils

        from .data.tokenizers import check_tokenizer_identity

        data = utils.split_paths(task.cfg.data)[0]
        fix = ("pass the teacher trained on that tokenization" if teacher_data else
               "prepare the student's data with the teacher's tokenizer, or distil across tokenizers (--criterion "
               "uld, min_ed or dskd_cma with --teacher-data, README)")
        check_tokenizer_identity((state.get("task_state") or {}).get("tokenizer"), data, f"{role} {path}", fix)
        # Built by the student's task: same dictionary, and no need for the teacher's own data dir.
        try:
            models, _cfg, _task = checkpoint_utils.load_model_ensemble_and_task([path], task=task, state=state)
        except DistillError:
            raise
        except Exception as e:  # an unregistered architecture, a missing or misshapen parameter
            raise DistillError(f"{role} {path} cannot be built from its checkpoint ({brief(e)}); it needs its "
                               f"architecture's plugins and intact weights: check {hint}") from None
        teacher = cls(models[0], path=os.path.abspath(path), sha256=sha256_file(path), dtype=dtype, device=device)
        teacher.trained_length = (state["cfg"].get("task") or {}).get("tokens_per_sample")
        n = sum(p.numel() for p in teacher.model.parameters())
        logger.info(f"{role} {path}: {n:,} parameters, {dtype}, sha256 {teacher.sha256[:12]}")
        return teacher

    @classmethod
    def load_hf_dir(cls, path: str, task, dtype: str = "fp32", device: Optional[str] = None,
                    role: str = "teacher") -> "Teacher":
        """A Hugging Face checkpoint directory as the teacher (``hf_causal_lm``: GPT-2 converted to
        native fairseq, other families wrapped); its tokenizer must be the data's, token for token."""
        from .hf.checkpoint_dir import sha256_dir
        from .models.hf_causal_lm import build_from_hf_dir

        model = build_from_hf_dir(path, task, role=role)
        teacher = cls(model, path=os.path.abspath(path), sha256=sha256_dir(path), dtype=dtype, device=device)
        n = sum(p.numel() for p in teacher.model.parameters())
        logger.info(f"{role} {path} (Hugging Face, {model.backend}): {n:,} parameters, {dtype}")
        return teacher

    def check_positions(self, needed: int, source: str) -> None:
        """Refuse a teacher with fewer positions than the ``needed`` tokens its inputs may have
        (``source`` names the options that set that length), before it fails on the first long batch."""
        positions = self.model.max_positions()
        positions = positions[0] if isinstance(positions, tuple) else positions
        if positions is None:
            return
        columns = int(positions) + int(getattr(getattr(self.model, "decoder", None), "reads_without_bos", False))
        if columns < needed:
            raise DistillError(f"teacher {self.path} has {int(positions)} positions, but sequences of up to {needed} "
                               f"tokens reach it ({source}); pass --tokens-per-sample {int(positions)} or a teacher "
                               "trained with more positions")

    def record(self) -> dict:
        return {"path": self.path, "sha256": self.sha256}

    @torch.no_grad()
    def logits(self, net_input: dict) -> torch.Tensor:
        """Teacher logits [B, T, V] for the student's ``net_input``, on the student's device."""
        return self._forward(net_input)

    @torch.no_grad()
    def projected_logits(self, net_input: dict, mask: torch.Tensor):
        """The teacher's logits at ``mask`` as ``chunked_divergences.ProjectedLogits`` (hidden
        states and output weight, on the student's device), for losses that make them a chunk at a
        time; None if its logits are more than that (``output_projection.fusable_output``)."""
        from .chunked_divergences import ProjectedLogits

        found = self.hidden_states(net_input)
        if found is None:
            return None
        hidden, out = found
        return ProjectedLogits(hidden[mask], out.weight, out.fixed)

    @torch.no_grad()
    def hidden_states(self, net_input: dict):
        """The teacher's last hidden states [B, T, d] (what its output layer reads) and its
        ``output_projection.FusedOutput`` (weight on the student's device), for losses that read
        them out themselves (dual-space KD); None if its logits are more than that."""
        from .output_projection import FusedOutput, fusable_output

        out = None if self.sharded else fusable_output(self.model)  # sharded: only this worker's rows
        if out is None:
            return None
        hidden = self._forward(net_input, features_only=True)
        return hidden, FusedOutput(out.weight.to(hidden.device), out.fixed)

    def rows(self, net_input: dict, mask: torch.Tensor, fused: bool):
        """The teacher side of a chunked loss at ``mask``: ``projected_logits`` when ``fused`` and the
        teacher allows it (rows made a chunk at a time), else its logits [N, V]."""
        projected = self.projected_logits(net_input, mask) if fused else None
        return projected if projected is not None else self.logits(net_input)[mask]

    def _forward(self, net_input: dict, **kwargs) -> torch.Tensor:
        src = net_input["src_tokens"]
        if self.device is None:
            first = next(self.model.parameters())
            if first.device != src.device:
                self.model.to(src.device)
        dev = next(self.model.parameters()).device
        inputs = {k: v.to(dev) if torch.is_tensor(v) else v for k, v in net_input.items()}
        # Autocast from the student's --amp/--bf16 must not re-cast the teacher: it has its own dtype.
        with torch.autocast(device_type=dev.type, enabled=False):
            out = self._run(**inputs, **kwargs)[0]
        if self.sharded:  # free the gathered embeddings/output layer too, not only the blocks
            self.model.reshard()
        return out.to(src.device)
