#!/usr/bin/env bash
# ImitKD (DistiLLM's baseline, spec 3): every update the student samples responses to its prompts,
# pushes them into the replay buffer (1000), and trains forward KL (kd_ratio 1) on a random buffer batch.
# DistiLLM's ImitKD also adds the OpenWebText LM term (--lm-data, as distillm.sh does with LM_TEXT); not here.
source "$(dirname "$0")/common.sh"
rm -rf "$GD/imitkd"
step "ImitKD: --student-data-mode always, forward KL, $STUDENT_UPDATES updates"
"${STUDENT[@]}" --criterion kd --kd-ratio 1.0 --student-data-mode always --replay-buffer-size 1000 \
  --gen-max-new-tokens "$GEN_TOKENS" --gen-top-p 1.0 --gen-temperature 1.0 --save-dir "$GD/imitkd" 2>&1 | show
step "Rouge-L on the test prompts"
evaluate imitkd
