#!/usr/bin/env bash
# Offline teacher cache on the bundled Dolly subset (CPU, about 6 minutes once the teacher exists):
#   1. distill-cache-teacher   the Dolly teacher's top-K log-probs at every label token of train + valid
#   2. student KD, live        fairseq-train --criterion skew_kl --teacher-path <teacher>   (as the default job)
#   3. student KD, cached      the same with --teacher-cache <cache>: no teacher forward in the steps,
#                              once with the tail mass spread evenly (default), once renormalised over the top-K
#   4. compare                 wall time of the training runs and their dev CE (nll_loss, comparable)
# Uses the teacher of examples/dolly/run.sh (examples/common.sh trains one when it is missing).
# Outputs: data-bin/dolly-teacher-topK, checkpoints/dolly/teacher_cache/, results/teacher_cache/summary.md.
# Environment knobs: TOP_K (default 64), STUDENT_UPDATES (default 100, as the default job).
OUT=${OUT:-results/teacher_cache}
source "$(dirname "$0")/../common.sh"   # environment, data, teacher (built when missing, as in examples/dolly)
TOP_K=${TOP_K:-64}
STUDENT_UPDATES=${STUDENT_UPDATES:-100}
CACHE=data-bin/dolly-teacher-top$TOP_K
rm -rf "$CK/teacher_cache" "$OUT"
mkdir -p "$OUT"

step "1/4 cache the teacher: top-$TOP_K log-probs at every label token of train and valid"
distill-cache-teacher --data "$DATA" --teacher "$TEACHER" --out "$CACHE" --top-k "$TOP_K" --overwrite

# half CE, half KD as examples/dolly/run.sh (DistiLLM's scripts: --kd-ratio 1.0)
KD=("${TRAIN[@]}" --arch kd_gpt2_tiny --criterion skew_kl --skew-alpha 0.1 --kd-ratio 0.5
  --max-update "$STUDENT_UPDATES")
declare -A SECONDS_OF
for run in live cached cached_tail_none; do
  case $run in
    live) teacher=(--teacher-path "$TEACHER"); n=2 ;;
    cached) teacher=(--teacher-cache "$CACHE"); n=3 ;;
    cached_tail_none) teacher=(--teacher-cache "$CACHE" --teacher-cache-tail none); n=3 ;;
  esac
  step "$n/4 student kd_gpt2_tiny, skew KL, $STUDENT_UPDATES updates, teacher: $run"
  t0=$(date +%s)
  "${KD[@]}" "${teacher[@]}" --save-dir "$CK/teacher_cache/$run" 2>&1 | tee "$OUT/train_$run.log" \
    | SHOW_PATTERN="valid on|done training|teacher cache|error" show
  SECONDS_OF[$run]=$(( $(date +%s) - t0 ))
done

step "4/4 compare"
python - "$OUT" "$CACHE" "${SECONDS_OF[live]}" "${SECONDS_OF[cached]}" "${SECONDS_OF[cached_tail_none]}" <<'EOF'
import json, re, sys
out, cache = sys.argv[1], sys.argv[2]
live_s, cached_s, none_s = (int(x) for x in sys.argv[3:6])
def last_valid(path):
    lines = [l for l in open(path) if "| valid on" in l]
    return dict(re.findall(r"\| (\w+) ([-\d.]+)", lines[-1])) if lines else {}
meta = json.load(open(f"{cache}/cache.json"))
rows = [("live teacher (--teacher-path)", live_s, last_valid(f"{out}/train_live.log")),
        (f"top-{meta['top_k']} cache (--teacher-cache), tail spread evenly", cached_s,
         last_valid(f"{out}/train_cached.log")),
        (f"top-{meta['top_k']} cache, --teacher-cache-tail none (renormalised)", none_s,
         last_valid(f"{out}/train_cached_tail_none.log"))]
md = ["| student KD run | train wall s | dev nll_loss (base 2) | dev ppl |", "|---|---|---|---|"]
md += [f"| {name} | {s} | {v.get('nll_loss', '?')} | {v.get('ppl', '?')} |" for name, s, v in rows]
md += ["", f"cache: {meta['label_tokens']:,} label tokens of {meta['examples']:,} examples, built in "
       f"{meta['build_seconds']} s (teacher pass {meta['teacher_pass_seconds']} s), once for every later student"]
open(f"{out}/summary.md", "w").write("\n".join(md) + "\n")
print("\n".join(md))
EOF
step "done: $OUT/summary.md"
