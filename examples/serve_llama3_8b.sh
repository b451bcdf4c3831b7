#!/usr/bin/env bash
# Llama-3-8B-Instruct + HASS head, EAGLE-2 tree (depth 6, top_k 10, 60 tokens), one GPU.
# Make the head first (docs/convert-hass-llama3.md):
#   vllm-hass convert ckpt/HASS-LLaMA3-Instruct-8B --target $TARGET --out heads/hass-llama3-8b
# TARGET (a local directory, or a hub id where a hub is reachable) and SPEC (a hass.json) may be set
# in the environment; extra arguments go to `vllm serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
SPEC=${SPEC:-examples/hass-llama3-8b.json}
TARGET=${TARGET:-meta-llama/Meta-Llama-3-8B-Instruct}
exec vllm serve "$TARGET" \
  --tensor-parallel-size 1 \
  --speculative-config "$SPEC" \
  --shutdown-timeout 30 \
  "$@"
