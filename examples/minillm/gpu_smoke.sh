#!/usr/bin/env bash
# MiniLLM on one GPU, small and quick (a few minutes): the bundled Dolly subset, a kd_gpt2_mini teacher
# and a kd_gpt2_tiny student fine-tuned first, then MiniLLM with the spec's coefficients in fp16, and
# the reverse KL and Rouge-L (distill-evaluate) on the test prompts before and after. Writes $OUT
# (default results/minillm_gpu_$SIZE) and works in $W (default /tmp/minillm_gpu_$SIZE; its checkpoints are
# retrained on every run).
# SIZE=gpt2 takes the spec's shapes instead: a kd_gpt2_xl (1.5B) teacher and a kd_gpt2_base (124M)
# student, both fine-tuned from random init in fp16 first (no GPT-2 weights can be fetched here, so
# only the shapes, memory and speed are realistic), 8k SentencePiece vocabulary, lr 5e-6 as MiniLLM.
# On a machine without fairseq, the wheels in ./.whl (scripts/gpu_wheels.sh) are installed first.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-python3}
if ! $PY -c "import fairseq" 2>/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # the package, without installing it
OUT=${OUT:-results/minillm_gpu_${SIZE:-small}}
W=${W:-/tmp/minillm_gpu_${SIZE:-small}}  # one per size: the sizes' checkpoints do not fit each other
UPDATES=${UPDATES:-48}
if [ "${SIZE:-small}" = gpt2 ]; then
  TEACHER_ARCH=kd_gpt2_xl STUDENT_ARCH=kd_gpt2_base VOCAB=8000 SFT_LR=3e-4 LR=${LR:-5e-6} HALF=(--fp16)
  TEACHER_UPDATES=${TEACHER_UPDATES:-150} SFT_UPDATES=${SFT_UPDATES:-150} ROLLOUT_BATCH=32
  NEW_TOKENS=${NEW_TOKENS:-256}  # MiniLLM's response cap (the task's default)
else
  TEACHER_ARCH=kd_gpt2_mini STUDENT_ARCH=kd_gpt2_tiny VOCAB=4000 SFT_LR=1e-3 LR=${LR:-1e-4} HALF=()
  TEACHER_UPDATES=${TEACHER_UPDATES:-300} SFT_UPDATES=${SFT_UPDATES:-200} ROLLOUT_BATCH=64 NEW_TOKENS=${NEW_TOKENS:-128}
fi
mkdir -p "$OUT" "$W"
rm -rf "$W/teacher" "$W/student_sft" "$W/student_minillm"  # a rerun trains anew (not resumed at max-update)
show() { grep -E "train_inner|valid on|collection|done training|rror" || true; }
$PY -m distill_plugins.cli.prepare --train examples/dolly/data/train.jsonl --valid examples/dolly/data/valid.jsonl \
  --test examples/dolly/data/test.jsonl --destdir "$W/data" --vocab-size $VOCAB --overwrite | tail -1
TRAIN=($PY -m fairseq_cli.train "$W/data" --user-dir distill_plugins --task instruction_distillation
  --optimizer adam --lr $SFT_LR --lr-scheduler inverse_sqrt --warmup-updates 30 --clip-norm 1.0 --max-tokens 8192
  --log-format simple --log-interval 50 --no-epoch-checkpoints --seed 1 --num-workers 0 --criterion cross_entropy ${HALF[@]+"${HALF[@]}"}
  --no-save-optimizer-state --no-last-checkpoints --save-interval 1000)  # one checkpoint_best.pt, saved at the end:
  # a GPT-2 XL checkpoint with Adam's state is about 24 GB (fairseq saves half tensors as fp32)
"${TRAIN[@]}" --arch $TEACHER_ARCH --max-update "$TEACHER_UPDATES" --save-dir "$W/teacher" 2>&1 | show
"${TRAIN[@]}" --arch $STUDENT_ARCH --max-update "$SFT_UPDATES" --save-dir "$W/student_sft" 2>&1 | show
$PY -m fairseq_cli.train "$W/data" --user-dir distill_plugins --task minillm --criterion minillm --fp16 \
  --arch $STUDENT_ARCH --finetune-from-model "$W/student_sft/checkpoint_best.pt" \
  --teacher-path "$W/teacher/checkpoint_best.pt" --teacher-dtype fp16 \
  --num-rollouts 256 --rollout-batch-size $ROLLOUT_BATCH --rollout-max-new-tokens $NEW_TOKENS --ppo-epochs 4 --batch-size 16 \
  --lm-data "$W/data" --optimizer adam --adam-betas "(0.9,0.95)" --weight-decay 1e-6 --clip-norm 1.0 \
  --lr $LR --lr-scheduler fixed --warmup-updates 10 --max-update "$UPDATES" --log-format simple \
  --log-interval 8 --no-epoch-checkpoints --no-save-optimizer-state --seed 1 --num-workers 0 --save-dir "$W/student_minillm" \
  2>&1 | tee "$OUT/minillm_train.log" | show
for m in student_sft/checkpoint_best.pt student_minillm/checkpoint_last.pt; do
  $PY -m distill_plugins.evaluation.reverse_kl "$W/data" --split test --student "$W/$m" \
    --teacher "$W/teacher/checkpoint_best.pt" --seeds 10,20 --json "$OUT/$(dirname $m)_reverse_kl.json" --overwrite 2>&1 | grep "^|"
done
# Rouge-L on the test prompts, the MiniLLM/DistiLLM protocol on the GPU (distill-evaluate's CUDA path), 2 seeds
$PY -m distill_plugins.cli.evaluate "$W/teacher/checkpoint_best.pt" "$W/student_sft/checkpoint_best.pt" \
  "$W/student_minillm/checkpoint_last.pt" --data "$W/data" --seeds 10 20 --dtype ${EVAL_DTYPE:-fp16} --no-progress \
  --json "$OUT/rouge_l.json" --overwrite 2>&1 | grep -E "^\||rror" || true
