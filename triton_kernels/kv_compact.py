"""Move the accepted path's K/V from its tree slots to the slots right after the context.

After verification request b keeps tree nodes path_0 < path_1 < ...; their
K/V sit at logical positions prefix + path_j and must end at prefix + j, in
every layer, before the next step writes there. One launch covers all layers
and the whole batch.

Design (why, not what):

* Pairs are (src, dst) logical positions per request in CSR form; each is
  translated through the request's block table, so the kernel knows nothing
  about trees and also serves any other in-cache move.
* Semantics are "gather every source, then scatter" (what the torch reference
  does). Source and destination slots may overlap: in compaction dst_j =
  prefix + j <= src_j = prefix + path_j. The precondition that makes a
  chunked in-order walk equal to that snapshot is: for every k > j,
  src_k != dst_j (a pair never overwrites a slot a later pair still reads),
  plus distinct destinations, and across requests no destination slot is
  another request's source or destination. A program loads a chunk of
  BLOCK_P pairs, syncs its threads, then stores them, chunk after chunk, so
  pairs move in parallel while the precondition keeps it race-free.
* Layers come either as one 5-D strided view [L, num_blocks, block_size, Hkv,
  D] (vLLM allocates a KV-cache group's layers in one tensor; the layer is
  just one more stride) or as a list of per-layer views with identical
  shape/strides, passed as a table of base pointers (the pattern of Triton's
  grouped-GEMM tutorial). No layer is assumed contiguous.
* The grid is (request, layer, head chunk): copies are independent across
  all three, and splitting heads keeps enough programs in flight for small
  batches. Pairs with src == dst (the path's prefix that is already in place)
  are skipped, so they cost nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

__all__ = ["kv_compact", "kv_compact_ref", "check_compact_pairs"]

# a copy: any element type works; uint8 is how vLLM stores fp8 caches
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.uint8)

Caches = torch.Tensor | Sequence[torch.Tensor]

# layer base-pointer tables by (device, pointers): a serving loop passes the same layers every
# step, so after the first call no host->device copy happens (and CUDA-graph capture works)
_PTR_TABLES: dict[tuple, torch.Tensor] = {}


def _ptr_table(layers: list[torch.Tensor]) -> torch.Tensor:
    key = (str(layers[0].device), *(t.data_ptr() for t in layers))
    table = _PTR_TABLES.get(key)
    if table is None:
        if len(_PTR_TABLES) >= 64:
            _PTR_TABLES.clear()
        table = torch.tensor(key[1:], dtype=torch.int64).to(layers[0].device)
        _PTR_TABLES[key] = table
    return table


def _layers(name: str, caches: Caches) -> list[torch.Tensor]:
    if isinstance(caches, torch.Tensor):
        if caches.dim() != 5:
            raise ValueError(f"{name}: expected [L, num_blocks, block_size, Hkv, D], got {tuple(caches.shape)}")
        return list(caches.unbind(0))
    layers = list(caches)
    if not layers:
        raise ValueError(f"{name}: expected at least one layer")
    ref = layers[0]
    for i, t in enumerate(layers):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name}[{i}]: expected a [num_blocks, block_size, Hkv, D] tensor")
        if t.shape != ref.shape or t.stride() != ref.stride() or t.dtype != ref.dtype or t.device != ref.device:
            raise ValueError(
                f"{name}[{i}]: expected shape {tuple(ref.shape)} strides {ref.stride()} {ref.dtype} on {ref.device} "
                f"like layer 0, got {tuple(t.shape)} strides {t.stride()} {t.dtype} on {t.device}"
            )
    return layers


def _check(key_caches, value_caches, block_table, cu_pairs, src_pos, dst_pos):
    ks, vs = _layers("key_caches", key_caches), _layers("value_caches", value_caches)
    if len(ks) != len(vs):
        raise ValueError(f"value_caches: expected {len(ks)} layers like key_caches, got {len(vs)}")
    k0, v0 = ks[0], vs[0]
    if v0.shape != k0.shape or v0.dtype != k0.dtype or v0.device != k0.device:
        raise ValueError(f"value_caches: expected {tuple(k0.shape)} {k0.dtype} on {k0.device}, "
                         f"got {tuple(v0.shape)} {v0.dtype} on {v0.device}")
    if k0.dtype not in _DTYPES:
        raise ValueError(f"key_caches: unsupported dtype {k0.dtype}")
    if block_table.dim() != 2:
        raise ValueError(f"block_table: expected [B, max_blocks], got {tuple(block_table.shape)}")
    b = block_table.shape[0]
    for name, t, shape in (("block_table", block_table, tuple(block_table.shape)),
                           ("cu_pairs", cu_pairs, (b + 1,)),
                           ("src_pos", src_pos, tuple(src_pos.shape)),
                           ("dst_pos", dst_pos, tuple(src_pos.shape))):
        if tuple(t.shape) != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {tuple(t.shape)}")
        if t.dtype != torch.int32:
            raise ValueError(f"{name}: expected int32, got {t.dtype}")
        if t.device != k0.device:
            raise ValueError(f"{name}: device must match the caches ({k0.device}), got {t.device}")
    if src_pos.dim() != 1:
        raise ValueError(f"src_pos: expected 1-D [n_pairs], got {tuple(src_pos.shape)}")
    return ks, vs


def check_compact_pairs(block_table, cu_pairs, src_pos, dst_pos, block_size: int) -> None:
    """Raise ValueError unless the pairs satisfy kv_compact's precondition (one device sync)."""
    n = src_pos.numel()
    cu = cu_pairs.long()
    if int(cu[0]) != 0 or int(cu[-1]) != n or bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(f"cu_pairs: expected non-decreasing from 0 to n_pairs={n}, got {cu.tolist()}")
    if n == 0:
        return
    cap = block_table.shape[1] * block_size
    for name, p in (("src_pos", src_pos), ("dst_pos", dst_pos)):
        if bool(((p < 0) | (p >= cap)).any()):
            raise ValueError(f"{name}: positions must be in [0, {cap}) (block_table capacity)")
    req = torch.repeat_interleave(torch.arange(cu.numel() - 1, device=cu.device), cu[1:] - cu[:-1], output_size=n)

    def slot(p):  # physical slot id: requests may share blocks, so compare slots, not positions
        p = p.long()
        return block_table.long()[req, p // block_size] * block_size + p % block_size

    src, dst = slot(src_pos), slot(dst_pos)
    idx = torch.arange(n, device=src.device)
    same_req = req[:, None] == req[None, :]
    later = idx[None, :] > idx[:, None]  # [j, k]: k after j
    clobber = (dst[:, None] == src[None, :]) & (later | ~same_req)  # dst_j is read by a later / other pair
    if bool(clobber.any()):
        j, k = (int(x) for x in clobber.nonzero()[0])
        raise ValueError(
            f"kv_compact precondition violated: pair {j} (request {int(req[j])}) writes the slot pair {k} "
            f"(request {int(req[k])}) reads (need src_k != dst_j for all k > j, and no slot shared across requests)"
        )
    dup = (dst[:, None] == dst[None, :]) & (idx[:, None] != idx[None, :])
    if bool(dup.any()):
        j, k = (int(x) for x in dup.nonzero()[0])
        raise ValueError(f"kv_compact precondition violated: pairs {j} and {k} write the same slot")


def kv_compact_ref(key_caches: Caches, value_caches: Caches, block_table, cu_pairs, src_pos, dst_pos) -> None:
    """torch gather/scatter, in place; checks the precondition and raises ValueError if it fails."""
    ks, vs = _check(key_caches, value_caches, block_table, cu_pairs, src_pos, dst_pos)
    bs = ks[0].shape[1]
    check_compact_pairs(block_table, cu_pairs, src_pos, dst_pos, bs)
    n = src_pos.numel()
    if n == 0:
        return
    cu = cu_pairs.long()
    req = torch.repeat_interleave(torch.arange(cu.numel() - 1, device=cu.device), cu[1:] - cu[:-1], output_size=n)
    bt = block_table.long()
    sb, so = bt[req, src_pos.long() // bs], src_pos.long() % bs
    db, do = bt[req, dst_pos.long() // bs], dst_pos.long() % bs
    for layer in (*ks, *vs):
        layer[db, do] = layer[sb, so]  # advanced indexing gathers first: snapshot semantics


if triton is not None:

    @triton.jit
    def _kv_compact_kernel(
        K, V, k_ptrs, v_ptrs, block_table, cu_pairs, src_pos, dst_pos,
        num_heads, head_dim, stride_kl, stride_vl,
        stride_kb, stride_kt, stride_kh, stride_kd,
        stride_vb, stride_vt, stride_vh, stride_vd,
        stride_bt, stride_bt1,
        PAGE: tl.constexpr, PTR_TABLE: tl.constexpr,
        BLOCK_P: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        req = tl.program_id(0)
        layer = tl.program_id(1)
        if PTR_TABLE:
            k_base = tl.load(k_ptrs + layer).to(tl.pointer_type(K.dtype.element_ty))
            v_base = tl.load(v_ptrs + layer).to(tl.pointer_type(V.dtype.element_ty))
        else:
            k_base = K + layer.to(tl.int64) * stride_kl
            v_base = V + layer.to(tl.int64) * stride_vl
        # flattened (head, dim) tile of this program's head chunk
        e = tl.arange(0, BLOCK_H * BLOCK_D)
        h = tl.program_id(2) * BLOCK_H + e // BLOCK_D
        d = e % BLOCK_D
        e_ok = (h < num_heads) & (d < head_dim)
        k_hd = (h * stride_kh + d * stride_kd)[None, :]
        v_hd = (h * stride_vh + d * stride_vd)[None, :]
        bt = block_table + req.to(tl.int64) * stride_bt

        lo = tl.load(cu_pairs + req)
        hi = tl.load(cu_pairs + req + 1)
        for p0 in range(lo, hi, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P)
            src = tl.load(src_pos + p, mask=p < hi, other=0)
            dst = tl.load(dst_pos + p, mask=p < hi, other=0)
            move = (p < hi) & (src != dst)
            sb = tl.load(bt + (src // PAGE) * stride_bt1, mask=move, other=0).to(tl.int64)
            db = tl.load(bt + (dst // PAGE) * stride_bt1, mask=move, other=0).to(tl.int64)
            m = move[:, None] & e_ok[None, :]
            kv = tl.load(k_base + (sb * stride_kb + (src % PAGE) * stride_kt)[:, None] + k_hd, mask=m)
            vv = tl.load(v_base + (sb * stride_vb + (src % PAGE) * stride_vt)[:, None] + v_hd, mask=m)
            # every thread's loads of this chunk land before any thread overwrites a slot
            tl.debug_barrier()
            tl.store(k_base + (db * stride_kb + (dst % PAGE) * stride_kt)[:, None] + k_hd, kv, mask=m)
            tl.store(v_base + (db * stride_vb + (dst % PAGE) * stride_vt)[:, None] + v_hd, vv, mask=m)
            # no second barrier: by the precondition no later chunk reads a slot this one wrote


def kv_compact(
    key_caches: Caches,
    value_caches: Caches,
    block_table: torch.Tensor,
    cu_pairs: torch.Tensor,
    src_pos: torch.Tensor,
    dst_pos: torch.Tensor,
    *,
    validate: bool = False,
    block_pairs: int = 16,
    block_heads: int | None = None,
) -> None:
    """Copy K/V slot src_pos[i] -> dst_pos[i] of request b (cu_pairs[b] <= i < cu_pairs[b+1]), all layers.

    key_caches / value_caches: a 5-D view [L, num_blocks, block_size, Hkv, D]
    or a list of L per-layer views [num_blocks, block_size, Hkv, D] (any
    strides, shared by all layers). block_table [B, max_blocks] int32;
    cu_pairs [B+1], src_pos / dst_pos [n_pairs] int32 logical positions.
    validate=True checks the precondition first (one device sync).
    """
    if triton is None:  # pragma: no cover
        raise RuntimeError("kv_compact: triton is not installed; use kv_compact_ref")
    ks, vs = _check(key_caches, value_caches, block_table, cu_pairs, src_pos, dst_pos)
    nb, page, hkv, d = ks[0].shape
    if validate:
        check_compact_pairs(block_table, cu_pairs, src_pos, dst_pos, page)
    b, n_layers = block_table.shape[0], len(ks)
    if b == 0 or src_pos.numel() == 0:
        return
    k0, v0 = ks[0], vs[0]
    if isinstance(key_caches, torch.Tensor) and isinstance(value_caches, torch.Tensor):
        ptr_table, stride_kl, stride_vl = False, key_caches.stride(0), value_caches.stride(0)
        k_ptrs = v_ptrs = cu_pairs  # unused
    else:
        ptr_table, stride_kl, stride_vl = True, 0, 0
        k_ptrs, v_ptrs = _ptr_table(ks), _ptr_table(vs)
    for name, val in (("block_pairs", block_pairs), ("block_heads", block_heads)):
        if val is not None and (val < 1 or val & (val - 1)):
            raise ValueError(f"{name}: expected a power of 2, got {val}")
    block_d = triton.next_power_of_2(d)
    if block_heads is None:
        # split heads until ~4 programs per SM or ~256 elements per pair row
        sms = torch.cuda.get_device_properties(k0.device).multi_processor_count if k0.is_cuda else 1
        block_heads = triton.next_power_of_2(hkv)
        while block_heads > 1 and (block_heads * block_d > 2048 or
                                   (b * n_layers * triton.cdiv(hkv, block_heads) < 4 * sms
                                    and block_heads * block_d > 256)):
            block_heads //= 2
    _kv_compact_kernel[(b, n_layers, triton.cdiv(hkv, block_heads))](
        k0, v0, k_ptrs, v_ptrs, block_table, cu_pairs.contiguous(), src_pos.contiguous(), dst_pos.contiguous(),
        hkv, d, stride_kl, stride_vl, *k0.stride(), *v0.stride(), *block_table.stride(),
        PAGE=page, PTR_TABLE=ptr_table, BLOCK_P=block_pairs, BLOCK_H=block_heads, BLOCK_D=block_d,
        num_warps=4,
    )
