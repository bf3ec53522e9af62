#!/usr/bin/env bash
# MiniLLM on the bundled Dolly subset, CPU-sized (Gu et al. 2024; ../../shared/specs/methods.md section 2):
#   1. prepare data        distill-prepare (skipped when data-bin/dolly exists)
#   2. teacher SFT         kd_gpt2_mini, cross_entropy          (skipped when checkpoints/dolly/teacher exists)
#   3. student SFT         kd_gpt2_tiny, cross_entropy          (skipped when checkpoints/dolly/student_sft exists)
#   4. LM data             the training texts as a plain corpus (python -m distill_plugins.cli.prepare_lm)
#   5. MiniLLM             fairseq-train --task minillm --criterion minillm from the SFT student
#   6. evaluate            reverse KL to the teacher on the test prompts (student samples) and Rouge-L
# Knobs (environment): TEACHER_UPDATES (150), INIT_UPDATES (150), MINILLM_UPDATES (64), NUM_ROLLOUTS (32),
# NEW_TOKENS (64, max response tokens of a rollout), LR (1e-4), SEEDS ("10"), EVAL (1; 0 skips step 6).
LM=${LM:-data-bin/dolly-lm}
OUT=${OUT:-results/minillm}
SHOW_PATTERN="train_inner|valid on|collection|done training|error"
source "$(dirname "$0")/../common.sh"   # environment, data (1/6), teacher (2/6), SFT student init (3/6)
MINILLM_UPDATES=${MINILLM_UPDATES:-64}
NUM_ROLLOUTS=${NUM_ROLLOUTS:-32}
NEW_TOKENS=${NEW_TOKENS:-64}
LR=${LR:-1e-4}
mkdir -p "$OUT"

step "4/6 LM data for the pre-training term: the training texts as plain documents"
python - "$DATA/train.jsonl" "$OUT/lm_corpus.txt" <<'PY'
import json, sys
with open(sys.argv[1]) as f, open(sys.argv[2], "w") as out:
    for line in f:
        r = json.loads(line)
        text = " ".join(t for t in (r["instruction"], r.get("input", ""), r["output"]) if t).replace("\n", " ")
        out.write(text + "\n")
PY
python -m distill_plugins.cli.prepare_lm --data "$DATA" --train "$OUT/lm_corpus.txt" --destdir "$LM" --overwrite

step "5/6 MiniLLM: $MINILLM_UPDATES updates, $NUM_ROLLOUTS rollouts per collection, 4 PPO epochs, alpha 0.2"
rm -rf "$CK/student_minillm"
fairseq-train "$DATA" --user-dir distill_plugins --task minillm --criterion minillm --cpu \
  --arch kd_gpt2_tiny --finetune-from-model "$INIT" --teacher-path "$TEACHER" \
  --num-rollouts "$NUM_ROLLOUTS" --rollout-batch-size 16 --rollout-max-new-tokens "$NEW_TOKENS" \
  --ppo-epochs 4 --teacher-mixed-alpha 0.2 --batch-size 8 --lm-data "$LM" --tokens-per-sample 512 \
  --reward-scaling 0.5 --cliprange-reward 100 --gamma 0.95 --cliprange 0.2 --lm-coef 1 --kd-ratio 0.5 \
  --optimizer adam --adam-betas "(0.9,0.95)" --adam-eps 1e-8 --weight-decay 1e-6 --clip-norm 1.0 \
  --lr "$LR" --lr-scheduler fixed --warmup-updates 10 --max-update "$MINILLM_UPDATES" \
  --log-format simple --log-interval 4 --validate-interval-updates 32 --no-epoch-checkpoints \
  --seed 1 --num-workers 0 --save-dir "$CK/student_minillm" 2>&1 | show

[ "${EVAL:-1}" = 1 ] || { step "done (EVAL=0)"; exit 0; }
step "6/6 evaluate on the 100 test prompts: reverse KL to the teacher, Rouge-L (seeds $SEEDS)"
# the SFT init is the best-valid-loss checkpoint (spec); MiniLLM's valid CE is no selection criterion
# (MiniLLM selects by dev Rouge-L), so its last checkpoint is evaluated
declare -A CKPT=([student_sft]=checkpoint_best.pt [student_minillm]=checkpoint_last.pt)
for model in student_sft student_minillm; do
  python -m distill_plugins.evaluation.reverse_kl "$DATA" --split test --student "$CK/$model/${CKPT[$model]}" \
    --teacher "$TEACHER" --seeds "${SEEDS// /,}" --json "$OUT/${model}_reverse_kl.json" --overwrite 2>&1 | grep "^|"
  rouge "$model" "$CK/$model/${CKPT[$model]}"
done
step "done: results in $OUT"
