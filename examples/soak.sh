#!/usr/bin/env bash
# Issue 16 soak: 64 clients for 5 minutes per server on SmolLM2-135M-Instruct with the shipped
# HASS head, as a tree and as a chain, then the same seeded traffic without speculation (the
# reference figures) and a replay of every T = 0 request on it. `vllm-hass bench load` exits 1
# unless: 0 errors, every T = 0 output identical to no-spec, the servers answer afterwards
# with nothing left in the engine, and RSS grows <= 5% from minute 1 to the end.
#   examples/soak.sh                            # the soak: OUT/results.md and results.json
#   CLIENTS=8 DURATION=30 OUT=runs/soak-smoke examples/soak.sh   # a smoke run
set -euo pipefail
cd "$(dirname "$0")/.."
CLIENTS=${CLIENTS:-64} DURATION=${DURATION:-300} TREE=${TREE:-6,10,60} CHAIN=${CHAIN:-4}
MAX_TOKENS=${MAX_TOKENS:-128} OUT=${OUT:-runs/soak}
SERVE_ARGS=${SERVE_ARGS:---max-model-len 2048 --max-num-seqs 16}
export LD_PRELOAD=${LD_PRELOAD:-$PWD/.venv/lib/libiomp5.so} HF_HUB_OFFLINE=1
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-2}
T=$(.venv/bin/python -c "from vllm_hass.assets import smollm2_dir; print(smollm2_dir())")  # built once, cached
H=$PWD/vllm_hass/heads/smollm2-135m-instruct-hass
mkdir -p "$OUT"
IFS=, read -r d k n <<< "$TREE"
echo "{\"method\": \"hass\", \"model\": \"$H\", \"tree\": {\"depth\": $d, \"top_k\": $k, \"total_tokens\": $n}}" \
  > "$OUT/tree.json"
echo "{\"method\": \"hass\", \"model\": \"$H\", \"num_speculative_tokens\": $CHAIN}" > "$OUT/chain.json"
exec .venv/bin/vllm-hass bench load --target "$T" --spec "$OUT/tree.json" --spec "$OUT/chain.json" \
  --clients "$CLIENTS" --duration "$DURATION" --max-tokens "$MAX_TOKENS" --max-rss-growth 0.05 \
  --serve-args "$SERVE_ARGS" --out "$OUT"
