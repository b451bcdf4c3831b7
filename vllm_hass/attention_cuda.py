"""Tree attention on CUDA: vLLM's FlashAttention / Triton backends, with the rows of
tree requests recomputed by our Triton kernel (`vllm_hass.kernels.tree_attention`).

vLLM's kernel runs first on every row (it also writes nothing but `output`; the
KV cache update is a separate step in 0.32), then rows listed in the step's
`TreeAttnInfo` are overwritten with tree-masked attention read from the same
paged cache through `split_kv_cache` views (the layout both backends use).

Status: written against vLLM 0.32 sources; the kernel is tested under the
Triton interpreter and compiled for sm_80/sm_90 in CI, but this wrapper has not
run inside vLLM on a GPU (no GPU was available to this project).
"""

from __future__ import annotations

from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend, FlashAttentionImpl
from vllm.v1.attention.backends.triton_attn import TritonAttentionBackend, TritonAttentionImpl

from vllm_hass.kernels.tree_attention import split_kv_cache, tree_attention


def _tree_rows(impl, query, kv_cache, info, output) -> None:
    if kv_cache.dtype != query.dtype:
        raise NotImplementedError("HASS trees: quantized (fp8) KV caches are not supported")
    k, v = split_kv_cache(kv_cache)
    q = query.view(-1, impl.num_heads, impl.head_size)[info.rows]
    out = tree_attention(q, k, v, info.block_table, info.query_start_loc, info.prefix_lens,
                         info.tree_lens, info.tree_mask, scale=impl.scale)
    output.view(-1, impl.num_heads, impl.head_size)[info.rows] = out.to(output.dtype)


class _TreeRows:
    """Mixin over a vLLM attention impl: its kernel for every row, then the tree rows."""

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None):
        super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                        output_scale, output_block_scale)
        info = getattr(attn_metadata, "hass_tree", None)
        if info is not None:
            _tree_rows(self, query, kv_cache, info, output)
        return output


class TreeFlashAttentionImpl(_TreeRows, FlashAttentionImpl):
    pass


class TreeTritonAttentionImpl(_TreeRows, TritonAttentionImpl):
    pass


class TreeFlashAttentionBackend(FlashAttentionBackend):
    hass_tree_masks = True  # read by runner.check_tree_backends
    @staticmethod
    def get_impl_cls():
        return TreeFlashAttentionImpl


class TreeTritonAttentionBackend(TritonAttentionBackend):
    hass_tree_masks = True
    @staticmethod
    def get_impl_cls():
        return TreeTritonAttentionImpl


def register() -> None:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(AttentionBackendEnum.FLASH_ATTN,
                     "vllm_hass.attention_cuda.TreeFlashAttentionBackend")
    register_backend(AttentionBackendEnum.TRITON_ATTN,
                     "vllm_hass.attention_cuda.TreeTritonAttentionBackend")
