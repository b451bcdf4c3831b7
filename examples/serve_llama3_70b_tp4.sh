#!/usr/bin/env bash
# Llama-3-70B-Instruct + HASS head, EAGLE-2 tree (depth 6, top_k 10, 60 tokens), tensor parallel 4.
# Make the head first (docs/convert-hass-llama3.md):
#   vllm-hass convert ckpt/HASS-LLaMA3-Instruct-70B --target $TARGET --out heads/hass-llama3-70b
# TARGET (a local directory, or a hub id where a hub is reachable) and SPEC (a hass.json) may be set
# in the environment; extra arguments go to `vllm serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
SPEC=${SPEC:-examples/hass-llama3-70b.json}
TARGET=${TARGET:-meta-llama/Meta-Llama-3-70B-Instruct}
exec vllm serve "$TARGET" \
  --tensor-parallel-size 4 \
  --speculative-config "$SPEC" \
  --shutdown-timeout 30 \
  "$@"
