"""Tree attention over vLLM's paged KV cache (EAGLE-2 dynamic-tree verification).

Every request owns a draft tree whose shape changes per request and per step.
Its K/V already sit in the paged cache right after the request's context
(tree slot j at position prefix_len + j); each query token attends the whole
context plus the tree slots whose bit is set in its packed mask row
(ancestors + itself for verification, the same for the draft head's frontier
queries). One launch serves a mixed batch.

Design (why, not what):

* One program per (request, KV head, query tile, split). The tile's rows are
  (token, q-head) pairs of the query heads that share one KV head, so a K/V
  tile is loaded once and reused by all GQA heads: the kernel is bound by
  reading the context, and GQA packing divides that traffic by Hq/Hkv.
* The context is walked through the block table one BLOCK_N tile at a time
  with gathered pointers, so any block size and any cache strides work (vLLM
  hands out K/V as strided views of one [num_blocks, Hkv, block_size, 2D]
  tensor whose physical order depends on the backend's layout).
* Small batches with a long context would leave most SMs idle (B * Hkv *
  tiles programs), so the context is split flash-decoding style into
  NUM_SPLITS chunks; each writes a normalised partial output plus its
  log-sum-exp and a second tiny kernel merges them. The tree part is short
  (<= a few hundred slots) and runs in the last split only, in 32-slot tiles
  so each query row needs exactly one mask word per tile (one load per row,
  bits expanded in registers); siblings and cousins cost bandwidth, never
  weight. Slots past tree_len are never read, whatever the mask says.
* Softmax runs online in base 2 with the scale folded into log2(e), and with
  an explicit guard for rows that have seen no key yet, so a query with an
  empty tree mask and no context yields 0 instead of NaN.
* fp32 inputs use IEEE dot products (no TF32) so the kernel matches the fp32
  reference to ~1e-6; fp16/bf16 use tensor cores with fp32 accumulation. The
  Triton CPU interpreter mishandles bf16 arithmetic, so under TRITON_INTERPRET
  bf16 tiles are upcast to fp32 before the dot (GPU path unchanged).
"""

from __future__ import annotations

import functools
import math
import os

import torch

try:  # importable (reference + helpers) without Triton
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

__all__ = [
    "tree_attention",
    "tree_attention_ref",
    "tree_ancestor_mask",
    "pack_tree_mask",
    "unpack_tree_mask",
    "build_tree_mask",
    "split_kv_cache",
]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------- helpers


def split_kv_cache(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., num_blocks, Hkv, block_size, 2*D] -> (K, V), each [..., num_blocks, block_size, Hkv, D].

    Same views vLLM's Flash/Triton backends build (transpose + split on the last
    dim); whatever the physical order, they are views, never copies.
    """
    if kv_cache.dim() < 4 or kv_cache.shape[-1] % 2:
        raise ValueError(
            f"kv_cache: expected [..., num_blocks, Hkv, block_size, 2*D], got {tuple(kv_cache.shape)}"
        )
    d = kv_cache.shape[-1] // 2
    k, v = kv_cache.transpose(-3, -2).split(d, dim=-1)
    return k, v


def tree_ancestor_mask(parents: torch.Tensor, *, validate: bool = True) -> torch.Tensor:
    """parents [..., N] (-1 = root) -> bool [..., N, N], row i = ancestors(i) ∪ {i}.

    Any forest works (nodes need not be topologically sorted). Pointer jumping:
    ceil(log2 N) gather rounds, no per-depth loop and no host sync.
    """
    if parents.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"parents: expected int32/int64, got {parents.dtype}")
    n = parents.shape[-1]
    up = parents.long()
    if validate and n and bool(((up < -1) | (up >= n)).any()):
        raise ValueError(f"parents: entries must be in [-1, {n}), got min {int(up.min())} max {int(up.max())}")
    anc = torch.eye(n, dtype=torch.bool, device=parents.device).expand(*up.shape, n).clone()
    for _ in range(max(1, n.bit_length())):
        # invariant: anc[i] = ancestors within distance < 2^k, up[i] = ancestor at distance 2^k
        has = up >= 0
        idx = up.clamp(min=0)
        anc_up = torch.gather(anc, -2, idx.unsqueeze(-1).expand(*idx.shape, n))
        anc = anc | (anc_up & has.unsqueeze(-1))
        up = torch.where(has, torch.gather(up, -1, idx), up)
    if validate and bool((up >= 0).any()):
        raise ValueError("parents: contains a cycle (a node is its own ancestor)")
    return anc


def pack_tree_mask(mask: torch.Tensor, n_words: int | None = None) -> torch.Tensor:
    """bool [..., N] -> int32 [..., n_words]; bit j of the row = word j // 32, bit j % 32."""
    if mask.dtype != torch.bool:
        raise ValueError(f"mask: expected bool, got {mask.dtype}")
    n = mask.shape[-1]
    need = (n + 31) // 32
    n_words = need if n_words is None else n_words
    if n_words < need:
        raise ValueError(f"n_words: expected >= {need} for {n} tree slots, got {n_words}")
    bits = torch.zeros(*mask.shape[:-1], n_words * 32, dtype=torch.int64, device=mask.device)
    bits[..., :n] = mask.long()
    shifts = torch.arange(32, device=mask.device, dtype=torch.int64)
    words = (bits.view(*mask.shape[:-1], n_words, 32) << shifts).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words)  # two's complement, bit 31 -> sign
    return words.to(torch.int32)


def unpack_tree_mask(packed: torch.Tensor, n: int) -> torch.Tensor:
    """int32 [..., n_words] -> bool [..., n] (inverse of pack_tree_mask)."""
    if packed.dtype != torch.int32:
        raise ValueError(f"tree_mask: expected int32, got {packed.dtype}")
    if n > packed.shape[-1] * 32:
        raise ValueError(f"tree_mask: {packed.shape[-1]} words hold {packed.shape[-1] * 32} slots, need {n}")
    j = torch.arange(n, device=packed.device)
    words = packed[..., j // 32].long()
    return ((words >> (j % 32)) & 1).bool()


def build_tree_mask(
    parents: torch.Tensor,
    tree_lens: torch.Tensor,
    query_start_loc: torch.Tensor | None = None,
    query_nodes: torch.Tensor | None = None,
    *,
    n_words: int | None = None,
) -> torch.Tensor:
    """Packed mask rows [Tq, n_words] int32 for `tree_attention`.

    parents [B, N]: parent slot of tree slot j of request b (-1 = root); only
    the first tree_lens[b] entries are read. Verification (query_nodes None):
    the queries are every tree node of every request in slot order, Tq =
    sum(tree_lens). Draft expansion: query_nodes [Tq] gives each query's tree
    slot and query_start_loc [B+1] which request it belongs to.
    """
    if parents.dim() != 2:
        raise ValueError(f"parents: expected [B, N], got {tuple(parents.shape)}")
    b, n = parents.shape
    if tree_lens.shape != (b,):
        raise ValueError(f"tree_lens: expected shape ({b},), got {tuple(tree_lens.shape)}")
    if b and int(tree_lens.max()) > n:
        raise ValueError(f"tree_lens: max {int(tree_lens.max())} exceeds parents width {n}")
    dev = parents.device
    slot = torch.arange(n, device=dev)
    live = slot < tree_lens.to(dev).long().unsqueeze(1)
    par = torch.where(live, parents.long(), -1)
    if bool((live & (par >= tree_lens.to(dev).long().unsqueeze(1))).any()):
        raise ValueError("parents: a node's parent lies outside its request's tree")
    anc = tree_ancestor_mask(par) & live.unsqueeze(1)  # [B, N, N]
    packed = pack_tree_mask(anc, n_words)  # [B, N, W]
    if query_nodes is None:
        lens = tree_lens.to(dev).long()
        req = torch.repeat_interleave(torch.arange(b, device=dev), lens)
        start = torch.cumsum(lens, 0) - lens
        node = torch.arange(req.numel(), device=dev) - start[req]
    else:
        if query_start_loc is None or query_start_loc.shape != (b + 1,):
            raise ValueError(f"query_start_loc: expected shape ({b + 1},) with query_nodes")
        lens = (query_start_loc[1:] - query_start_loc[:-1]).to(dev).long()
        req = torch.repeat_interleave(torch.arange(b, device=dev), lens, output_size=query_nodes.numel())
        node = query_nodes.to(dev).long()
        if bool(((node < 0) | (node >= tree_lens.to(dev).long()[req])).any()):
            raise ValueError("query_nodes: a query names a slot outside its request's tree")
    return packed[req, node]


# --------------------------------------------------------------------------- validation


def _check(query, key_cache, value_cache, block_table, query_start_loc, prefix_lens, tree_lens, tree_mask, out):
    if query.dim() != 3:
        raise ValueError(f"query: expected [Tq, Hq, D], got {tuple(query.shape)}")
    tq, hq, d = query.shape
    if query.dtype not in _DTYPES:
        raise ValueError(f"query: dtype must be float32/float16/bfloat16, got {query.dtype}")
    for name, c in (("key_cache", key_cache), ("value_cache", value_cache)):
        if c.dim() != 4 or c.shape[3] != d:
            raise ValueError(f"{name}: expected [num_blocks, block_size, Hkv, {d}], got {tuple(c.shape)}")
        if c.dtype != query.dtype:
            raise ValueError(f"{name}: dtype must match query ({query.dtype}), got {c.dtype}")
        if c.device != query.device:
            raise ValueError(f"{name}: device must match query ({query.device}), got {c.device}")
    if value_cache.shape != key_cache.shape:
        raise ValueError(f"value_cache: expected shape {tuple(key_cache.shape)}, got {tuple(value_cache.shape)}")
    hkv = key_cache.shape[2]
    if hq % hkv:
        raise ValueError(f"query: Hq={hq} must be a multiple of Hkv={hkv}")
    if block_table.dim() != 2:
        raise ValueError(f"block_table: expected [B, max_blocks], got {tuple(block_table.shape)}")
    b = block_table.shape[0]
    for name, t, shape in (
        ("block_table", block_table, tuple(block_table.shape)),
        ("query_start_loc", query_start_loc, (b + 1,)),
        ("prefix_lens", prefix_lens, (b,)),
        ("tree_lens", tree_lens, (b,)),
    ):
        if tuple(t.shape) != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {tuple(t.shape)}")
        if t.dtype != torch.int32:
            raise ValueError(f"{name}: expected int32, got {t.dtype}")
        if t.device != query.device:
            raise ValueError(f"{name}: device must match query ({query.device}), got {t.device}")
    if tree_mask.dim() != 2 or tree_mask.shape[0] != tq:
        raise ValueError(f"tree_mask: expected [{tq}, n_words], got {tuple(tree_mask.shape)}")
    if tree_mask.dtype != torch.int32:
        raise ValueError(f"tree_mask: expected int32, got {tree_mask.dtype}")
    if tree_mask.device != query.device:
        raise ValueError(f"tree_mask: device must match query ({query.device}), got {tree_mask.device}")
    if out is not None and (out.shape != query.shape or out.dtype != query.dtype or out.device != query.device):
        raise ValueError(
            f"out: expected {tuple(query.shape)} {query.dtype} on {query.device}, "
            f"got {tuple(out.shape)} {out.dtype} on {out.device}"
        )


def _check_lengths(stats, tq, n_words, capacity):
    """stats = (qsl[0], qsl[-1], min q len, min prefix, min tree, max tree, max prefix+tree)."""
    q0, qend, min_q, min_p, min_t, max_t, max_ctx = stats
    if q0 != 0 or qend != tq or min_q < 0:
        raise ValueError(f"query_start_loc: expected non-decreasing from 0 to Tq={tq}, got {q0}..{qend}")
    if min_p < 0 or min_t < 0:
        raise ValueError("prefix_lens/tree_lens: expected non-negative lengths")
    if max_t > n_words * 32:
        raise ValueError(f"tree_lens: max {max_t} exceeds the {n_words * 32} slots of tree_mask's {n_words} words")
    if max_ctx > capacity:
        raise ValueError(f"prefix_lens + tree_lens: max {max_ctx} exceeds block_table capacity {capacity}")


def _length_stats(block_table, query_start_loc, prefix_lens, tree_lens):
    qlen = query_start_loc[1:] - query_start_loc[:-1]
    ctx = prefix_lens + tree_lens
    if prefix_lens.numel() == 0:
        return [int(query_start_loc[0]), int(query_start_loc[-1]), 0, 0, 0, 0, 0], 0, 0
    s = torch.stack([
        query_start_loc[0], query_start_loc[-1], qlen.min(), prefix_lens.min(), tree_lens.min(),
        tree_lens.max(), ctx.max(), qlen.max(), prefix_lens.max(),
    ]).tolist()  # one device sync for all checks and launch sizes
    return s[:7], s[7], s[8]


# --------------------------------------------------------------------------- reference


def tree_attention_ref(
    query, key_cache, value_cache, block_table, query_start_loc, prefix_lens, tree_lens, tree_mask,
    *, scale: float | None = None, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain torch: gather each request's K/V from the paged cache, explicit boolean mask, fp32 softmax."""
    _check(query, key_cache, value_cache, block_table, query_start_loc, prefix_lens, tree_lens, tree_mask, out)
    tq, hq, d = query.shape
    bs, hkv = key_cache.shape[1], key_cache.shape[2]
    stats, _, _ = _length_stats(block_table, query_start_loc, prefix_lens, tree_lens)
    _check_lengths(stats, tq, tree_mask.shape[1], block_table.shape[1] * bs)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    out = torch.empty_like(query) if out is None else out
    qsl, pl, tl_ = query_start_loc.tolist(), prefix_lens.tolist(), tree_lens.tolist()
    for b in range(block_table.shape[0]):
        q = query[qsl[b]:qsl[b + 1]].float()
        if q.shape[0] == 0:
            continue
        n_ctx = pl[b] + tl_[b]
        pos = torch.arange(n_ctx, device=query.device)
        blocks = block_table[b].long()[pos // bs]
        k = key_cache[blocks, pos % bs].float().repeat_interleave(hq // hkv, dim=1)  # [n_ctx, Hq, D]
        v = value_cache[blocks, pos % bs].float().repeat_interleave(hq // hkv, dim=1)
        vis = torch.ones(q.shape[0], n_ctx, dtype=torch.bool, device=query.device)
        vis[:, pl[b]:] = unpack_tree_mask(tree_mask[qsl[b]:qsl[b + 1]], tl_[b])
        s = torch.einsum("qhd,khd->hqk", q, k) * scale
        s = s.masked_fill(~vis, float("-inf"))
        p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # a row with nothing visible -> 0
        out[qsl[b]:qsl[b + 1]] = torch.einsum("hqk,khd->qhd", p, v).to(out.dtype)
    return out


# --------------------------------------------------------------------------- kernel

if triton is not None:

    @triton.jit
    def _attend(acc, m_i, l_i, q, k, v, visible, qk_scale, DOT_FP32: tl.constexpr):
        # k: [BLOCK_D, BLOCK_N], v: [BLOCK_N, BLOCK_D]; online softmax in base 2.
        if DOT_FP32:
            s = tl.dot(q.to(tl.float32), k.to(tl.float32), input_precision="ieee")
        else:
            s = tl.dot(q, k)
        s = tl.where(visible, s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no key seen yet: keep exp2 finite
        alpha = tl.math.exp2(m_i - m_safe)
        p = tl.math.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if DOT_FP32:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        return acc, m_new, l_i

    @triton.jit
    def _tree_attn_fwd(
        Q, K, V, O, O_part, Lse_part,
        block_table, q_start_loc, prefix_lens, tree_lens, tree_mask,
        qk_scale, head_dim, n_words, num_q_tiles,
        stride_qt, stride_qh, stride_qd,
        stride_kb, stride_kt, stride_kh, stride_kd,
        stride_vb, stride_vt, stride_vh, stride_vd,
        stride_ot, stride_oh, stride_od,
        stride_ps, stride_pt, stride_ph,
        stride_ls, stride_lt,
        stride_bt, stride_bt1, stride_mt, stride_mw,
        PAGE: tl.constexpr, GROUP: tl.constexpr, NUM_SPLITS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_FP32: tl.constexpr,
    ):
        pid = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        req = pid // num_q_tiles
        TOKENS: tl.constexpr = BLOCK_M // GROUP
        q_end = tl.load(q_start_loc + req + 1)
        tok0 = tl.load(q_start_loc + req) + (pid % num_q_tiles) * TOKENS
        if tok0 >= q_end:
            return

        # rows = (token, q-head of this KV head): GQA heads share every K/V tile
        rows = tl.arange(0, BLOCK_M)
        tok = tok0 + rows // GROUP
        head = kvh * GROUP + rows % GROUP
        row_ok = (rows < TOKENS * GROUP) & (tok < q_end)
        d = tl.arange(0, BLOCK_D)
        d_ok = d < head_dim
        q = tl.load(Q + tok[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :] * stride_qd,
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)

        prefix = tl.load(prefix_lens + req)
        n_tree = tl.load(tree_lens + req)
        bt = block_table + req.to(tl.int64) * stride_bt
        k_head = K + kvh * stride_kh
        v_head = V + kvh * stride_vh

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

        # this split's share of the context, in whole BLOCK_N tiles
        chunk = tl.cdiv(tl.cdiv(prefix, NUM_SPLITS), BLOCK_N) * BLOCK_N
        lo = split * chunk
        hi = tl.minimum(lo + chunk, prefix)
        for start in range(lo, hi, BLOCK_N):
            pos = start + tl.arange(0, BLOCK_N)
            k_ok = pos < hi
            blk = tl.load(bt + (pos // PAGE) * stride_bt1, mask=k_ok, other=0).to(tl.int64)
            off = pos % PAGE
            k = tl.load(k_head + blk[None, :] * stride_kb + off[None, :] * stride_kt + d[:, None] * stride_kd,
                        mask=k_ok[None, :] & d_ok[:, None], other=0.0)
            v = tl.load(v_head + blk[:, None] * stride_vb + off[:, None] * stride_vt + d[None, :] * stride_vd,
                        mask=k_ok[:, None] & d_ok[None, :], other=0.0)
            acc, m_i, l_i = _attend(acc, m_i, l_i, q, k, v, k_ok[None, :], qk_scale, DOT_FP32)

        if split == NUM_SPLITS - 1:
            # 32-slot tiles: each row needs exactly one mask word per tile
            jj = tl.arange(0, 32)
            word_ptr = tree_mask + tok.to(tl.int64) * stride_mt
            for j0 in range(0, tl.minimum(n_tree, n_words * 32), 32):
                j = j0 + jj
                k_ok = j < n_tree
                pos = prefix + j
                blk = tl.load(bt + (pos // PAGE) * stride_bt1, mask=k_ok, other=0).to(tl.int64)
                off = pos % PAGE
                k = tl.load(k_head + blk[None, :] * stride_kb + off[None, :] * stride_kt + d[:, None] * stride_kd,
                            mask=k_ok[None, :] & d_ok[:, None], other=0.0)
                v = tl.load(v_head + blk[:, None] * stride_vb + off[:, None] * stride_vt + d[None, :] * stride_vd,
                            mask=k_ok[:, None] & d_ok[None, :], other=0.0)
                word = tl.load(word_ptr + (j0 >> 5) * stride_mw, mask=row_ok, other=0)
                visible = (((word[:, None] >> jj[None, :]) & 1) != 0) & k_ok[None, :]
                acc, m_i, l_i = _attend(acc, m_i, l_i, q, k, v, visible, qk_scale, DOT_FP32)

        o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        o_mask = row_ok[:, None] & d_ok[None, :]
        if NUM_SPLITS == 1:
            tl.store(O + tok[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :] * stride_od,
                     o.to(O.dtype.element_ty), mask=o_mask)
        else:
            lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.math.log2(tl.where(l_i == 0.0, 1.0, l_i)))
            sp = split.to(tl.int64)
            tl.store(O_part + sp * stride_ps + tok[:, None] * stride_pt + head[:, None] * stride_ph + d[None, :],
                     o, mask=o_mask)
            tl.store(Lse_part + sp * stride_ls + tok * stride_lt + head, lse, mask=row_ok)

    @triton.jit
    def _merge_splits(
        O, O_part, Lse_part, num_heads, head_dim,
        stride_ot, stride_oh, stride_od, stride_ps, stride_pt, stride_ph, stride_ls, stride_lt,
        NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        # one program per (token, q-head): softmax-weighted sum of the splits' partials
        pid = tl.program_id(0)
        t = pid // num_heads
        h = pid % num_heads
        s = tl.arange(0, BLOCK_S)
        d = tl.arange(0, BLOCK_D)
        s_ok = s < NUM_SPLITS
        lse = tl.load(Lse_part + s.to(tl.int64) * stride_ls + t * stride_lt + h, mask=s_ok, other=float("-inf"))
        m = tl.max(lse, 0)
        w = tl.math.exp2(lse - tl.where(m == float("-inf"), 0.0, m))
        part = tl.load(O_part + s[:, None].to(tl.int64) * stride_ps + t * stride_pt + h * stride_ph + d[None, :],
                       mask=s_ok[:, None] & (d[None, :] < head_dim), other=0.0)
        den = tl.sum(w, 0)
        o = tl.sum(part * w[:, None], 0) / tl.where(den == 0.0, 1.0, den)
        tl.store(O + t * stride_ot + h * stride_oh + d * stride_od, o.to(O.dtype.element_ty), mask=d < head_dim)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _default_splits(programs: int, max_prefix: int, block_n: int, device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    sms = _num_sms(device)
    if programs >= sms:
        return 1
    # enough programs for ~2 waves, but keep >= 4 tiles of context per split
    return max(1, min(triton.cdiv(2 * sms, programs), max_prefix // (4 * block_n), 64))


def tree_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    query_start_loc: torch.Tensor,
    prefix_lens: torch.Tensor,
    tree_lens: torch.Tensor,
    tree_mask: torch.Tensor,
    *,
    scale: float | None = None,
    out: torch.Tensor | None = None,
    max_query_len: int | None = None,
    max_prefix_len: int | None = None,
    num_splits: int | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """Tree attention over a paged KV cache; see the module docstring for semantics.

    max_query_len / max_prefix_len: host-side upper bounds. Pass both to avoid
    the one device sync (and the length checks that ride on it), e.g. under
    CUDA graphs. num_splits / block_m / block_n: tuning; None picks defaults.
    """
    if triton is None:  # pragma: no cover
        raise RuntimeError("tree_attention: triton is not installed; use tree_attention_ref")
    _check(query, key_cache, value_cache, block_table, query_start_loc, prefix_lens, tree_lens, tree_mask, out)
    tq, hq, d = query.shape
    page, hkv = key_cache.shape[1], key_cache.shape[2]
    group = hq // hkv
    b = block_table.shape[0]
    n_words = tree_mask.shape[1]
    query_start_loc, prefix_lens, tree_lens = (t.contiguous() for t in (query_start_loc, prefix_lens, tree_lens))
    if max_query_len is None or max_prefix_len is None:
        stats, mq, mp = _length_stats(block_table, query_start_loc, prefix_lens, tree_lens)
        _check_lengths(stats, tq, n_words, block_table.shape[1] * page)
        max_query_len = mq if max_query_len is None else max_query_len
        max_prefix_len = mp if max_prefix_len is None else max_prefix_len
    for name, val in (("block_m", block_m), ("block_n", block_n)):
        if val is not None and (val < 16 or val & (val - 1)):
            raise ValueError(f"{name}: expected a power of 2 >= 16, got {val}")
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"num_splits: expected >= 1, got {num_splits}")
    out = torch.empty_like(query) if out is None else out
    if tq == 0 or b == 0 or max_query_len == 0:
        return out
    if group > 128:
        raise ValueError(f"query: Hq/Hkv = {group} > 128 is not supported")

    block_d = max(16, triton.next_power_of_2(d))
    block_m = block_m or min(128 if block_d <= 128 else 64, max(16, triton.next_power_of_2(max_query_len * group)))
    block_m = max(block_m, triton.next_power_of_2(group))
    # spill-free on sm_90 per ptxas for D=128 (see docs/kernels.md); provisional until tuned on a GPU
    block_n = block_n or (64 if block_m <= 64 and block_d <= 128 else 32)
    warps = 8 if block_d >= 128 or block_m >= 128 else 4
    q_tiles = triton.cdiv(max_query_len, block_m // group)
    splits = num_splits or _default_splits(b * hkv * q_tiles, max_prefix_len, block_n, query.device)
    dot_fp32 = query.dtype == torch.float32 or (query.dtype == torch.bfloat16 and _interpreting())
    qk_scale = (1.0 / math.sqrt(d) if scale is None else scale) * 1.4426950408889634  # log2(e)

    if splits > 1:
        o_part = torch.empty(splits, tq, hq, d, dtype=torch.float32, device=query.device)
        lse_part = torch.empty(splits, tq, hq, dtype=torch.float32, device=query.device)
    else:
        o_part = lse_part = torch.empty(1, 1, 1, 1, dtype=torch.float32, device=query.device)
    _tree_attn_fwd[(b * q_tiles, hkv, splits)](
        query, key_cache, value_cache, out, o_part, lse_part,
        block_table, query_start_loc, prefix_lens, tree_lens, tree_mask,
        qk_scale, d, n_words, q_tiles,
        *query.stride(), *key_cache.stride(), *value_cache.stride(), *out.stride(),
        o_part.stride(0), o_part.stride(1), o_part.stride(2),
        lse_part.stride(0), lse_part.stride(1),
        *block_table.stride(), *tree_mask.stride(),
        PAGE=page, GROUP=group, NUM_SPLITS=splits,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, DOT_FP32=dot_fp32,
        num_warps=warps, num_stages=3,
    )
    if splits > 1:
        _merge_splits[(tq * hq,)](
            out, o_part, lse_part, hq, d,
            *out.stride(), o_part.stride(0), o_part.stride(1), o_part.stride(2),
            lse_part.stride(0), lse_part.stride(1),
            NUM_SPLITS=splits, BLOCK_S=triton.next_power_of_2(splits), BLOCK_D=block_d,
        )
    return out
