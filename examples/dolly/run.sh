#!/usr/bin/env bash
# The default job, end to end on the bundled Dolly subset (CPU, about 10 minutes on 2 cores):
#   1. prepare data      distill-prepare -> fairseq-preprocess (SentencePiece 4k trained here)
#   2. teacher SFT       fairseq-train --arch kd_gpt2_mini --criterion cross_entropy
#   3. student SFT       fairseq-train --arch kd_gpt2_tiny --criterion cross_entropy
#   4. student KD        fairseq-train --arch kd_gpt2_tiny --criterion skew_kl --teacher-path <teacher>
#   5. generate          fairseq-generate on the 100 held-out prompts (MiniLLM sampling protocol)
#   6. score             Rouge-L per model -> results/dolly/results.{json,md,png}
# Outputs: data-bin/dolly, checkpoints/dolly/{teacher,student_sft,student_skew_kl}, results/dolly.
# Environment knobs: SEEDS (generation seeds, default "10"), TEACHER_UPDATES, STUDENT_UPDATES.
set -euo pipefail
cd "$(dirname "$0")/../.."
bash scripts/setup_env.sh
source .venv/bin/activate
export PYTHONUNBUFFERED=1

DATA=data-bin/dolly
CK=checkpoints/dolly
OUT=results/dolly
SEEDS=${SEEDS:-10}
TEACHER_UPDATES=${TEACHER_UPDATES:-100}
STUDENT_UPDATES=${STUDENT_UPDATES:-100}
start=$(date +%s)
step() { echo; echo "== [$(( $(date +%s) - start ))s] $*"; }

rm -rf "$CK" "$OUT"
mkdir -p "$OUT"

step "1/6 prepare the bundled Dolly subset (3000 train / 200 valid / 100 test rows)"
distill-prepare --train examples/dolly/data/train.jsonl --valid examples/dolly/data/valid.jsonl \
  --test examples/dolly/data/test.jsonl --destdir "$DATA" --vocab-size 4000 --overwrite

TRAIN=(fairseq-train "$DATA" --user-dir distill_plugins --task instruction_distillation --cpu
  --optimizer adam --adam-betas "(0.9,0.98)" --lr 1e-3 --lr-scheduler inverse_sqrt --warmup-updates 30
  --clip-norm 1.0 --max-tokens 4096 --log-format simple --log-interval 25 --no-epoch-checkpoints
  --seed 1 --num-workers 0)

step "2/6 teacher: kd_gpt2_mini (4 x 256), supervised fine-tuning, $TEACHER_UPDATES updates"
"${TRAIN[@]}" --arch kd_gpt2_mini --criterion cross_entropy --max-update "$TEACHER_UPDATES" \
  --save-dir "$CK/teacher" 2>&1 | grep --line-buffered -E "train_inner|valid on|done training"

step "3/6 student: kd_gpt2_tiny (2 x 128), supervised fine-tuning, $STUDENT_UPDATES updates"
"${TRAIN[@]}" --arch kd_gpt2_tiny --criterion cross_entropy --max-update "$STUDENT_UPDATES" \
  --save-dir "$CK/student_sft" 2>&1 | grep --line-buffered -E "train_inner|valid on|done training"

step "4/6 student: kd_gpt2_tiny distilled from the teacher with skew KL (alpha 0.1), $STUDENT_UPDATES updates"
# half CE, half KD (MiniLLM/DSKD mix); DistiLLM's scripts use --kd-ratio 1.0 (docs/reproducing.md)
"${TRAIN[@]}" --arch kd_gpt2_tiny --criterion skew_kl --skew-alpha 0.1 --kd-ratio 0.5 \
  --teacher-path "$CK/teacher/checkpoint_best.pt" --max-update "$STUDENT_UPDATES" \
  --save-dir "$CK/student_skew_kl" 2>&1 | grep --line-buffered -E "train_inner|valid on|done training|distill_plugins.teacher"

step "5/6 generate responses for the 100 held-out prompts (sampling, top-k 0, top-p 1, T 1, no-repeat 6, total 512, responses of at most 256 tokens; seeds $SEEDS)"
for model in teacher student_sft student_skew_kl; do
  for seed in $SEEDS; do
    fairseq-generate "$DATA" --user-dir distill_plugins --task instruction_distillation \
      --path "$CK/$model/checkpoint_best.pt" --gen-subset test --cpu --batch-size 100 \
      --sampling --beam 1 --sampling-topk -1 --sampling-topp -1 --temperature 1.0 \
      --no-repeat-ngram-size 6 --max-len-b 512 --seed "$seed" \
      --results-path "$OUT/gen_${model}_seed${seed}" 2>&1 | grep --line-buffered -E "Translated" || true
  done
done

step "6/6 Rouge-L"
for model in teacher student_sft student_skew_kl; do
  distill-score "$DATA" "$OUT"/gen_"${model}"_seed*/generate-test.txt --name "$model" --json "$OUT/$model.json" --overwrite
done
echo
distill-compare "$OUT/teacher.json" "$OUT/student_sft.json" "$OUT/student_skew_kl.json" \
  --names "teacher (SFT, 4x256)" "student SFT (2x128)" "student skew KL (2x128)" \
  --json "$OUT/results.json" --md "$OUT/results.md" --png "$OUT/results.png" --overwrite
step "done: results in $OUT/results.json and $OUT/results.md"
