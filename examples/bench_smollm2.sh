#!/usr/bin/env bash
# tau and throughput of the trained SmolLM2 heads inside vLLM (CPU), as in the README table:
#   examples/bench_smollm2.sh eagle   # then: hass
# MT-bench: no-spec, stock vLLM EAGLE (chain), HASS chain, HASS tree, and the pure-torch
# EAGLE-2 oracle; HumanEval: no-spec, chain, tree. Same prompts and settings for both heads.
set -euo pipefail
cd "$(dirname "$0")/.."
m=${1:?usage: $0 eagle|hass}
HEAD=${HEAD:-runs/smollm2-$m}
OUT=${OUT:-runs}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} VLLM_CPU_KVCACHE_SPACE=2 HF_HUB_OFFLINE=1
T=$(.venv/bin/vllm-hass train fetch --smollm2 | tail -1)
ARGS="--target $T --spec $HEAD/hass.json --batch-sizes 16 --temperature 0,1 --num-prompts 16
      --max-tokens 96 --chain-k 4 --tree 6,10,60 --resume"
.venv/bin/vllm-hass bench $ARGS --dataset mtbench --configs nospec,eagle,hass-chain,hass-tree,oracle \
  --out $OUT/bench-$m-mtbench
.venv/bin/vllm-hass bench $ARGS --dataset humaneval --configs nospec,hass-chain,hass-tree \
  --out $OUT/bench-$m-humaneval
