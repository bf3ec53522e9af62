#!/usr/bin/env bash
# Cross-tokenizer KD on the bundled Dolly subset (CPU, about 25 minutes): teacher and student have
# different SentencePiece vocabularies (6,000 vs 4,000 pieces), so token-level KD cannot compare them
# position by position.
#   1. distill-prepare --teacher-spm-model   the student's data and, in DATA/teacher, the same rows in the
#                                            teacher's tokenization (+ the vocabulary mapping for MinED)
#   2. teacher                               kd_gpt2_mini trained on the teacher's tokenization
#   3. students                              kd_gpt2_tiny from scratch: SFT, ULD, MinED, DSKD-CMA, multi-cost OT
#                                            (--teacher-data)
#   4. compare                               dev CE (nll_loss, the student's own tokens), Rouge-L, wall time
# Outputs: data-bin/dolly-cross, checkpoints/dolly/cross_tokenizer/, results/cross_tokenizer/summary.md.
# Environment knobs: TEACHER_UPDATES (default 150, examples/common.sh's), STUDENT_UPDATES (default 100), TEACHER_VOCAB (6000), SEEDS,
# RUNS (default "sft uld min_ed dskd_cma multi_cost_ot").
OUT=${OUT:-results/cross_tokenizer}
COMMON_MODELS=0 source "$(dirname "$0")/../common.sh"   # environment and the bundled data only
STUDENT_UPDATES=${STUDENT_UPDATES:-100}
RUNS=${RUNS:-sft uld min_ed dskd_cma multi_cost_ot}
TEACHER_VOCAB=${TEACHER_VOCAB:-6000}
CROSS=data-bin/dolly-cross
X=$CK/cross_tokenizer
rm -rf "$X" "$OUT" "$CROSS" data-bin/dolly-teacher-spm
mkdir -p "$OUT"

step "1/4 prepare: a $TEACHER_VOCAB-piece teacher SentencePiece model, then both tokenizations of the same rows"
distill-prepare --train examples/dolly/data/train.jsonl --destdir data-bin/dolly-teacher-spm \
  --vocab-size "$TEACHER_VOCAB" | tail -1
distill-prepare --train examples/dolly/data/train.jsonl --valid examples/dolly/data/valid.jsonl \
  --test examples/dolly/data/test.jsonl --destdir "$CROSS" --vocab-size 4000 \
  --teacher-spm-model data-bin/dolly-teacher-spm/spm.model | grep -E "teacher|wrote"

RUN=("${TRAIN[@]}")
RUN[1]=$CROSS
step "2/4 teacher: kd_gpt2_mini on the teacher's tokenization, $TEACHER_UPDATES updates"
T_RUN=("${TRAIN[@]}")
T_RUN[1]=$CROSS/teacher
"${T_RUN[@]}" --arch kd_gpt2_mini --criterion cross_entropy --max-update "$TEACHER_UPDATES" \
  --save-dir "$X/teacher" 2>&1 | tee "$OUT/train_teacher.log" | show

TIMES=()
for run in $RUNS; do
  case $run in
    sft) extra=(--criterion cross_entropy) ;;
    multi_cost_ot) extra=(--criterion "$run" --teacher-path "$X/teacher/checkpoint_best.pt"
                          --teacher-data "$CROSS/teacher") ;;  # its own defaults: the script's weights
    *) extra=(--criterion "$run" --kd-ratio 0.5 --teacher-path "$X/teacher/checkpoint_best.pt"
              --teacher-data "$CROSS/teacher") ;;
  esac
  step "3/4 student kd_gpt2_tiny, $run, $STUDENT_UPDATES updates"
  t0=$(date +%s)
  "${RUN[@]}" --arch kd_gpt2_tiny "${extra[@]}" --max-update "$STUDENT_UPDATES" --save-dir "$X/$run" 2>&1 \
    | tee "$OUT/train_$run.log" | show
  TIMES+=("$run=$(( $(date +%s) - t0 ))")
  DATA=$CROSS rouge "student_$run" "$X/$run/checkpoint_best.pt"
done

step "4/4 compare"
python - "$OUT" "${TIMES[@]}" <<'PY'
import json, re, sys
out = sys.argv[1]
secs = {run: int(t) for run, t in (arg.split("=") for arg in sys.argv[2:])}
RUNS = list(secs)
def last(path, tag):
    lines = [l for l in open(path) if tag in l]
    return dict(re.findall(r"\| (\w+) ([-\d.]+)", lines[-1])) if lines else {}
teacher = last(f"{out}/train_teacher.log", "| valid on")
md = [f"teacher kd_gpt2_mini on its own {len(open('data-bin/dolly-cross/teacher/dict.src.txt').readlines())}-entry "
      f"dictionary: dev ppl {teacher.get('ppl', '?')} (its own tokens)", "",
      "| student (kd_gpt2_tiny, 4,000 pieces) | train wall s | dev nll_loss (base 2) | dev ppl | aligned | Rouge-L |",
      "|---|---|---|---|---|---|"]
names = {"sft": "SFT (no teacher)", "uld": "ULD (--criterion uld)", "min_ed": "MinED (--criterion min_ed)",
         "dskd_cma": "DSKD-CMA (--criterion dskd_cma)", "multi_cost_ot": "multi-cost OT (--criterion multi_cost_ot)"}
for run in RUNS:
    v = last(f"{out}/train_{run}.log", "| valid on")
    train = last(f"{out}/train_{run}.log", "| train |")
    rouge = json.load(open(f"{out}/student_{run}.json"))
    score = f"{rouge['rouge_l']:.2f}"
    md.append(f"| {names[run]} | {secs[run]} | {v.get('nll_loss', v.get('loss', '?'))} | {v.get('ppl', '?')} | "
              f"{train.get('aligned', '-')} | {score} |")
open(f"{out}/summary.md", "w").write("\n".join(md) + "\n")
print("\n".join(md))
PY
step "done: $OUT/summary.md"
