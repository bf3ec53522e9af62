#!/usr/bin/env bash
# DistiLLM (Ko et al. 2024; spec 3): skew KL (alpha 0.1, kd_ratio 1) with adaptive off-policy student
# data: tau starts at 0 and rises by 0.1 whenever the dev CE grew by >= 0.1 nats at a validation
# (every 25 updates here), fresh generations get share tau*(1 - step/total) once the 1000-sequence
# replay buffer is full, the rest of the tau share replays buffered generations.
# Use --criterion skew_reverse_kl for DistiLLM's medium/large GPT-2 and OPT settings.
source "$(dirname "$0")/common.sh"
rm -rf "$GD/distillm"
step "DistiLLM: --student-data-mode adaptive, skew KL, $STUDENT_UPDATES updates"
"${STUDENT[@]}" --criterion skew_kl --skew-alpha 0.1 --kd-ratio 1.0 --student-data-mode adaptive \
  --adaptive-tau-init 0.0 --adaptive-loss-eps 0.1 --replay-ratio decreasing --replay-buffer-size 1000 \
  --gen-max-new-tokens "$GEN_TOKENS" --save-dir "$GD/distillm" 2>&1 | show
step "Rouge-L on the test prompts"
evaluate distillm
