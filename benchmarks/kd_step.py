"""One KD training step, ours against the plain reference approach: tokens/s, step time, MFU, peak memory.

    python benchmarks/kd_step.py --device cpu --preset cpu-tiny --json step.json
    python benchmarks/kd_step.py --device cuda --preset gpt2-xl-base --json step.json

(a) ``ours``: fairseq's ``Trainer.train_step`` on our task (``instruction_distillation``) and
    criterion (``--criterion``, default ``kd``, with ``--kd-impl``), GPT-2-shaped fairseq models
    (``kd_gpt2_*``), Adam. The teacher is ``distill_plugins.teacher.Teacher`` (frozen, in
    ``--teacher-dtype``, no grad; ``--compile-teacher`` is the task's ``--teacher-compile``).
    ``--precision bf16``/``fp16`` is fairseq's ``--bf16``/``--fp16`` (half-precision student, fp32
    master weights).
(a') ``cached`` (``--run ours,cached,reference``): ``ours`` trained from an offline teacher cache of the
    same teacher (``--teacher-cache``, top ``--teacher-cache-k`` log-probs per token; built first with
    ``teacher_cache.CacheWriter`` as ``distill-cache-teacher`` does, and timed apart); its MFU counts
    the FLOPs the step does (6 P_student).
(a'') ``teacher`` and ``student`` (``--run ours,teacher,student,reference``): the parts of ``ours``, each
    timed alone with the same models and batch: the teacher's forward to its last hidden states (no
    grad, ``--teacher-dtype``; its output projection is done inside the fused loss and so counts in
    neither part) and the student's fairseq Trainer step without a teacher (``--criterion
    cross_entropy``: full logits). ``ours`` minus both is the KD loss with the teacher's projection
    plus what the step adds around them; the script prints that split.
(b) ``reference``: the step as the reference code writes it (DistiLLM/MiniLLM with HF models): the
    student and the fp32-weight teacher run under autocast(``--precision``), the teacher under
    ``torch.no_grad``; both [N, V] logits go through fp32 softmax / log_softmax, masked product and
    sum (forward KL), mixed with CE as (1 - r) CE + r KD over token means; AdamW. Models: HF
    ``GPT2LMHeadModel`` (``--reference-model hf``) or the same fairseq modules (``fairseq``);
    ``auto`` takes HF when ``transformers`` imports.

All tokens of the B x T batch are labels (N = B T). FLOPs per token: 6 P_student + 2 P_teacher
(P = parameter count); MFU divides by ``--peak-flops`` (790e12 on CUDA: H100 bf16) or, on CPU, by a
measured fp32 matmul rate per process CPU second (the step's rate is then per CPU second too).
``--profile FILE`` writes torch.profiler's table of the ``ours`` step (2 steps; by device time on CUDA,
by CPU time on CPU) after the timed steps.
Peak memory: ``torch.cuda.max_memory_allocated`` over the timed steps on CUDA; on CPU the bytes of
parameters, gradients and optimizer state before a step plus the torch profiler's peak of what
the step allocates (``measure.py``).
"""
import argparse
import gc
import logging
import os
import sys
import tempfile

import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import measure  # noqa: E402

USER_DIR = os.path.join(REPO, "distill_plugins")

# (layers, dim, heads)
SHAPES = {"nano": (1, 64, 2), "tiny": (2, 128, 2), "mini": (4, 256, 4), "base": (12, 768, 12),
          "medium": (24, 1024, 16), "large": (36, 1280, 20), "xl": (48, 1600, 25)}
PRESETS = {
    # name: teacher shape, student shape, vocab, sequence length, sequences per step
    "gpt2-xl-base": ("xl", "base", 50257, 512, 32),
    "cpu-small": ("mini", "tiny", 8192, 256, 8),
    "cpu-tiny": ("tiny", "nano", 1024, 64, 4),
}

RUNS = ("ours", "cached", "teacher", "student", "reference")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu-tiny")
    ap.add_argument("--teacher", help="teacher shape: a name of " + ",".join(SHAPES) + " or LAYERS,DIM,HEADS")
    ap.add_argument("--student", help="student shape, as --teacher")
    ap.add_argument("--vocab", type=int)
    ap.add_argument("--seq-len", type=int)
    ap.add_argument("--batch", type=int, help="sequences per step")
    ap.add_argument("--precision", choices=["fp32", "bf16", "fp16"],
                    help="student precision (default bf16 on cuda, fp32 on cpu)")
    ap.add_argument("--teacher-dtype", choices=["fp32", "bf16", "fp16"],
                    help="our teacher's dtype (default: --precision); the reference keeps fp32 weights under autocast")
    ap.add_argument("--criterion", default="kd", help="our criterion (default kd = forward KL)")
    ap.add_argument("--kd-impl", choices=["plain", "chunked", "fused"], help="ours (default: the criterion's)")
    ap.add_argument("--kd-chunk-size", type=int)
    ap.add_argument("--kd-ratio", type=float, default=0.5)
    ap.add_argument("--kd-compile", action="store_true", help="ours: --kd-compile (torch.compile the forward-KL chunk kernel)")
    ap.add_argument("--compile-teacher", action="store_true", help="torch.compile our teacher's model")
    ap.add_argument("--teacher-cache-k", type=int, default=64,
                    help="run 'cached': top-K log-probs per token in the teacher cache (the vocabulary size: exact)")
    ap.add_argument("--reference-model", choices=["auto", "hf", "fairseq"], default="auto")
    ap.add_argument("--run", default="ours,reference",
                    help="steps to measure, of " + ",".join(RUNS) + " (cached: ours trained from an offline teacher "
                         "cache, --teacher-cache, built first from the same teacher and timed apart; teacher, "
                         "student: the two parts of ours, each timed alone)")
    ap.add_argument("--profile", metavar="FILE", help="write torch.profiler's table of 2 'ours' steps here")
    ap.add_argument("--warmup", type=int, help="untimed steps first (default 3 on cuda, 1 on cpu)")
    ap.add_argument("--steps", type=int, help="timed steps (default 10 on cuda, 2 on cpu)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--peak-flops", type=float, help="MFU denominator (default 790e12 on cuda, measured on cpu)")
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    t, s, v, seq, b = PRESETS[args.preset]
    args.teacher = parse_shape(ap, args.teacher or t)
    args.student = parse_shape(ap, args.student or s)
    args.vocab, args.seq_len, args.batch = args.vocab or v, args.seq_len or seq, args.batch or b
    args.precision = args.precision or ("bf16" if args.device == "cuda" else "fp32")
    args.teacher_dtype = args.teacher_dtype or args.precision
    cuda = args.device == "cuda"
    args.warmup = (3 if cuda else 1) if args.warmup is None else args.warmup
    args.steps = (10 if cuda else 2) if args.steps is None else args.steps
    args.run = [x.strip() for x in args.run.split(",") if x.strip()]
    if not args.run or any(x not in RUNS for x in args.run):
        ap.error("--run takes a comma-separated list of " + ", ".join(RUNS))
    if args.profile and "ours" not in args.run:
        ap.error("--profile profiles the 'ours' step: add ours to --run")
    if not 1 <= args.teacher_cache_k <= args.vocab:
        ap.error(f"--teacher-cache-k must be in [1, --vocab {args.vocab}]")
    if args.vocab < 8 or args.seq_len < 2 or args.batch < 1 or args.steps < 1 or args.warmup < 0:
        ap.error("--vocab >= 8, --seq-len >= 2, --batch >= 1, --steps >= 1 and --warmup >= 0 are needed")
    if args.seq_len > 1024:
        ap.error("--seq-len must be <= 1024 (the models' positions)")
    if args.precision == "fp16" and not cuda:
        ap.error("--precision fp16 needs --device cuda (fairseq's --fp16 is CUDA only)")
    return args


def parse_shape(ap, text):
    if text in SHAPES:
        return SHAPES[text]
    try:
        layers, dim, heads = (int(x) for x in text.split(","))
    except ValueError:
        ap.error(f"shape {text!r}: give one of {', '.join(SHAPES)} or LAYERS,DIM,HEADS, e.g. 2,128,2")
    if dim % heads:
        ap.error(f"shape {text!r}: DIM must be a multiple of HEADS")
    return layers, dim, heads


def make_batch(args, device):
    g = torch.Generator().manual_seed(args.seed)
    tokens = torch.randint(4, args.vocab, (args.batch, args.seq_len + 1), generator=g)
    return tokens[:, :-1].to(device), tokens[:, 1:].contiguous().to(device)


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def tensor_bytes(*roots) -> int:
    """Bytes of the distinct tensors reachable from ``roots`` (modules, optimizers, dicts, lists)."""
    seen, total = set(), 0
    stack = list(roots)
    while stack:
        obj = stack.pop()
        if torch.is_tensor(obj):
            tensors = [obj] + ([obj.grad] if obj.grad is not None else [])
            for t in tensors:
                key = (t.device, t.untyped_storage().data_ptr())
                if key not in seen:
                    seen.add(key)
                    total += t.untyped_storage().nbytes()
        elif isinstance(obj, torch.nn.Module):
            stack.extend(obj.parameters())
            stack.extend(obj.buffers())
        elif isinstance(obj, torch.optim.Optimizer):
            stack.extend(obj.state.values())
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple)):
            stack.extend(obj)
    return total


# -- (a) ours -------------------------------------------------------------------------------------
def fairseq_args(args, data_dir, shape, device, extra=()):
    layers, dim, heads = shape
    argv = [
        data_dir, "--user-dir", USER_DIR, "--task", "instruction_distillation",
        "--arch", "kd_gpt2_tiny", "--decoder-layers", str(layers), "--decoder-embed-dim", str(dim),
        "--decoder-ffn-embed-dim", str(4 * dim), "--decoder-attention-heads", str(heads),
        "--tokens-per-sample", str(args.seq_len), "--max-tokens", str(args.batch * args.seq_len),
        "--optimizer", "adam", "--lr", str(args.lr), "--seed", str(args.seed), "--num-workers", "0",
        "--teacher-dtype", args.teacher_dtype,
    ]
    if device.type == "cpu":
        argv.append("--cpu")
    if args.precision == "bf16":
        argv.append("--bf16")
    elif args.precision == "fp16":
        argv.append("--fp16")
    return argv + list(extra)


def parse_fairseq(argv):
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    parser = options.get_training_parser()
    ns = options.parse_args_and_arch(parser, input_args=argv)
    ns.tpu = False  # fairseq 0.12.3 sets tpu for --bf16 (fairseq_notes.md); distill-train does the same
    return convert_namespace_to_omegaconf(ns)


def build_cached(args, device, data_dir):
    return build_ours(args, device, data_dir, cached=True)


def make_sample(args, device):
    src, tgt = make_batch(args, device)
    return {
        "id": torch.arange(args.batch, device=device), "nsentences": args.batch, "ntokens": src.numel(),
        "net_input": {"src_tokens": src, "src_lengths": torch.full((args.batch,), args.seq_len, device=device)},
        "target": tgt,
    }


def make_teacher(args, task, data_dir, device):
    from distill_plugins.teacher import Teacher

    teacher_cfg = parse_fairseq(fairseq_args(args, data_dir, args.teacher, device))
    teacher = Teacher(task.build_model(teacher_cfg.model), path="(random init)", sha256="-",
                      dtype=args.teacher_dtype, device=str(device))
    if args.compile_teacher:
        teacher.compile()  # what --teacher-compile does in the task
    return teacher


def trainer_step(cfg, task, model, criterion, sample, *also):
    """(step, state_bytes) of fairseq's ``Trainer.train_step`` on ``sample``: state_bytes counts the
    model, ``also`` (e.g. the teacher) and the optimizer's state, fp32 master weights included."""
    from fairseq.trainer import Trainer

    trainer = Trainer(cfg, task, model, criterion)
    # on CUDA, train_step resets the peak-memory counter after every update (for its gb_free log line,
    # the only use of cuda_env): the timed steps' peak would then miss the activations
    trainer.cuda_env = None

    def step():
        trainer.train_step([sample])
        # gradients live within a step only, as in the reference (zero_grad(set_to_none=True)): fairseq
        # would drop them at the next step's start, a free the CPU memory probe cannot see (it began
        # before the probe), so they counted twice (in state_bytes and as the step's new allocation)
        trainer.zero_grad()

    def state_bytes():
        opt = trainer.optimizer
        return tensor_bytes(model, *also, opt.optimizer, getattr(opt, "fp32_params", None),
                            getattr(getattr(opt, "fp32_optimizer", None), "optimizer", None))

    return step, state_bytes


def build_ours(args, device, data_dir, cached=False):
    from fairseq import tasks

    extra = ["--criterion", args.criterion, "--kd-ratio", str(args.kd_ratio)]
    if args.kd_impl:
        extra += ["--kd-impl", args.kd_impl]
    if args.kd_chunk_size:
        extra += ["--kd-chunk-size", str(args.kd_chunk_size)]
    if args.kd_compile:
        extra += ["--kd-compile"]
    cfg = parse_fairseq(fairseq_args(args, data_dir, args.student, device, extra))
    task = tasks.setup_task(cfg.task)
    teacher = make_teacher(args, task, data_dir, device)
    sample = make_sample(args, device)
    cache_info = {}
    p_teacher = count_params(teacher.model)
    if cached:  # what distill-cache-teacher does, on the benchmark's batch
        cache_info = build_teacher_cache(args, task, teacher, sample, os.path.join(data_dir, "teacher-cache"), device)
        del teacher
        from distill_plugins.teacher_cache import CachedTeacher

        teacher = CachedTeacher(os.path.join(data_dir, "teacher-cache"), task)
    task.teachers = [teacher]
    model = task.build_model(cfg.model)
    criterion = task.build_criterion(cfg.criterion)
    step, state_bytes = trainer_step(cfg, task, model, criterion, sample, getattr(teacher, "model", None))
    info = {"kd_impl": str(criterion.cfg.kd_impl), "kd_chunk_size": criterion.cfg.kd_chunk_size,
            "criterion": args.criterion, "teacher_dtype": args.teacher_dtype,
            "compile_teacher": args.compile_teacher, "kd_compile": args.kd_compile, "precision": args.precision,
            "teacher_in_step": not cached, **cache_info}
    return step, state_bytes, count_params(model), p_teacher, info


def build_teacher_part(args, device, data_dir):
    """The teacher's part of ``ours`` alone: its forward to the hidden states at the label positions
    (``Teacher.rows`` with the fused projection, as the criterion calls it), under no grad."""
    from fairseq import tasks

    task = tasks.setup_task(parse_fairseq(fairseq_args(args, data_dir, args.student, device)).task)
    teacher = make_teacher(args, task, data_dir, device)
    sample = make_sample(args, device)
    mask = sample["target"].ne(task.dictionary.pad())

    def step():
        with torch.no_grad():
            return teacher.rows(sample["net_input"], mask, True)

    p_teacher = count_params(teacher.model)
    embeddings = sum(p.numel() for n, p in teacher.model.named_parameters()
                     if "embed_tokens" in n or "embed_positions" in n)
    info = {"teacher_dtype": args.teacher_dtype, "compile_teacher": args.compile_teacher,
            "flops_per_token": 2 * (p_teacher - embeddings)}  # the output projection runs in the loss
    return step, lambda: tensor_bytes(teacher.model), 0, p_teacher, info


def build_student_part(args, device, data_dir):
    """The student's part of ``ours`` alone: the same fairseq Trainer step with no teacher
    (``--criterion cross_entropy``, fairseq's own: full [N, V] logits)."""
    from fairseq import tasks

    cfg = parse_fairseq(fairseq_args(args, data_dir, args.student, device, ["--criterion", "cross_entropy"]))
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    step, state_bytes = trainer_step(cfg, task, model, task.build_criterion(cfg.criterion), make_sample(args, device))
    return step, state_bytes, count_params(model), 0, {"criterion": "cross_entropy", "precision": args.precision}


def build_teacher_cache(args, task, teacher, sample, out, device):
    """The cache of the batch's teacher rows (``teacher_cache.CacheWriter``, as distill-cache-teacher),
    and the time of its teacher pass (inference mode, fused projection, top-k)."""
    from distill_plugins.teacher import dictionary_fingerprint
    from distill_plugins.teacher_cache import CacheWriter, batch_keys

    pad = task.dictionary.pad()
    mask = sample["target"].ne(pad)
    os.makedirs(out)
    counts = dict.fromkeys(batch_keys(sample["net_input"]["src_tokens"], mask, pad), args.seq_len)
    writer = CacheWriter(out, counts, args.teacher_cache_k, args.vocab, "fp16")

    def teacher_pass():
        with torch.inference_mode():
            writer.write(sample["net_input"]["src_tokens"], mask, pad, teacher.rows(sample["net_input"], mask, True))

    teacher_pass()  # warm-up
    wall, _cpu = measure.time_call(teacher_pass, device, warmup=0, repeats=1)
    writer.finish({"teacher": teacher.record(), "dictionary": dictionary_fingerprint(task.dictionary),
                   "tokens_per_sample": args.seq_len})
    return {"teacher_cache_k": args.teacher_cache_k, "cache_build_s": wall,
            "cache_build_tokens_per_s": mask.sum().item() / wall}


# -- (b) reference --------------------------------------------------------------------------------
def reference_kd_loss(student_logits, teacher_logits, labels, kd_ratio):
    """DistiLLM's forward KL mixed with CE, token means: full fp32 softmax / log_softmax."""
    p = torch.softmax(teacher_logits, dim=-1, dtype=torch.float32)
    log_q = torch.log_softmax(student_logits, dim=-1, dtype=torch.float32)
    per_token = (p * log_q).masked_fill(torch.isinf(student_logits), 0.0).sum(-1)
    kd = -per_token.mean()
    ce = F.cross_entropy(student_logits.float().view(-1, student_logits.size(-1)), labels.view(-1))
    return (1.0 - kd_ratio) * ce + kd_ratio * kd


def reference_models(args, device, data_dir):
    kind = args.reference_model
    if kind == "auto":
        try:
            import transformers  # noqa: F401
            kind = "hf"
        except ImportError:
            kind = "fairseq"
    if kind == "hf":
        from transformers import GPT2Config, GPT2LMHeadModel

        def build(shape):
            layers, dim, heads = shape
            cfg = GPT2Config(vocab_size=args.vocab, n_positions=1024, n_embd=dim, n_layer=layers, n_head=heads,
                             bos_token_id=args.vocab - 1, eos_token_id=args.vocab - 1)
            model = GPT2LMHeadModel(cfg).to(device)
            return model, lambda x: model(input_ids=x).logits
    else:
        from fairseq import tasks

        def build(shape):
            cfg = parse_fairseq(fairseq_args(args, data_dir, shape, torch.device("cpu")))
            model = tasks.setup_task(cfg.task).build_model(cfg.model).to(device)
            return model, lambda x: model(x)[0]
    return kind, build


def build_reference(args, device, data_dir):
    kind, build = reference_models(args, device, data_dir)
    torch.manual_seed(args.seed)
    teacher, teacher_fwd = build(args.teacher)
    teacher.eval().requires_grad_(False)
    student, student_fwd = build(args.student)
    student.train()
    cuda = device.type == "cuda"
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr, fused=cuda)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
    scaler = torch.amp.GradScaler("cuda", enabled=args.precision == "fp16")
    src, tgt = make_batch(args, device)

    def step():
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            with torch.no_grad():
                t_logits = teacher_fwd(src)
            s_logits = student_fwd(src)
        loss = reference_kd_loss(s_logits, t_logits, tgt, args.kd_ratio)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    info = {"model": kind, "precision": f"autocast {args.precision}" if amp_dtype else "fp32",
            "teacher_dtype": "fp32 weights" + (f" under autocast {args.precision}" if amp_dtype else "")}
    return step, lambda: tensor_bytes(student, teacher, opt), count_params(student), count_params(teacher), info


# -- measurement ----------------------------------------------------------------------------------
def measure_step(name, builder, args, device, data_dir, peak_flops):
    gc.collect()
    allocated_before = 0
    if device.type == "cuda":
        torch.cuda.empty_cache()
        allocated_before = torch.cuda.memory_allocated(device)  # should be ~0: the other run was freed
    torch.manual_seed(args.seed)
    step, state_bytes, p_student, p_teacher, info = builder(args, device, data_dir)
    tokens = args.batch * args.seq_len
    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    wall, cpu = measure.time_call(step, device, warmup=0, repeats=args.steps)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = state_bytes() + measure.peak_extra_bytes(step, device)
    if name == "ours" and args.profile:
        print(f"ours, torch.profiler (2 steps, written to {args.profile}):\n"
              + measure.profile_table(step, device, 2, args.profile, rows=25), flush=True)
    flops_per_token = info.pop("flops_per_token", None) or (
        6 * p_student + (2 * p_teacher if info.get("teacher_in_step", True) else 0))
    seconds = wall if device.type == "cuda" else cpu
    result = {
        **info,
        "student_params": p_student, "teacher_params": p_teacher, "tokens": tokens,
        "step_s": wall, "cpu_s": cpu, "tokens_per_s": tokens / wall,
        "mfu": tokens * flops_per_token / seconds / peak_flops,
        "peak_gib": peak / measure.GiB,
        "allocated_before_build_gib": allocated_before / measure.GiB,
    }
    del step, state_bytes
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def write_dictionary(path, vocab):
    # fairseq's Dictionary adds <s>, <pad>, </s>, <unk>: vocab - 4 symbols make it ``vocab`` long
    with open(os.path.join(path, "dict.src.txt"), "w") as f:
        for i in range(vocab - 4):
            f.write(f"w{i} 1\n")


def main(argv=None):
    args = parse_args(argv)
    device = measure.device_of(args.device)
    logging.getLogger("fairseq").setLevel(logging.WARNING)
    logging.getLogger("distill_plugins").setLevel(logging.WARNING)
    logging.getLogger("filelock").setLevel(logging.WARNING)  # torch.compile's cache locks, at DEBUG otherwise
    peak_flops = args.peak_flops or measure.DEFAULT_PEAK_FLOPS.get(device.type) or measure.matmul_rate(device)
    results = {}
    with tempfile.TemporaryDirectory() as data_dir:
        write_dictionary(data_dir, args.vocab)
        builders = {"ours": build_ours, "cached": build_cached, "teacher": build_teacher_part,
                    "student": build_student_part, "reference": build_reference}
        for name in args.run:
            results[name] = measure_step(name, builders[name], args, device, data_dir, peak_flops)
    ratios = {}
    if "reference" in results:
        r = results["reference"]
        for name, o in results.items():
            if name in ("ours", "cached"):  # the parts (teacher, student) are not a KD step
                ratios.update({f"tokens_per_s {name}/reference": o["tokens_per_s"] / r["tokens_per_s"],
                               f"step_s {name}/reference": o["step_s"] / r["step_s"],
                               f"cpu_s {name}/reference": o["cpu_s"] / r["cpu_s"],
                               f"mfu {name}/reference": o["mfu"] / r["mfu"],
                               f"peak_memory {name}/reference": o["peak_gib"] / r["peak_gib"]})
    out = {
        "benchmark": "kd_step",
        "config": {"preset": args.preset, "teacher": args.teacher, "student": args.student, "vocab": args.vocab,
                   "seq_len": args.seq_len, "batch": args.batch, "tokens": args.batch * args.seq_len,
                   "precision": args.precision, "kd_ratio": args.kd_ratio, "warmup": args.warmup,
                   "steps": args.steps},
        "machine": {**measure.environment(device), "peak_flops": peak_flops,
                    "mfu_basis": "wall time vs --peak-flops" if device.type == "cuda"
                    else "process CPU time vs measured fp32 matmul FLOP per CPU second",
                    "memory_method": "torch.cuda.max_memory_allocated" if device.type == "cuda"
                    else "state tensors + " + measure.MEMORY_METHOD["cpu"]},
        "results": results,
        "ratios": ratios,
    }
    t, s = args.teacher, args.student
    print(f"KD training step: teacher {t} -> student {s} (layers, dim, heads), V={args.vocab}, "
          f"{args.batch} x {args.seq_len} tokens, {args.precision}, on {device}\n")
    rows = [{"run": k, "setup": describe(k, v), **v} for k, v in results.items()]
    print(measure.markdown_table(rows, [
        ("run", "run", None), ("setup", "setup", None), ("tokens/s", "tokens_per_s", "{:,.0f}"),
        ("step s", "step_s", "{:.3f}"), ("process CPU s", "cpu_s", "{:.3f}"), ("MFU", "mfu", "{:.1%}"),
        ("peak GiB", "peak_gib", "{:.3f}"),
    ]))
    if ratios:
        print("\n" + "\n".join(f"{k}: {val:.3f}" for k, val in ratios.items()))
    if "cached" in results:
        c = results["cached"]
        print(f"\ncached: building the cache for these tokens took {c['cache_build_s']:.3f} s "
              f"({c['cache_build_tokens_per_s']:,.0f} tokens/s: teacher forward, top-{c['teacher_cache_k']}, write), "
              "once per example and not per epoch or run; the cached step does no teacher forward "
              "(its MFU counts the student's 6N only)")
    if {"ours", "teacher", "student"} <= set(results):
        o, t_, s_ = (results[k]["step_s"] for k in ("ours", "teacher", "student"))
        rest = o - t_ - s_
        out["split"] = {"teacher_forward_s": t_, "student_step_s": s_, "rest_s": rest}
        print(f"\nsplit of ours' {o:.3f} s step: teacher forward {t_:.3f} s ({t_ / o:.0%}), student step with "
              f"fairseq's cross_entropy {s_:.3f} s ({s_ / o:.0%}), the rest {rest:.3f} s ({rest / o:.0%}: the KD loss "
              "with the teacher's output projection, less the student's CE, plus what the step adds around them)")
    measure.write_json(args.json, out)
    return out


def describe(name, r):
    if name == "teacher":
        return (f"ours' teacher alone: forward to the hidden states, {r['teacher_dtype']}"
                + (" compiled" if r.get("compile_teacher") else "") + ", no grad (projection in the loss)")
    if name == "student":
        return f"ours' student alone: fairseq Trainer, --criterion cross_entropy, {r['precision']}, no teacher"
    if name in ("ours", "cached"):
        return (f"fairseq Trainer, --criterion {r['criterion']} --kd-impl {r['kd_impl']}"
                + (" --kd-compile" if r.get("kd_compile") else "") + f", teacher {r['teacher_dtype']}"
                + (" compiled" if r.get("compile_teacher") else "")
                + (f", from a top-{r['teacher_cache_k']} teacher cache (no teacher forward)" if r.get("teacher_cache_k")
                   else ""))
    return f"{r['model']} models, {r['precision']}, full fp32 logits"


if __name__ == "__main__":
    main()
