# Shared setup of the recipes in examples/ (sourced, not run): the environment, the bundled Dolly
# subset, a kd_gpt2_mini teacher and a kd_gpt2_tiny SFT student init, each built once and reused
# (the same paths as examples/dolly/run.sh), and `rouge NAME CHECKPOINT` (MiniLLM's protocol).
# Knobs: TEACHER_UPDATES (150), INIT_UPDATES (150), SEEDS ("10"), DATA, CK, OUT;
# SHOW_PATTERN (which fairseq-train lines to print).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
[ -x .venv/bin/fairseq-train ] || bash scripts/setup_env.sh
source .venv/bin/activate
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

DATA=${DATA:-data-bin/dolly}
CK=${CK:-checkpoints/dolly}
TEACHER_UPDATES=${TEACHER_UPDATES:-150}
INIT_UPDATES=${INIT_UPDATES:-150}
SEEDS=${SEEDS:-10}
start=$(date +%s)
step() { echo; echo "== [$(( $(date +%s) - start ))s] $*"; }
show() { grep --line-buffered -E "${SHOW_PATTERN:-train_inner|valid on|done training|error}" || true; }

TRAIN=(fairseq-train "$DATA" --user-dir distill_plugins --task instruction_distillation --cpu
  --optimizer adam --adam-betas "(0.9,0.98)" --lr 1e-3 --lr-scheduler inverse_sqrt --warmup-updates 30
  --clip-norm 1.0 --max-tokens 4096 --log-format simple --log-interval 10 --no-epoch-checkpoints
  --validate-interval-updates 25 --seed 1 --num-workers 0)

if [ ! -f "$DATA/dict.src.txt" ]; then
  step "prepare the bundled Dolly subset"
  distill-prepare --train examples/dolly/data/train.jsonl --valid examples/dolly/data/valid.jsonl \
    --test examples/dolly/data/test.jsonl --destdir "$DATA" --vocab-size 4000 --overwrite
fi
TEACHER=$CK/teacher/checkpoint_best.pt
INIT=$CK/student_sft/checkpoint_best.pt
# COMMON_MODELS=0: a recipe that trains its own models (examples/miniplm) skips the teacher and the init.
if [ "${COMMON_MODELS:-1}" = 1 ] && [ ! -f "$TEACHER" ]; then
  step "teacher: kd_gpt2_mini, supervised fine-tuning, $TEACHER_UPDATES updates"
  "${TRAIN[@]}" --arch kd_gpt2_mini --criterion cross_entropy --max-update "$TEACHER_UPDATES" \
    --save-dir "$CK/teacher" 2>&1 | show
fi
if [ "${COMMON_MODELS:-1}" = 1 ] && [ ! -f "$INIT" ]; then
  step "student init: kd_gpt2_tiny, supervised fine-tuning, $INIT_UPDATES updates"
  "${TRAIN[@]}" --arch kd_gpt2_tiny --criterion cross_entropy --max-update "$INIT_UPDATES" \
    --save-dir "$CK/student_sft" 2>&1 | show
fi

# rouge NAME CHECKPOINT: sample responses to the 100 test prompts (MiniLLM protocol: sampling, no
# top-k/top-p, no-repeat n-gram 6) once per seed and score Rouge-L into $OUT/NAME.json
rouge() {
  local name=$1 ckpt=$2
  for seed in $SEEDS; do
    fairseq-generate "$DATA" --user-dir distill_plugins --task instruction_distillation \
      --path "$ckpt" --gen-subset test --cpu --batch-size 100 \
      --sampling --beam 1 --sampling-topk -1 --sampling-topp -1 --temperature 1.0 \
      --no-repeat-ngram-size 6 --max-len-b 512 --seed "$seed" \
      --results-path "$OUT/gen_${name}_seed${seed}" 2>&1 | grep -E "Translated" || true
  done
  distill-score "$DATA" "$OUT"/gen_"${name}"_seed*/generate-test.txt --name "$name" --json "$OUT/$name.json" --overwrite
}
