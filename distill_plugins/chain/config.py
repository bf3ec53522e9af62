"""The chain file: shared data and defaults, and the stages in order.

```yaml
name: takd                      # outputs go to checkpoints/<name>/<stage>/ (or output_dir)
data: data-bin/dolly            # made by distill-prepare; relative paths are relative to this file
defaults: {optimizer: adam, lr: 5e-4, max-tokens: 2048}   # fairseq-train options of every stage
stages:
  - {name: teacher, arch: kd_gpt2_mini, args: {criterion: cross_entropy, max-update: 300}}
  - {name: assistant, arch: kd_gpt2_mini, teacher: teacher, args: {criterion: kd, decoder-layers: 2}}
  - {name: student, arch: kd_gpt2_tiny, teacher: assistant, args: {criterion: kd}}
```

A stage is trained, or ``pretrained`` (a checkpoint trained elsewhere, e.g. a teacher from
``distill-prepare`` + fairseq-train or an imported HF model: it is never trained, only hashed, and
its students retrain when the file changes). A trained stage gives ``arch`` and/or ``init`` (a checkpoint passed as ``--finetune-from-model``; without
``arch``, the checkpoint's architecture and decoder shape are used), ``teacher`` (a stage name, or a
list of names for multi-teacher criterions; absent for the first, supervised stage), ``args`` (its
fairseq-train options, overriding ``defaults``) and ``checkpoint`` (``best``, the default, or
``last``: which checkpoint the stages it teaches use). Option values: a scalar, ``true`` for a bare
flag, ``false``/``null`` to leave it out, or a list (passed comma-separated, as fairseq expects).

``evaluate:`` (optional; ``true`` or a mapping of distill-evaluate options such as ``seeds: [10, 20]``)
scores every stage's selected checkpoint with distill-evaluate (Rouge-L on the data's test.jsonl by
the MiniLLM protocol) and records it in the manifest; a score is reused while the checkpoint's
sha256 and the options are unchanged.
"""
import contextlib
import io
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import yaml

from ..errors import DistillError, check, not_utf8
from ..staged_directory import is_within

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
TOP_KEYS = ("name", "data", "output_dir", "defaults", "stages", "evaluate")
STAGE_KEYS = ("name", "arch", "init", "teacher", "args", "checkpoint", "pretrained")
# set by the chain itself when it runs distill-evaluate
MANAGED_EVAL_OPTIONS = ("data", "json", "md", "name", "responses", "no-progress", "overwrite")
# set by the chain itself: the stage's directory, teachers and initial checkpoint
MANAGED_OPTIONS = {
    "save-dir": "the chain puts each stage in <output_dir>/<stage>",
    "teacher-path": "use the stage's teacher: key",
    "finetune-from-model": "use the stage's init: key",
    "restore-file": "the chain resumes from checkpoint_last.pt itself; use init: to start from a checkpoint",
    "user-dir": "the chain always passes --user-dir distill_plugins",
    "arch": "use the stage's arch: key",
    "data": "use the chain's data: key",
}
SHAPE_OPTIONS = ("decoder_layers", "decoder_embed_dim", "decoder_ffn_embed_dim", "decoder_attention_heads")


@dataclass
class StageSpec:
    name: str
    arch: str
    args: Dict[str, Any]  # option name without dashes (hyphenated) -> value; defaults merged in
    teachers: List[str] = field(default_factory=list)
    init: Optional[str] = None  # absolute path
    checkpoint: str = "best"
    pretrained: Optional[str] = None  # absolute path of an externally trained checkpoint: never trained

    @property
    def criterion(self) -> str:
        return str(self.args.get("criterion", "cross_entropy"))


@dataclass
class ChainConfig:
    name: str
    path: str  # the chain file, absolute
    data: str  # absolute
    output_dir: str  # absolute: holds manifest.json and one directory per stage
    stages: List[StageSpec]  # in training order: every teacher before its students
    evaluate: Optional[Dict[str, Any]] = None  # distill-evaluate options; None: no evaluation

    def stage(self, name: str) -> StageSpec:
        return next(s for s in self.stages if s.name == name)

    def save_dir(self, stage: StageSpec) -> str:
        return os.path.join(self.output_dir, stage.name)

    def checkpoint_path(self, stage: StageSpec) -> str:
        if stage.pretrained:
            return stage.pretrained
        return os.path.join(self.save_dir(stage), f"checkpoint_{stage.checkpoint}.pt")


def option_name(key: Any) -> str:
    return str(key).lstrip("-").replace("_", "-")


def normalize_options(options: Any, where: str) -> Dict[str, Any]:
    if options is None:
        return {}
    check(isinstance(options, dict), f"{where} must be a mapping of fairseq-train options, e.g. {{lr: 1e-3}}")
    out = {}
    for key, value in options.items():
        name = option_name(key)
        check(name not in MANAGED_OPTIONS, f"{where} sets --{name}: {MANAGED_OPTIONS.get(name)}")
        check(
            value is None or isinstance(value, (str, int, float, bool, list)),
            f"{where}: --{name} must be a scalar, true/false or a list, got {type(value).__name__}",
        )
        if isinstance(value, list):  # fairseq takes lists as comma-separated strings (--lr, --update-freq...)
            check(all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in value),
                  f"{where}: --{name} lists must hold scalars")
            value = ",".join(str(v) for v in value)
        out[name] = value
    return out


def _resolve(base: str, path: str) -> str:
    return os.path.abspath(os.path.join(base, os.path.expanduser(str(path))))


def _teachers(raw: Any, where: str) -> List[str]:
    if raw is None:
        return []
    names = [raw] if isinstance(raw, str) else raw
    check(isinstance(names, list) and names and all(isinstance(n, str) for n in names),
          f"{where}: teacher must be a stage name or a list of stage names")
    check(len(set(names)) == len(names), f"{where}: teacher lists a stage twice")
    return list(names)


def arch_of_checkpoint(path: str) -> Dict[str, Any]:
    """Architecture and decoder shape recorded in a fairseq checkpoint (read memory-mapped)."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        model = state["cfg"]["model"]
        arch = model.get("_name") or model["arch"]
    except Exception as e:
        raise DistillError(f"{path} is not a fairseq checkpoint (no readable model config: {type(e).__name__}); pass a "
                           "checkpoint_*.pt that fairseq-train wrote") from None
    return {"arch": arch, **{option_name(k): model[k] for k in SHAPE_OPTIONS if model.get(k) is not None}}


def find_cycle(edges: Dict[str, List[str]]) -> Optional[List[str]]:
    """A cycle in the stage -> teacher graph, as a list of names (first == last), or None."""
    state: Dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: List[str] = []

    def visit(node: str) -> Optional[List[str]]:
        state[node] = 1
        path.append(node)
        for nxt in edges[node]:
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in edges:
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def training_order(stages: List[StageSpec]) -> List[StageSpec]:
    """Teachers before their students, otherwise the file's order (stable topological sort)."""
    done, order = set(), []
    while len(order) < len(stages):
        for s in stages:
            if s.name not in done and all(t in done for t in s.teachers):
                order.append(s)
                done.add(s.name)
                break
    return order


def load_chain(path: str, output_dir: Optional[str] = None) -> ChainConfig:
    """Read and validate a chain file (paths in it are relative to its directory)."""
    if not os.path.isfile(path):
        raise DistillError(f"chain file {path} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)  # JSON is YAML too
    except UnicodeDecodeError:
        raise not_utf8(f"chain file {path}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise DistillError(f"chain file {path} is not valid YAML/JSON{where}: {getattr(e, 'problem', e)}") from None
    check(isinstance(raw, dict), f"chain file {path} must be a mapping with keys {', '.join(TOP_KEYS)}")
    unknown = sorted(set(raw) - set(TOP_KEYS))
    check(not unknown, f"chain file has unknown key(s) {', '.join(map(str, unknown))}; allowed: {', '.join(TOP_KEYS)}")
    base = os.path.dirname(os.path.abspath(path))

    name = raw.get("name")
    check(isinstance(name, str) and NAME.match(name) is not None,
          "chain file needs a name: (letters, digits, '_', '.', '-'); it names the output directory")
    check(raw.get("data") is not None, "chain file needs data: (a directory made by distill-prepare)")
    data = _resolve(base, raw["data"])
    check(os.path.isfile(os.path.join(data, "dict.src.txt")),
          f"data directory {data} has no dict.src.txt; prepare it with distill-prepare")
    defaults = normalize_options(raw.get("defaults"), "defaults")

    raw_stages = raw.get("stages")
    check(isinstance(raw_stages, list) and raw_stages, "chain file needs stages: a non-empty list")
    stages, seen = [], set()
    for i, rs in enumerate(raw_stages):
        check(isinstance(rs, dict), f"stage {i + 1} must be a mapping with keys {', '.join(STAGE_KEYS)}")
        sname = rs.get("name")
        check(isinstance(sname, str) and NAME.match(sname) is not None,
              f"stage {i + 1} needs a name: (letters, digits, '_', '.', '-')")
        where = f"stage {sname!r}"
        check(not sname.endswith(".stale") and sname != "manifest.json",
              f"{where}: a stage may not be named manifest.json or end in .stale (the chain's own files: its record, "
              "and a retrained stage's old outputs); rename it")
        check(sname not in seen, f"two stages are named {sname!r}; stage names must be unique")
        seen.add(sname)
        unknown = sorted(set(rs) - set(STAGE_KEYS))
        check(not unknown, f"{where} has unknown key(s) {', '.join(map(str, unknown))}; allowed: {', '.join(STAGE_KEYS)}")
        if rs.get("pretrained") is not None:
            stages.append(_pretrained_stage(rs, sname, base))
            continue
        args = dict(defaults)
        args.update(normalize_options(rs.get("args"), f"{where} args"))
        init = None
        if rs.get("init") is not None:
            init = _resolve(base, rs["init"])
            check(os.path.isfile(init), f"{where}: init checkpoint {init} does not exist")
        arch = rs.get("arch")
        recorded = arch_of_checkpoint(init) if init is not None else None  # readable, also beside an arch:
        if arch is None:
            check(init is not None, f"{where} needs an arch: (e.g. kd_gpt2_tiny) or an init: checkpoint")
            arch = recorded.pop("arch")
            for key, value in recorded.items():
                args.setdefault(key, value)
        selected = rs.get("checkpoint", "best")
        check(selected in ("best", "last"), f"{where}: checkpoint must be best or last, got {selected!r}")
        stages.append(StageSpec(sname, str(arch), args, _teachers(rs.get("teacher"), where), init, selected))

    names = [s.name for s in stages]
    for s in stages:
        for t in s.teachers:
            check(t in names, f"stage {s.name!r} names teacher {t!r}, which is not a stage; stages: {', '.join(names)}")
    cycle = find_cycle({s.name: s.teachers for s in stages})
    if cycle:
        raise DistillError(f"stages form a cycle: {' -> '.join(cycle)}; a stage's teacher must be trained before it")

    out = os.path.abspath(output_dir) if output_dir else (
        _resolve(base, raw["output_dir"]) if raw.get("output_dir") else os.path.abspath(os.path.join("checkpoints", name))
    )
    check(not is_within(out, data), f"output directory {out} is inside the data directory {data}: the stages' "
                                    "checkpoints would change the data's fingerprint and retrain every stage on every "
                                    "run; pass an --output-dir outside it")
    chain = ChainConfig(name, os.path.abspath(path), data, out, training_order(stages),
                        _evaluate_options(raw.get("evaluate"), base, data))
    from .stage_options import check_stage_options

    check_stage_options(chain)
    return chain


def _pretrained_stage(rs: dict, name: str, base: str) -> StageSpec:
    """A stage holding a checkpoint trained outside the chain: only ``name`` and ``pretrained``."""
    where = f"stage {name!r}"
    extra = sorted(k for k in rs if k not in ("name", "pretrained"))
    check(not extra, f"{where} is pretrained: it is not trained, so it takes no {', '.join(extra)}; "
                     "remove them or drop pretrained: to train the stage")
    path = _resolve(base, rs["pretrained"])
    check(os.path.isfile(path), f"{where}: pretrained checkpoint {path} does not exist")
    return StageSpec(name, arch_of_checkpoint(path)["arch"], {}, pretrained=path)


def _evaluate_options(raw: Any, base: str, data: str) -> Optional[Dict[str, Any]]:
    """``evaluate:`` -> distill-evaluate options (checked by its own parser), or None when off;
    ``eval-files`` relative to the chain file's directory ``base``, and every file it reads present."""
    if raw is None or raw is False:
        return None
    options = {} if raw is True else raw
    check(isinstance(options, dict), "evaluate: must be true or a mapping of distill-evaluate options, e.g. {seeds: [10]}")
    out = {}
    for key, value in options.items():
        name = option_name(key)
        check(name not in MANAGED_EVAL_OPTIONS, f"evaluate: sets --{name}, which the chain sets itself")
        out[name] = value
    from ..cli.evaluate import check_values, get_parser

    parsed = []
    error = parser_error(lambda: parsed.append(get_parser().parse_args(["checkpoint.pt", "--data", "data"] + option_argv(out))))
    check(not error, f"evaluate: distill-evaluate rejects the options: {error}")
    try:
        check_values(parsed[0])  # values too (--top-p 2), not only names and types: before any stage trains
    except DistillError as e:
        raise DistillError(f"evaluate: distill-evaluate rejects the options: {e.message}") from None
    if parsed[0].eval_files:
        out["eval-files"] = [_resolve(base, f) for f in parsed[0].eval_files]
        files = out["eval-files"]
    else:
        files = [os.path.join(data, f"{parsed[0].split}.jsonl")]
    for f in files:
        check(os.path.isfile(f), f"evaluate: {f} does not exist; eval-files are relative to the chain file, "
                                 "and without them the data directory's <split>.jsonl is read")
    return out


def parser_error(parse) -> Optional[str]:
    """Run an argparse ``parse()``; its error message (one line, without the usage) or None."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            parse()
    except SystemExit:
        lines = [ln for ln in err.getvalue().strip().splitlines() if ln.strip()]
        return lines[-1].split("error: ", 1)[-1] if lines else "invalid options"
    return None


def option_argv(options: Dict[str, Any]) -> List[str]:
    """Options -> argv: ``true`` a bare flag, ``false``/``null`` left out, a list space-separated
    (``--seeds 10 20``; fairseq-train options arrive here with lists already comma-joined)."""
    argv = []
    for name, value in options.items():
        if value is None or value is False:
            continue
        argv.append(f"--{name}")
        if isinstance(value, list):
            argv += [str(v) for v in value]
        elif value is not True:
            argv.append(str(value))
    return argv
