#!/usr/bin/env bash
# SeqKD (Kim & Rush 2016; spec 1b): the teacher answers every training prompt once (sampling, T 1,
# top-p 1), the answers become data-bin/dolly-seqkd ($SEQKD_DATA; same SentencePiece model and dictionary), and
# the student is fine-tuned on them with MiniLLM's KD mix (kd_ratio 0.5: CE on the teacher's
# responses + forward KL to the teacher). Use --criterion cross_entropy for pure SeqKD.
source "$(dirname "$0")/common.sh"
rm -rf "$GD/seqkd"
step "teacher generates responses for the 3000 training prompts (<= $GEN_TOKENS new tokens)"
distill-seqkd --data "$DATA" --teacher "$TEACHER" --destdir "${SEQKD_DATA:-data-bin/dolly-seqkd}" --overwrite \
  --top-p 1.0 --temperature 1.0 --max-new-tokens "$GEN_TOKENS" --seed 1 --batch-size 64 --device cpu
step "student on the teacher's responses: kd, kd_ratio 0.5, $STUDENT_UPDATES updates"
STUDENT_SEQKD=("${STUDENT[@]}")
STUDENT_SEQKD[1]=${SEQKD_DATA:-data-bin/dolly-seqkd}  # the new data-bin (valid/test are the original references)
"${STUDENT_SEQKD[@]}" --criterion kd --kd-ratio 0.5 --save-dir "$GD/seqkd" 2>&1 | show
step "Rouge-L on the test prompts"
evaluate seqkd
