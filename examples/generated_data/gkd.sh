#!/usr/bin/env bash
# GKD (DistiLLM's baseline, spec 3): with probability 0.5 a step generates with the student, pushes
# to the buffer and trains on a buffer batch, else on the ground truth; generalized JSD with beta 0.9.
source "$(dirname "$0")/common.sh"
rm -rf "$GD/gkd"
step "GKD: --student-data-mode mixed, lambda 0.5, JSD(0.9), $STUDENT_UPDATES updates"
"${STUDENT[@]}" --criterion js --js-beta 0.9 --kd-ratio 1.0 --student-data-mode mixed --student-data-lambda 0.5 \
  --replay-buffer-size 1000 --gen-max-new-tokens "$GEN_TOKENS" --save-dir "$GD/gkd" 2>&1 | show
step "Rouge-L on the test prompts"
evaluate gkd
