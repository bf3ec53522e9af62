# Shared setup of the generated-data recipes (sourced, not run): examples/common.sh (environment,
# data, teacher, SFT student init), then the student command and `evaluate NAME`.
# Knobs: those of examples/common.sh, STUDENT_UPDATES (100), GEN_TOKENS (64), GD, OUT,
# EVAL (1; 0 skips the test-set generation and scoring).
OUT=${OUT:-results/generated_data}
SHOW_PATTERN="train_inner|valid on|student data|done training|error"
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
GD=${GD:-checkpoints/generated_data}
STUDENT_UPDATES=${STUDENT_UPDATES:-100}
GEN_TOKENS=${GEN_TOKENS:-64}
mkdir -p "$GD" "$OUT"

# Student runs start from the SFT init (DistiLLM/MiniLLM protocol); one fresh directory per method.
STUDENT=("${TRAIN[@]}" --arch kd_gpt2_tiny --finetune-from-model "$INIT" --max-update "$STUDENT_UPDATES"
  --teacher-path "$TEACHER")

# evaluate NAME: Rouge-L of $GD/NAME/checkpoint_best.pt on the test prompts
evaluate() {
  [ "${EVAL:-1}" = 1 ] || { echo "(EVAL=0: no evaluation)"; return 0; }
  rouge "$1" "$GD/$1/checkpoint_best.pt"
}
