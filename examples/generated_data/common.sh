# Shared setup of the generated-data recipes (sourced, not run): the bundled Dolly subset, a teacher
# and an SFT student init, each built once and reused (the same paths as examples/dolly/run.sh).
# Knobs: TEACHER_UPDATES (150), INIT_UPDATES (150), STUDENT_UPDATES (100), GEN_TOKENS (64), SEEDS ("10"),
# EVAL (1; 0 skips the test-set generation and scoring).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
[ -x .venv/bin/fairseq-train ] || bash scripts/setup_env.sh
source .venv/bin/activate
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

DATA=${DATA:-data-bin/dolly}
CK=${CK:-checkpoints/dolly}
GD=${GD:-checkpoints/generated_data}
OUT=${OUT:-results/generated_data}
TEACHER_UPDATES=${TEACHER_UPDATES:-150}
INIT_UPDATES=${INIT_UPDATES:-150}
STUDENT_UPDATES=${STUDENT_UPDATES:-100}
GEN_TOKENS=${GEN_TOKENS:-64}
SEEDS=${SEEDS:-10}
mkdir -p "$GD" "$OUT"
start=$(date +%s)
step() { echo; echo "== [$(( $(date +%s) - start ))s] $*"; }
show() { grep -E "train_inner|valid on|student data|done training|error" || true; }

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
if [ ! -f "$TEACHER" ]; then
  step "teacher: kd_gpt2_mini, supervised fine-tuning, $TEACHER_UPDATES updates"
  "${TRAIN[@]}" --arch kd_gpt2_mini --criterion cross_entropy --max-update "$TEACHER_UPDATES" \
    --save-dir "$CK/teacher" 2>&1 | show
fi
INIT=$CK/student_sft/checkpoint_best.pt
if [ ! -f "$INIT" ]; then
  step "student init: kd_gpt2_tiny, supervised fine-tuning, $INIT_UPDATES updates"
  "${TRAIN[@]}" --arch kd_gpt2_tiny --criterion cross_entropy --max-update "$INIT_UPDATES" \
    --save-dir "$CK/student_sft" 2>&1 | show
fi

# Student runs start from the SFT init (DistiLLM/MiniLLM protocol); one fresh directory per method.
STUDENT=("${TRAIN[@]}" --arch kd_gpt2_tiny --finetune-from-model "$INIT" --max-update "$STUDENT_UPDATES"
  --teacher-path "$TEACHER")

# evaluate NAME: sample responses to the 100 test prompts (MiniLLM protocol) and score Rouge-L
evaluate() {
  local name=$1
  [ "${EVAL:-1}" = 1 ] || { echo "(EVAL=0: no evaluation)"; return 0; }
  for seed in $SEEDS; do
    fairseq-generate "$DATA" --user-dir distill_plugins --task instruction_distillation \
      --path "$GD/$name/checkpoint_best.pt" --gen-subset test --cpu --batch-size 100 \
      --sampling --beam 1 --sampling-topk -1 --sampling-topp -1 --temperature 1.0 \
      --no-repeat-ngram-size 6 --max-len-b 511 --seed "$seed" \
      --results-path "$OUT/gen_${name}_seed${seed}" 2>&1 | grep -E "Translated" || true
  done
  distill-score "$DATA" "$OUT"/gen_"${name}"_seed*/generate-test.txt --name "$name" --json "$OUT/$name.json"
}
