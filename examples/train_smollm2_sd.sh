#!/usr/bin/env bash
# Issue 17: SmolLM2-135M-Instruct heads trained on the target's OWN replies (self-distilled at
# token level), EAGLE vs HASS with identical data, steps and seed; the run behind the README's
# table and the shipped head. Everything on CPU; see docs/training.md section 6 for the cost.
#   1. data: vLLM answers 1,200 ShareGPT first turns (deduplicated, never an MT-bench or
#      HumanEval prompt; 3 greedy : 1 sampled at T = 1), ids kept exactly, then the target's
#      features on exactly those ids (the last 32 prompts are held out by `train fit`)
#   2. stage 1: EAGLE loss, EPOCHS1 epochs, over a 16,384-token draft vocabulary built from
#      the training replies
#   3. stage 2 (as the HASS repo trains): EPOCHS2 more epochs from the stage-1 head, once with
#      HASS's loss (3 HCA steps + Top-K, both cores) and once with the EAGLE loss (one thread:
#      it can run beside the HASS head's bench)
set -euo pipefail
cd "$(dirname "$0")/.."
B=.venv/bin
OUT=${OUT:-runs/sd}
EPOCHS1=${EPOCHS1:-5} EPOCHS2=${EPOCHS2:-1} V=${V:-16384}
export LD_PRELOAD=${LD_PRELOAD:-$PWD/.venv/lib/libiomp5.so} HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=4
T=$($B/vllm-hass train fetch --smollm2 | tail -1)
mkdir -p "$OUT"
gen() { [ -f "$1" ] || $B/vllm-hass train gen --target "$T" --out "$@"; }
gen $OUT/tokens.jsonl --num-prompts 1200 --max-prompt-tokens 256 --max-tokens 256 \
  --greedy-fraction 0.75 --seed 0
$B/vllm-hass train data --target "$T" --tokens $OUT/tokens.jsonl --out $OUT/data --max-len 1024

fit() {  # name, threads, args...
  local name=$1 th=$2; shift 2
  OMP_NUM_THREADS=$th $B/vllm-hass train fit --target "$T" --data $OUT/data --seed 0 \
    --threads "$th" --out $OUT/smollm2-$name "$@" \
    $([ -f $OUT/smollm2-$name.state.pt ] && echo --resume) > $OUT/fit-$name.log 2>&1
}
fit eagle1 2 --method eagle --epochs $EPOCHS1 --lr 1e-3 --draft-vocab $V
fit hass 2 --method hass --init $OUT/smollm2-eagle1 --epochs $EPOCHS2 --lr 5e-4 \
  --draft-vocab-from $OUT/smollm2-eagle1
fit eagle 1 --method eagle --init $OUT/smollm2-eagle1 --epochs $EPOCHS2 --lr 5e-4 \
  --draft-vocab-from $OUT/smollm2-eagle1
# held-out per-step agreement (the 32 prompts no run trained on)
$B/vllm-hass train eval --target "$T" --data $OUT/data --samples 32 --steps 5 \
  --head $OUT/smollm2-eagle --head $OUT/smollm2-hass | tee $OUT/eval-heldout.txt
# inside vLLM, configurations alternated: examples/bench_smollm2.sh with HEAD=$OUT/smollm2-...
