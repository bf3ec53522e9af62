#!/usr/bin/env bash
# MiniPLM difference sampling on the bundled Dolly subset, CPU-sized (Gu et al. 2025; ../../shared/specs/methods.md
# section 8): KD for pre-training through the data, with no teacher forward during the student's training.
#   1. corpus            the 3,000 training rows (instruction, context, response) as plain documents, the 200
#                        dev rows as the held-out split (python -m distill_plugins.cli.prepare_lm)
#   2. teacher LM        kd_gpt2_mini, fairseq-train --task language_modeling on the whole corpus
#   3. reference LM      a smaller model (1 layer, 64 dims) on a random half of the corpus (MiniPLM's reference
#                        is trained on a random split of the same corpus)
#   4. difference        distill-miniplm: both score every document; the top KEEP by per-token log p - log p_ref
#      sampling          are the refined corpus
#   5. students          kd_gpt2_tiny pre-trained for STUDENT_UPDATES on (a) the refined corpus, (b) a random subset
#                        with as many documents, (c) the whole corpus; dev loss of each on the same dev split
# Outputs: data-bin/dolly-corpus*, checkpoints/dolly/miniplm/, results/miniplm/summary.md (+ the training logs).
# Knobs (environment): LM_TEACHER_UPDATES (120), REF_UPDATES (100), STUDENT_UPDATES (100), KEEP (0.5).
# One seed and a tiny corpus: the differences between the students are not significant.
OUT=${OUT:-results/miniplm}
COMMON_MODELS=0
source "$(dirname "$0")/../common.sh"   # environment and the prepared Dolly data (tokenizer, dictionary)
LM_TEACHER_UPDATES=${LM_TEACHER_UPDATES:-120}
REF_UPDATES=${REF_UPDATES:-100}
STUDENT_UPDATES=${STUDENT_UPDATES:-100}
KEEP=${KEEP:-0.5}
CORPUS=data-bin/dolly-corpus
MP=$CK/miniplm
rm -rf "$OUT" "$MP"
mkdir -p "$OUT" "$MP"

LMTRAIN=(fairseq-train --user-dir distill_plugins --task language_modeling --cpu --criterion cross_entropy
  --tokens-per-sample 256 --max-tokens 4096 --required-batch-size-multiple 1
  --optimizer adam --adam-betas "(0.9,0.98)" --lr 1e-3 --lr-scheduler inverse_sqrt --warmup-updates 30
  --clip-norm 1.0 --log-format simple --log-interval 25 --no-epoch-checkpoints --validate-interval-updates 50
  --seed 1 --num-workers 0)

step "1/5 corpus: training rows as documents, a random half for the reference, a random subset for the baseline"
python - examples/dolly/data "$OUT" "$KEEP" <<'PY'
import json, random, sys
src, out, keep = sys.argv[1], sys.argv[2], float(sys.argv[3])
def docs(split):
    rows = [json.loads(line) for line in open(f"{src}/{split}.jsonl")]
    return [" ".join(t for t in (r["instruction"], r.get("input", ""), r["output"]) if t).replace("\n", " ").strip()
            for r in rows]
train, valid = docs("train"), docs("valid")
def write(name, lines):
    open(f"{out}/{name}.txt", "w").write("\n".join(lines) + "\n")
write("train", train)
write("valid", valid)
write("reference_half", random.Random(1).sample(train, len(train) // 2))
kept = sorted(random.Random(2).sample(range(len(train)), int(keep * len(train))))  # as many as difference sampling keeps
write("random_subset", [train[i] for i in kept])
print(f"| {len(train)} training documents, {len(valid)} dev documents")
PY
for name in train reference_half random_subset; do
  dest=$CORPUS; [ "$name" = train ] || dest=$CORPUS-$name
  python -m distill_plugins.cli.prepare_lm --data "$DATA" --train "$OUT/$name.txt" --valid "$OUT/valid.txt" \
    --destdir "$dest" --overwrite | grep "train:"
done

step "2/5 teacher LM: kd_gpt2_mini on the whole corpus, $LM_TEACHER_UPDATES updates"
"${LMTRAIN[@]}" "$CORPUS" --arch kd_gpt2_mini --max-update "$LM_TEACHER_UPDATES" --save-dir "$MP/teacher" \
  2>&1 | tee "$OUT/train_teacher.log" | show

step "3/5 reference LM: 1 layer, 64 dims, on a random half of the corpus, $REF_UPDATES updates"
"${LMTRAIN[@]}" "$CORPUS-reference_half" --arch kd_gpt2_tiny --decoder-layers 1 --decoder-embed-dim 64 \
  --decoder-ffn-embed-dim 256 --max-update "$REF_UPDATES" --save-dir "$MP/reference" \
  2>&1 | tee "$OUT/train_reference.log" | show

step "4/5 difference sampling: keep the top $KEEP of the documents"
distill-miniplm --data "$DATA" --corpus "$CORPUS" --teacher "$MP/teacher/checkpoint_best.pt" \
  --reference "$MP/reference/checkpoint_best.pt" --keep-fraction "$KEEP" --text "$OUT/train.txt" \
  --destdir "$CORPUS-miniplm" --overwrite

declare -A SECONDS_OF
for run in miniplm random_subset whole; do
  data=$CORPUS-$run; [ "$run" = whole ] && data=$CORPUS
  step "5/5 student kd_gpt2_tiny, $STUDENT_UPDATES updates, on: $run"
  t0=$(date +%s)
  "${LMTRAIN[@]}" "$data" --arch kd_gpt2_tiny --max-update "$STUDENT_UPDATES" --save-dir "$MP/student_$run" \
    2>&1 | tee "$OUT/train_student_$run.log" | show
  SECONDS_OF[$run]=$(( $(date +%s) - t0 ))
done

python - "$OUT" "$CORPUS" "$STUDENT_UPDATES" "${SECONDS_OF[miniplm]}" "${SECONDS_OF[random_subset]}" "${SECONDS_OF[whole]}" <<'PY'
import json, re, sys
out, corpus, updates = sys.argv[1], sys.argv[2], sys.argv[3]
seconds = dict(zip(("miniplm", "random_subset", "whole"), sys.argv[4:7]))
def last_valid(log):
    lines = [l for l in open(f"{out}/{log}.log") if "valid on 'valid'" in l]
    return dict(re.findall(r"\| (\w+) ([-\d.]+)", lines[-1])) if lines else {}
def size(d):
    n = sum(1 for line in open(f"{out}/{d}.txt") if line.strip())
    return f"{n:,} documents"
record = json.load(open(f"{corpus}-miniplm/miniplm.json"))
md = ["| model | pre-training data | updates | train s | dev loss (bits/token) | dev ppl |", "|---|---|---|---|---|---|"]
for name, log, data in (("teacher LM (kd_gpt2_mini)", "train_teacher", "whole corpus: " + size("train")),
                        ("reference LM (1 layer, 64 dims)", "train_reference", "random half: " + size("reference_half"))):
    v = last_valid(log)
    md.append(f"| {name} | {data} | | | {v.get('loss', '?')} | {v.get('ppl', '?')} |")
for run, data in (("miniplm", f"difference-sampled: {record['kept_documents']:,} documents, {record['kept_tokens']:,} tokens"),
                  ("random_subset", "random subset: " + size("random_subset")),
                  ("whole", "whole corpus: " + size("train"))):
    v = last_valid(f"train_student_{run}")
    md.append(f"| student kd_gpt2_tiny | {data} | {updates} | {seconds[run]} | {v.get('loss', '?')} | {v.get('ppl', '?')} |")
md += ["", f"difference sampling: {record['documents']:,} documents ({record['tokens']:,} tokens) scored in "
       f"{record['seconds']['teacher']} s (teacher) + {record['seconds']['reference']} s (reference), "
       f"windows of {record['window']} tokens; kept {record['kept_documents']:,} by the {record['score']} score."]
open(f"{out}/summary.md", "w").write("\n".join(md) + "\n")
print("\n".join(md))
PY
step "done: $OUT/summary.md"
