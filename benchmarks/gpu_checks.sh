#!/usr/bin/env bash
# Every check that needs a GPU, for a session that is lent one. On the CPU machine first:
# bash scripts/gpu_wheels.sh (fills ./.whl). Then one device call, .whl carried, timeout_s 600:
#   BUDGET_S=540 bash benchmarks/gpu_checks.sh
# BUDGET_S caps the whole run: a stage starts only if its expected time (NEED below) is left, and its
# time limit is cut to what is left, so the figures of every finished stage come back. A second call,
# if device time is left, runs what the first skipped: STAGES="names or prefixes" (e.g.
# STAGES="terms generate loss_activation loss_attention step_parts step_compile").
#   STAGES=cross bash benchmarks/gpu_checks.sh   the cross-tokenizer losses and the OT terms (opt-in)
# Writes $OUT/gpu_checks.log (everything) and $OUT/gpu_checks.tar.gz (each stage's JSON figures and log,
# packed again after every stage).
# The stages run in the order below, the most wanted first (issue 6's step and loss figures, then the
# kernels' correctness, then issue 9's MiniLLM run at realistic shapes, then the diagnostics).
#
#   step      benchmarks/kd_step.py, GPT-2 XL -> base, 32 x 512 tokens: ours (bf16 student, bf16 teacher,
#             fused Triton loss), ours from a top-64 teacher cache (--teacher-cache) and the plain HF
#             reference in one run
#   loss      benchmarks/kd_loss.py, 16,384 x 50,257 x 768 bf16 (--preset gpt2-16k): forward KL, reverse KL,
#             skew KL; every impl, the Triton kernel with both pass-1 variants (triton: per-lane maxima,
#             the default; triton_tile)
#   kernels   tests/gpu (Triton KD kernels against float64 references; the cross-tokenizer criterions
#             on the GPU against the CPU)
#   minillm   examples/minillm/gpu_smoke.sh at GPT-2 XL -> base shapes (MINILLM_SIZE=gpt2, the default;
#             small: the mini -> tiny smoke run), MINILLM_UPDATES updates (default 32)
#   terms     benchmarks/minillm_terms.py: MiniLLM's L_reg + L_pt, fused against plain (GPT-2 XL -> base, bf16)
#   generate  benchmarks/generation.py: prompt prefill against fairseq's prompt forcing (GPT-2 base, bf16)
#   loss_activation / loss_attention: benchmarks/activation.py (GPT-2's GELU per step, fairseq's 8-op form
#             against the fused op) and benchmarks/attention.py (the decoder's self-attention per step,
#             fairseq's masked form against is_causal, full-length and padded)
#   step_parts   ours beside its two parts timed alone (teacher forward, student step without KD), with a
#             torch.profiler table of the ours step
#   step_compile ours with --compile-teacher
# STAGES="kernels step" runs a subset (a name, or the prefix before "_": "loss" = every loss_* stage);
# DEVICE=cpu SMALL=1 runs the plumbing at tiny size on a CPU (every stage but minillm).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results/gpu_checks}
DEVICE=${DEVICE:-cuda}
SMALL=${SMALL:-0}
STAGES=${STAGES:-kernels step loss terms generate $([ "$SMALL" = 1 ] || echo minillm)}
R=$(mktemp -d)/gpu_checks  # packed into $OUT/gpu_checks.tar.gz after every stage (the device returns 8 files at most)
mkdir -p "$OUT" "$R"
export PYTHONUNBUFFERED=1
exec > >(tee "$OUT/gpu_checks.log") 2>&1
if ! python3 -c "import fairseq" 2>/dev/null; then
  [ -d .whl ] || { echo "no fairseq and no ./.whl: run scripts/gpu_wheels.sh on the CPU machine and carry .whl"; exit 2; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 2
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
python3 -c "import torch, fairseq; print('torch', torch.__version__, 'fairseq', fairseq.__version__,
  torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
[ "$DEVICE" = cpu ] || nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader

BUDGET_S=${BUDGET_S:-0}  # 0: no overall limit
stage() {  # name, expected seconds (NEED), time limit (s), command...
  local name=$1 need=$2 limit=$3; shift 3
  case " $STAGES " in *" $name "*|*" ${name%%_*} "*) ;; *) return 0 ;; esac  # loss_* belong to loss
  if [ "$BUDGET_S" -gt 0 ]; then
    local left=$((BUDGET_S - SECONDS))
    if [ "$left" -lt "$need" ]; then echo "== $name: skipped, ${left}s of BUDGET_S left (needs about ${need}s)"; return 0; fi
    [ "$limit" -le "$left" ] || limit=$left
  fi
  echo "== $name ($(date +%T), limit ${limit}s): $*"
  local t0=$SECONDS rc
  timeout "$limit" "$@" 2>&1 | tee "$R/$name.log"  # a pipeline: the log is complete before it is packed
  rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc in $((SECONDS - t0))s"
  tar -czf "$OUT/gpu_checks.tar.gz" -C "$(dirname "$R")" gpu_checks  # what is finished, if the call is cut short
}
if [ "$SMALL" = 1 ]; then
  STEP=(--preset cpu-tiny --warmup 1 --steps 1); LOSS=(--preset cpu-tiny); GEN=(--preset cpu-tiny)
  TERMS=(--preset cpu-tiny) ACT_PRESET=cpu-tiny CROSS=(--preset cpu-tiny --kd-chunk-size 64) OT_PRESET=cpu-tiny
else
  CROSS=(--preset gpt2-xl-base --dtype bf16 --kd-chunk-size 4096)
  STEP=(--preset gpt2-xl-base --warmup 2 --steps 4 --precision bf16 --teacher-dtype bf16)
  LOSS=(--preset gpt2-16k); GEN=(--preset gpt2-base --dtype bf16 --repeats 2)
  TERMS=(--preset gpt2-xl-base --dtype bf16)
fi
stage step 120 280 python3 benchmarks/kd_step.py --device "$DEVICE" "${STEP[@]}" --run ours,cached,reference \
  --json "$R/step.json"
for d in forward_kl reverse_kl skew_kl; do
  stage loss_$d 25 90 python3 benchmarks/kd_loss.py --device "$DEVICE" "${LOSS[@]}" --divergence $d --json "$R/loss_$d.json"
done
stage kernels 40 150 python3 -m pytest -q tests/gpu
stage minillm 300 540 env OUT="$R/minillm" SIZE="${MINILLM_SIZE:-gpt2}" UPDATES="${MINILLM_UPDATES:-32}" \
  bash examples/minillm/gpu_smoke.sh
stage terms 40 90 python3 benchmarks/minillm_terms.py --device "$DEVICE" "${TERMS[@]}" --json "$R/minillm_terms.json"
stage generate 40 90 python3 benchmarks/generation.py --device "$DEVICE" "${GEN[@]}" --json "$R/generation.json"
stage loss_activation 20 60 python3 benchmarks/activation.py --device "$DEVICE" --preset "${ACT_PRESET:-gpt2-xl-base}" \
  --json "$R/activation.json"
stage loss_attention 30 90 python3 benchmarks/attention.py --device "$DEVICE" --preset "${ACT_PRESET:-gpt2-xl-base}" \
  --json "$R/attention.json"
stage step_parts 90 200 python3 benchmarks/kd_step.py --device "$DEVICE" "${STEP[@]}" --run ours,teacher,student \
  --profile "$R/step_profile.txt" --json "$R/step_parts.json"
stage step_compile 120 300 python3 benchmarks/kd_step.py --device "$DEVICE" "${STEP[@]}" --run ours \
  --compile-teacher --json "$R/step_compile.json"
stage cross_loss 90 240 python3 benchmarks/cross_tokenizer_loss.py --device "$DEVICE" "${CROSS[@]}" \
  --json "$R/cross_tokenizer_loss.json"
stage cross_ot 30 90 python3 benchmarks/ot_terms.py --device "$DEVICE" --preset "${OT_PRESET:-gpt2}" --json "$R/ot_terms.json"
echo "== done: $OUT/gpu_checks.log, $OUT/gpu_checks.tar.gz"
