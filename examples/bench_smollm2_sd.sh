#!/usr/bin/env bash
# Issue 17's re-measure inside vLLM: the self-distilled EAGLE and HASS heads of
# examples/train_smollm2_sd.sh, chain 4 and tree 4/4/16 (16 nodes), T = 0 and 1, MT-bench and
# HumanEval, 16 prompts x 96 tokens at batch 16 (tau and per-depth acceptance; one round, as
# tau does not depend on timing). The two heads run side by side, one thread each.
#   examples/bench_smollm2_sd.sh            # then: vllm-hass bench compare (printed at the end)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/sd}
export OMP_NUM_THREADS=1 VLLM_CPU_KVCACHE_SPACE=2 HF_HUB_OFFLINE=1
export LD_PRELOAD=${LD_PRELOAD:-$PWD/.venv/lib/libiomp5.so}
T=$(.venv/bin/vllm-hass train fetch --smollm2 | tail -1)
one() {  # head dataset
  .venv/bin/vllm-hass bench --target "$T" --spec $OUT/smollm2-$1/hass.json --dataset $2 \
    --configs hass-chain,hass-tree --batch-sizes 16 --temperature 0,1 --num-prompts 16 \
    --max-tokens 96 --chain-k 4 --tree 4,4,16 --rounds 1 --resume --out $OUT/bench-$1-$2 \
    > $OUT/bench-$1-$2.log 2>&1
}
for d in mtbench humaneval; do
  one eagle $d & one hass $d & wait
done
for d in mtbench humaneval; do
  .venv/bin/vllm-hass bench compare $OUT/bench-eagle-$d $OUT/bench-hass-$d --label EAGLE HASS
done
