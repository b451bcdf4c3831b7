#!/usr/bin/env bash
# Llama-3-70B-Instruct + HASS head, EAGLE-2 tree (depth 6, top_k 10, 60 tokens), tensor parallel 2.
# TP=2 holds the bf16 weights (~141 GB) only on 2x H200-class GPUs (or an FP8 target); use TP 4 on 80 GB cards.
# Make the head first (docs/convert-hass-llama3.md):
#   vllm-hass convert ckpt/HASS-LLaMA3-Instruct-70B --target $TARGET --out heads/hass-llama3-70b
# TARGET (a local directory, or a hub id where a hub is reachable) and SPEC (a hass.json) may be set
# in the environment; extra arguments go to `vllm serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
SPEC=${SPEC:-examples/hass-llama3-70b.json}
TARGET=${TARGET:-meta-llama/Meta-Llama-3-70B-Instruct}
exec vllm serve "$TARGET" \
  --tensor-parallel-size 2 \
  --speculative-config "$SPEC" \
  --shutdown-timeout 30 \
  "$@"
