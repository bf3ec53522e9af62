#!/usr/bin/env bash
# DistiLLM (Ko et al. 2024; spec 3): skew KL (alpha 0.1, kd_ratio 1) with adaptive off-policy student
# data: tau starts at 0 and rises by 0.1 whenever the dev CE grew by >= 0.1 nats at a validation
# (every 25 updates here), fresh generations get share tau*(1 - step/total) once the 1000-sequence
# replay buffer is full, the rest of the tau share replays buffered generations.
# Use --criterion skew_reverse_kl for DistiLLM's medium/large GPT-2 and OPT settings.
# DistiLLM's extra LM loss on a pre-training corpus (OpenWebText in the paper), off by default:
#   LM_TEXT=corpus.txt  plain text, one document per line, binarized with the student's dictionary
#                       into $GD/lm-bin (python -m distill_plugins.cli.prepare_lm), or
#   LM_DATA=DIR         a directory prepared that way already;
#   LM_COEF (1, DistiLLM's lm_coef) and LM_BATCH_SIZE (8 blocks of 512 tokens a step, DistiLLM's batch size).
source "$(dirname "$0")/common.sh"
LM_ARGS=()
LM_DATA=${LM_DATA:-}
if [ -n "${LM_TEXT:-}" ] && [ -z "$LM_DATA" ]; then
  LM_DATA=$GD/lm-bin
  if [ ! -f "$LM_DATA/train.bin" ]; then
    step "binarize the LM corpus $LM_TEXT with the student's dictionary"
    python -m distill_plugins.cli.prepare_lm --data "$DATA" --train "$LM_TEXT" --destdir "$LM_DATA" --overwrite
  fi
fi
if [ -n "$LM_DATA" ]; then
  LM_ARGS=(--lm-data "$LM_DATA" --lm-coef "${LM_COEF:-1}" --lm-batch-size "${LM_BATCH_SIZE:-8}")
fi
rm -rf "$GD/distillm"
step "DistiLLM: --student-data-mode adaptive, skew KL, $STUDENT_UPDATES updates${LM_DATA:+, LM loss on $LM_DATA}"
"${STUDENT[@]}" --criterion skew_kl --skew-alpha 0.1 --kd-ratio 1.0 --student-data-mode adaptive \
  --adaptive-tau-init 0.0 --adaptive-loss-eps 0.1 --replay-ratio decreasing --replay-buffer-size 1000 \
  --gen-max-new-tokens "$GEN_TOKENS" "${LM_ARGS[@]}" --save-dir "$GD/distillm" 2>&1 | show
step "Rouge-L on the test prompts"
evaluate distillm
