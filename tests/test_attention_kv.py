"""The CPU attention path's KV layout, against vLLM's own CPU writer.

K/V are written with `vllm._custom_ops.cpu_attn_reshape_and_cache` exactly as
vLLM's CPU backend does in `do_kv_cache_update` (cache [num_blocks, Hkv, block_size,
2*D] viewed as [num_blocks, Hkv, 2*block_size, D] and split in two along dim 2), for
the "vec" and "vec16" ISAs that tree mode forces, and read back through
`vllm_hass.attention.cpu_kv_views`. Then `vllm_hass.sampler.compact_kv` (CPU path)
must move exactly the requested slots, in every layer, and leave every other byte of
the caches as it was: the expected cache is built by vLLM's writer alone.
"""

import pytest
import torch
from vllm import _custom_ops as ops

from vllm_hass.attention import cpu_kv_views
from vllm_hass.sampler import compact_kv, kv_layer_views

H = 3  # KV heads


def write(cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor,
          isa: str) -> None:
    """vLLM's CPUAttentionBackendImpl.do_kv_cache_update, minus the layer object."""
    nb, hkv, bs, _ = cache.shape
    kc, vc = cache.view(nb, hkv, 2 * bs, -1).chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(key, value, kc, vc, slots, isa)


def isas_for(head_size: int):
    # vLLM picks vec16 for head sizes that are multiples of 16 but not 32; both kernels
    # accept any multiple of 16 here
    return ["vec", "vec16"] if head_size % 32 == 0 else ["vec16"]


CASES = [(isa, d, bs, dtype) for d in (64, 48) for isa in isas_for(d) for bs in (16, 32)
         for dtype in (torch.float32, torch.bfloat16)]


@pytest.mark.parametrize("isa,head_size,block_size,dtype", CASES)
def test_write_then_read_back(isa, head_size, block_size, dtype):
    nb = 6
    g = torch.Generator().manual_seed(head_size * 100 + block_size)
    cache = torch.zeros(nb, H, block_size, 2 * head_size, dtype=dtype)
    # both sides of every block boundary, the first and the last slot, a few inside
    slots = sorted({0, 1, block_size - 1, block_size, 2 * block_size - 1, 2 * block_size,
                    3 * block_size + 5, nb * block_size - 2, nb * block_size - 1})
    slots = torch.tensor(slots, dtype=torch.long)[torch.randperm(len(slots), generator=g)]
    key = torch.randn(len(slots), H, head_size, generator=g).to(dtype)
    value = torch.randn(len(slots), H, head_size, generator=g).to(dtype)
    write(cache, key, value, slots, isa)

    k, v = cpu_kv_views(cache)
    assert k.shape == v.shape == (nb, block_size, H, head_size)
    assert k.data_ptr() == cache.data_ptr()  # views, not copies (the reference reads them)
    blk, off = slots // block_size, slots % block_size
    assert torch.equal(k[blk, off], key)
    assert torch.equal(v[blk, off], value)
    # nothing else was written: every other slot still reads zero through the views
    untouched = torch.ones(nb * block_size, dtype=torch.bool)
    untouched[slots] = False
    assert not k.reshape(-1, H, head_size)[untouched].any()
    assert not v.reshape(-1, H, head_size)[untouched].any()
    assert int((cache != 0).sum()) == int((key != 0).sum() + (value != 0).sum())


def _filled_layers(isa, n_layers, nb, bs, d, seed):
    """Caches whose every slot holds known random K/V (written by vLLM), and those K/V."""
    g = torch.Generator().manual_seed(seed)
    layers, kvs = [], []
    all_slots = torch.arange(nb * bs)
    for _ in range(n_layers):
        cache = torch.zeros(nb, H, bs, 2 * d)
        key = torch.randn(nb * bs, H, d, generator=g)
        value = torch.randn(nb * bs, H, d, generator=g)
        write(cache, key, value, all_slots, isa)
        layers.append(cache)
        kvs.append((key, value))
    return layers, kvs


@pytest.mark.parametrize("isa", ["vec", "vec16"])
def test_compact_kv_moves_exactly_the_requested_slots(isa):
    nb, bs, d = 8, 16, 64
    layers, kvs = _filled_layers(isa, 2, nb, bs, d, seed=5)
    # non-contiguous, permuted blocks per request
    block_table = torch.tensor([[3, 0, 5, 7], [1, 6, 2, 4]], dtype=torch.int32)
    # request 0: an accepted path compacted towards the root (root at 12, path slots
    # 2, 5, 9, 15 -> positions 14, 17, 21, 27 move to 13..16: position 14 is read and
    # written, the moves cross the block boundary at 16);
    # request 1: a rotation of positions 30..35 (a permutation whose source and
    # destination ranges coincide, across the boundary at 32)
    req = torch.tensor([0, 0, 0, 0] + [1] * 6)
    src = torch.tensor([14, 17, 21, 27] + [30, 31, 32, 33, 34, 35])
    dst = torch.tensor([13, 14, 15, 16] + [31, 32, 33, 34, 35, 30])
    # compact_kv's [B, D] form: request 0 padded with no-op pairs at its root (12)
    src2 = torch.tensor([[14, 17, 21, 27, 12, 12], [30, 31, 32, 33, 34, 35]])
    dst2 = torch.tensor([[13, 14, 15, 16, 12, 12], [31, 32, 33, 34, 35, 30]])

    def slot(r, pos):
        return block_table[r, pos // bs].long() * bs + pos % bs

    s_src, s_dst = slot(req, src), slot(req, dst)
    expected = []
    for cache, (key, value) in zip(layers, kvs):
        want = cache.clone()
        write(want, key[s_src], value[s_src], s_dst, isa)  # vLLM's writer, not the views
        expected.append(want)

    compact_kv(kv_layer_views(layers), block_table, bs, src2, dst2)

    for cache, want in zip(layers, expected):
        assert torch.equal(cache, want)  # the moved slots, and every other byte unchanged
    # and read through the views: the destination holds the source's old K/V
    for cache, (key, value) in zip(layers, kvs):
        k, v = cpu_kv_views(cache)
        assert torch.equal(k[s_dst // bs, s_dst % bs], key[s_src])
        assert torch.equal(v[s_dst // bs, s_dst % bs], value[s_src])
        moved = torch.zeros(nb * bs, dtype=torch.bool)
        moved[s_dst] = True
        assert torch.equal(k.reshape(-1, H, d)[~moved], key[~moved])
        assert torch.equal(v.reshape(-1, H, d)[~moved], value[~moved])


def test_compact_kv_with_nothing_to_move_is_a_no_op():
    layers, _ = _filled_layers("vec", 1, 4, 16, 32, seed=9)
    before = layers[0].clone()
    noop = torch.full((1, 6), 20, dtype=torch.long)  # every pair src = dst = the root
    compact_kv(kv_layer_views(layers), torch.tensor([[0, 1, 2, 3]], dtype=torch.int32), 16, noop, noop)
    assert torch.equal(layers[0], before)
