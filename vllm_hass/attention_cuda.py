"""Tree attention on CUDA: vLLM's FlashAttention / Triton backends, with the rows of
tree requests computed by our Triton kernel (`vllm_hass.kernels.tree_attention`).

For a step with `TreeAttnInfo` (`attn_metadata.hass_tree`), the kernel reads the
tree rows straight out of the step's query (`q_row_start`: first row of each tree
request) and writes them straight into vLLM's output buffer: no gather or scatter
per layer, no device sync (host bounds `max_query_len` / `max_prefix_len`), no
argument checks (`validate=False`; the runner builds the info). K/V come from the
same paged cache through `split_kv_cache` views (the layout both backends use).

vLLM's own kernel runs first only when some rows are not tree rows (mixed steps:
prefills, requests without trees); when `info.all_rows` (steady-state decode) it is
skipped. That is safe because the KV-cache write is not part of `forward` here.
Checked in vLLM 0.32.0 (`.venv/.../vllm/v1/attention/backends/`): both
`FlashAttentionBackend` and `TritonAttentionBackend` set
`forward_includes_kv_cache_update = False` and implement `do_kv_cache_update`
(reshape_and_cache_flash / triton_reshape_and_cache_flash), and
`model_executor/layers/attention/attention.py` (`Attention.forward`) then calls
`unified_kv_cache_update` (-> impl.do_kv_cache_update) before
`unified_attention_with_output` (-> impl.forward). So the step's K/V, tree slots
included, are in the cache before this forward runs, whether or not vLLM's kernel
does. Not re-checked against 0.33 (not installed here).

fp8 KV caches are not handled (the kernel reads K/V in the query dtype); the runner
refuses them at start-up, so the hot path has no check.

Status: written against vLLM 0.32 sources; the kernel is tested under the Triton
interpreter and compiled for sm_80/sm_90 in CI, but this wrapper has not run inside
vLLM on a GPU (no GPU was available to this project).
"""

from __future__ import annotations

import torch
from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend, FlashAttentionImpl
from vllm.v1.attention.backends.triton_attn import TritonAttentionBackend, TritonAttentionImpl

from vllm_hass.attn_info import layer_kv_views, tree_rows
from vllm_hass.kernels import tree_attention as _ta
from vllm_hass.kernels.tree_attention import split_kv_cache, tree_attention


def _tree_rows(impl, query, kv_cache, info, output) -> None:
    # query / output: the whole step's rows, as vLLM's Attention.forward hands them over
    k, v = layer_kv_views(impl, kv_cache, split_kv_cache)
    tree_rows(info, query, k, v, output, impl.num_heads, impl.head_size, impl.scale, tree_attention)


class _TreeRows:
    """Mixin over a vLLM attention impl: its kernel for non-tree rows, ours for tree rows."""

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None):
        info = getattr(attn_metadata, "hass_tree", None)
        if info is None or not info.all_rows:
            super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                            output_scale, output_block_scale)
        if info is not None:
            _tree_rows(self, query, kv_cache, info, output)
        return output


def warmup(impl, kv_cache: torch.Tensor, max_query_len_bound: int, *, n_words: int = 1) -> int:
    """Compile every tree-kernel variant serving can need (call once per attention
    config at start-up, with a layer's real KV cache; nothing is written to it).

    The example query is a view of a fused qkv row, as vLLM's models hand it over."""
    hq, hkv, d = impl.num_heads, impl.num_kv_heads, impl.head_size
    qkv = torch.empty(1, (hq + 2 * hkv) * d, dtype=kv_cache.dtype, device=kv_cache.device)
    query = qkv[:, : hq * d].view(1, hq, d)
    k, v = split_kv_cache(kv_cache)
    return _ta.warmup(query, k, v, max_query_len_bound, out=torch.empty(1, hq, d, dtype=kv_cache.dtype,
                                                                         device=kv_cache.device),
                      n_words=n_words)


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
