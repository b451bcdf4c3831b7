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
* No JIT compile while serving: the constexprs come from `launch_config`, a
  pure function whose results form a small fixed set (`compile_set`: BLOCK_M
  in 16..128 from the query length, split counts quantized to powers of two),
  and the split count itself is a runtime argument (only "split or not" is a
  variant). Per-call integers (mask width, tile count, split count, buffer
  strides) are excluded from Triton's value specialisation, so `warmup` can
  compile every variant at start-up on a one-token dummy request.
* In-place rows: with q_row_start, request b's queries/outputs are rows
  q_row_start[b].. of the whole step's query/output (mask rows and split
  partials stay compact), so the caller needs no gather/scatter per layer.
* Hot path: with max_query_len/max_prefix_len given there is no device sync,
  and validate=False skips all Python-side argument checks.
"""

from __future__ import annotations

import functools
import math
import os
from typing import NamedTuple

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
    "LaunchConfig",
    "launch_config",
    "compile_set",
    "warmup",
    "SPLIT_COUNTS",
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
    words = torch.where(mask.unsqueeze(-1), _bit_weights(n, n_words, mask.device), 0).sum(-2)
    words = torch.where(words >= 2**31, words - 2**32, words)  # two's complement, bit 31 -> sign
    return words.to(torch.int32)


@functools.lru_cache(maxsize=64)
def _bit_weights(n: int, n_words: int, device: torch.device) -> torch.Tensor:
    """[n, n_words] int64: slot j's bit in its word (1 << j % 32 in column j // 32), so packing
    a mask is one masked sum: a few ops whatever n (the draft packs one per depth level)."""
    j = torch.arange(n)
    w = torch.zeros(n, n_words, dtype=torch.int64)
    w[j, j // 32] = 1 << (j % 32)
    return w.to(device)


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


def _check(query, key_cache, value_cache, block_table, query_start_loc, prefix_lens, tree_lens, tree_mask, out,
           q_row_start=None):
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
    ints = [
        ("block_table", block_table, tuple(block_table.shape)),
        ("query_start_loc", query_start_loc, (b + 1,)),
        ("prefix_lens", prefix_lens, (b,)),
        ("tree_lens", tree_lens, (b,)),
    ]
    if q_row_start is not None:
        ints.append(("q_row_start", q_row_start, (b,)))
    for name, t, shape in ints:
        if tuple(t.shape) != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {tuple(t.shape)}")
        if t.dtype != torch.int32:
            raise ValueError(f"{name}: expected int32, got {t.dtype}")
        if t.device != query.device:
            raise ValueError(f"{name}: device must match query ({query.device}), got {t.device}")
    if tree_mask.dim() != 2 or (q_row_start is None and tree_mask.shape[0] != tq):
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


def _check_lengths(stats, n_mask_rows, n_query_rows, n_words, capacity):
    """stats: see _length_stats."""
    q0, qend, min_q, min_p, min_t, max_t, max_ctx, min_row, max_row_end = stats
    if q0 != 0 or qend != n_mask_rows or min_q < 0:
        raise ValueError(f"query_start_loc: expected non-decreasing from 0 to Tq={n_mask_rows}, got {q0}..{qend}")
    if min_row < 0 or max_row_end > n_query_rows:
        raise ValueError(f"q_row_start: request rows must lie in [0, {n_query_rows}), got {min_row}..{max_row_end}")
    if min_p < 0 or min_t < 0:
        raise ValueError("prefix_lens/tree_lens: expected non-negative lengths")
    if max_t > n_words * 32:
        raise ValueError(f"tree_lens: max {max_t} exceeds the {n_words * 32} slots of tree_mask's {n_words} words")
    if max_ctx > capacity:
        raise ValueError(f"prefix_lens + tree_lens: max {max_ctx} exceeds block_table capacity {capacity}")


def _length_stats(block_table, query_start_loc, prefix_lens, tree_lens, q_row_start=None):
    """-> ([qsl[0], qsl[-1], min q len, min prefix, min tree, max tree, max prefix+tree,
            min first row, max row end], max q len, max prefix), with one device sync."""
    if prefix_lens.numel() == 0:
        q0, qend = int(query_start_loc[0]), int(query_start_loc[-1])
        return [q0, qend, 0, 0, 0, 0, 0, 0, 0], 0, 0
    qlen = query_start_loc[1:] - query_start_loc[:-1]
    ctx = prefix_lens + tree_lens
    row0 = query_start_loc[:-1] if q_row_start is None else q_row_start
    s = torch.stack([
        query_start_loc[0], query_start_loc[-1], qlen.min(), prefix_lens.min(), tree_lens.min(),
        tree_lens.max(), ctx.max(), row0.min(), (row0 + qlen).max(), qlen.max(), prefix_lens.max(),
    ]).tolist()  # one device sync for all checks and launch sizes
    return s[:9], s[9], s[10]


# --------------------------------------------------------------------------- reference


def tree_attention_ref(
    query, key_cache, value_cache, block_table, query_start_loc, prefix_lens, tree_lens, tree_mask,
    *, scale: float | None = None, out: torch.Tensor | None = None, q_row_start: torch.Tensor | None = None,
    max_query_len: int | None = None, max_prefix_len: int | None = None, validate: bool = True,
) -> torch.Tensor:
    """Plain torch: gather each request's K/V from the paged cache, explicit boolean mask, fp32 softmax.

    q_row_start: see `tree_attention` (request b's queries/outputs are rows
    q_row_start[b] ..; mask rows stay compact); other rows of `out` are not written.
    max_query_len / max_prefix_len: accepted for a drop-in call like `tree_attention`'s
    (unused: the reference reads the lengths on the host); validate=False skips the checks.
    """
    if validate:
        _check(query, key_cache, value_cache, block_table, query_start_loc, prefix_lens, tree_lens,
               tree_mask, out, q_row_start)
    tq, hq, d = query.shape
    bs, hkv = key_cache.shape[1], key_cache.shape[2]
    stats, _, _ = _length_stats(block_table, query_start_loc, prefix_lens, tree_lens, q_row_start)
    _check_lengths(stats, tree_mask.shape[0], tq, tree_mask.shape[1], block_table.shape[1] * bs)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    out = torch.empty_like(query) if out is None else out
    qsl, pl, tl_ = query_start_loc.tolist(), prefix_lens.tolist(), tree_lens.tolist()
    row0 = qsl[:-1] if q_row_start is None else q_row_start.tolist()
    for b in range(block_table.shape[0]):
        n_q = qsl[b + 1] - qsl[b]
        if n_q == 0:
            continue
        r0 = row0[b]
        q = query[r0:r0 + n_q].float()
        n_ctx = pl[b] + tl_[b]
        pos = torch.arange(n_ctx, device=query.device)
        blocks = block_table[b].long()[pos // bs]
        k = key_cache[blocks, pos % bs].float().repeat_interleave(hq // hkv, dim=1)  # [n_ctx, Hq, D]
        v = value_cache[blocks, pos % bs].float().repeat_interleave(hq // hkv, dim=1)
        vis = torch.ones(n_q, n_ctx, dtype=torch.bool, device=query.device)
        vis[:, pl[b]:] = unpack_tree_mask(tree_mask[qsl[b]:qsl[b + 1]], tl_[b])
        s = torch.einsum("qhd,khd->hqk", q, k) * scale
        s = s.masked_fill(~vis, float("-inf"))
        p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # a row with nothing visible -> 0
        out[r0:r0 + n_q] = torch.einsum("hqk,khd->qhd", p, v).to(out.dtype)
    return out


# --------------------------------------------------------------------------- launch configurations

SPLIT_COUNTS = (1, 2, 4, 8, 16, 32, 64)  # the only split counts the default heuristic picks
MAX_SPLITS = SPLIT_COUNTS[-1]
NUM_STAGES = 3
MAX_CONTEXT = 131072  # context bound compile_set enumerates by default


class LaunchConfig(NamedTuple):
    """Launch parameters of one `tree_attention` call.

    All but num_splits are compile-time constants of the kernel; num_splits is a
    runtime argument (only whether it is > 1 selects a kernel variant), so the
    kernels Triton compiles are given by `compile_key`.
    """

    block_m: int
    block_n: int
    num_splits: int
    num_warps: int
    block_d: int
    dot_fp32: bool

    @property
    def compile_key(self) -> tuple:
        return (self.block_m, self.block_n, self.num_warps, self.block_d, self.dot_fp32, self.num_splits > 1)


def _pow2_floor(x: int) -> int:
    return 1 << (max(1, x).bit_length() - 1)


def _next_pow2(x: int) -> int:
    return 1 << max(0, x - 1).bit_length()


def _tiles(max_query_len, group, head_dim, block_m=None, block_n=None):
    if group > 128:
        raise ValueError(f"query: Hq/Hkv = {group} > 128 is not supported")
    block_d = max(16, _next_pow2(head_dim))
    block_m = block_m or min(128 if block_d <= 128 else 64, max(16, _next_pow2(max_query_len * group)))
    block_m = max(block_m, _next_pow2(group))
    # spill-free on sm_90 per ptxas for D=128 (see docs/kernels.md); provisional until tuned on a GPU
    block_n = block_n or (64 if block_m <= 64 and block_d <= 128 else 32)
    warps = 8 if block_d >= 128 or block_m >= 128 else 4
    q_tiles = -(-max(1, max_query_len) // (block_m // group))
    return block_m, block_n, block_d, warps, q_tiles


def _splits(programs: int, max_prefix_len: int, block_n: int, num_sms: int) -> int:
    if num_sms <= 1 or programs >= num_sms:
        return 1
    # enough programs for ~2 waves, but keep >= 4 tiles of context per split; floor to a power of two
    return _pow2_floor(min(-(-2 * num_sms // programs), max_prefix_len // (4 * block_n), MAX_SPLITS))


@functools.lru_cache(maxsize=4096)
def launch_config(
    max_query_len: int, max_prefix_len: int, group: int, head_dim: int, dtype: torch.dtype,
    num_sms: int, batch: int, num_kv_heads: int, *, interpret: bool = False,
    block_m: int | None = None, block_n: int | None = None, num_splits: int | None = None,
) -> LaunchConfig:
    """The launch `tree_attention` uses (pure; cached). num_sms: the device's SM count (1 on CPU).

    With no overrides, block_m is one of 16/32/64/128 and num_splits one of
    SPLIT_COUNTS, so every result lies in `compile_set(...)` for any context
    length. interpret: running under TRITON_INTERPRET (bf16 dots go through fp32).
    """
    block_m, block_n, block_d, warps, q_tiles = _tiles(max_query_len, group, head_dim, block_m, block_n)
    if num_splits is None:
        num_splits = _splits(batch * num_kv_heads * q_tiles, max_prefix_len, block_n, num_sms)
    dot_fp32 = dtype == torch.float32 or (dtype == torch.bfloat16 and interpret)
    return LaunchConfig(block_m, block_n, num_splits, warps, block_d, dot_fp32)


def compile_set(
    max_query_len_bound: int, group: int, head_dim: int, dtype: torch.dtype, num_sms: int, num_kv_heads: int,
    *, max_prefix_len_bound: int = MAX_CONTEXT, interpret: bool = False,
) -> frozenset[LaunchConfig]:
    """Every config `launch_config` returns for query lengths 1..max_query_len_bound, any
    batch size and any context length up to max_prefix_len_bound (default overrides).

    Exact, not sampled: the split count is monotone in the context length and
    only the context thresholds 4 * block_n * 2^k can change it; batches at or
    beyond num_sms / (Hkv * q_tiles) programs all give one split.
    """
    reps: dict[tuple[int, int], int] = {}  # (block_m, q_tiles) -> a query length giving it
    for q in range(1, max(1, max_query_len_bound) + 1):
        block_m, _, _, _, q_tiles = _tiles(q, group, head_dim)
        reps.setdefault((block_m, q_tiles), q)
    out = set()
    for (_, q_tiles), q in reps.items():
        block_n = _tiles(q, group, head_dim)[1]
        prefixes = {0, max_prefix_len_bound}
        prefixes.update(4 * block_n * s for s in SPLIT_COUNTS if 4 * block_n * s <= max_prefix_len_bound)
        for b in range(1, max(1, num_sms) // (num_kv_heads * q_tiles) + 2):
            for p in prefixes:
                out.add(launch_config.__wrapped__(q, p, group, head_dim, dtype, num_sms, b, num_kv_heads,
                                                  interpret=interpret))
    return frozenset(out)


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

    # Integer arguments that change from call to call must not be value-specialised
    # (Triton compiles a new variant for an int equal to 1 or divisible by 16), nor
    # small int32 metadata pointers on their alignment: the compiled set is then fixed
    # by the constexprs (see LaunchConfig.compile_key), dtypes and the model's shapes.
    _INT_PTRS = ["block_table", "q_start_loc", "q_row_start", "prefix_lens", "tree_lens", "tree_mask"]

    @triton.jit(do_not_specialize=["n_words", "num_q_tiles", "num_splits", "stride_ps", "stride_ls",
                                   "stride_bt", "stride_mt"],
                do_not_specialize_on_alignment=_INT_PTRS)
    def _tree_attn_fwd(
        Q, K, V, O, O_part, Lse_part,
        block_table, q_start_loc, q_row_start, prefix_lens, tree_lens, tree_mask,
        qk_scale, head_dim, n_words, num_q_tiles, num_splits,
        stride_qt, stride_qh, stride_qd,
        stride_kb, stride_kt, stride_kh, stride_kd,
        stride_vb, stride_vt, stride_vh, stride_vd,
        stride_ot, stride_oh, stride_od,
        stride_ps, stride_pt, stride_ph,
        stride_ls, stride_lt,
        stride_bt, stride_bt1, stride_mt, stride_mw,
        PAGE: tl.constexpr, GROUP: tl.constexpr, SPLIT: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_FP32: tl.constexpr,
    ):
        pid = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        req = pid // num_q_tiles
        TOKENS: tl.constexpr = BLOCK_M // GROUP
        c0 = tl.load(q_start_loc + req)
        n_q = tl.load(q_start_loc + req + 1) - c0
        t0 = (pid % num_q_tiles) * TOKENS
        if t0 >= n_q:
            return

        # rows = (token, q-head of this KV head): GQA heads share every K/V tile
        rows = tl.arange(0, BLOCK_M)
        local = t0 + rows // GROUP
        head = kvh * GROUP + rows % GROUP
        row_ok = (rows < TOKENS * GROUP) & (local < n_q)
        tok = (c0 + local).to(tl.int64)  # compact row: tree_mask, split partials
        qrow = (tl.load(q_row_start + req) + local).to(tl.int64)  # row of query / out
        d = tl.arange(0, BLOCK_D)
        d_ok = d < head_dim
        q = tl.load(Q + qrow[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :] * stride_qd,
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
        chunk = tl.cdiv(tl.cdiv(prefix, num_splits), BLOCK_N) * BLOCK_N
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

        if split == num_splits - 1:
            # 32-slot tiles: each row needs exactly one mask word per tile
            jj = tl.arange(0, 32)
            word_ptr = tree_mask + tok * stride_mt
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
        if SPLIT:
            lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.math.log2(tl.where(l_i == 0.0, 1.0, l_i)))
            sp = split.to(tl.int64)
            tl.store(O_part + sp * stride_ps + tok[:, None] * stride_pt + head[:, None] * stride_ph + d[None, :],
                     o, mask=o_mask)
            tl.store(Lse_part + sp * stride_ls + tok * stride_lt + head, lse, mask=row_ok)
        else:
            tl.store(O + qrow[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :] * stride_od,
                     o.to(O.dtype.element_ty), mask=o_mask)

    @triton.jit(do_not_specialize=["max_query_len", "num_splits", "stride_ps", "stride_ls"],
                do_not_specialize_on_alignment=["q_start_loc", "q_row_start"])
    def _merge_splits(
        O, O_part, Lse_part, q_start_loc, q_row_start, head_dim, max_query_len, num_splits,
        stride_ot, stride_oh, stride_od, stride_ps, stride_pt, stride_ph, stride_ls, stride_lt,
        BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        # one program per (request, query token, q-head): softmax-weighted sum of the splits' partials
        pid = tl.program_id(0)
        h = tl.program_id(1)
        req = pid // max_query_len
        i = pid % max_query_len
        c0 = tl.load(q_start_loc + req)
        if c0 + i >= tl.load(q_start_loc + req + 1):
            return
        t = (c0 + i).to(tl.int64)
        row = (tl.load(q_row_start + req) + i).to(tl.int64)
        s = tl.arange(0, BLOCK_S)
        d = tl.arange(0, BLOCK_D)
        s_ok = s < num_splits
        lse = tl.load(Lse_part + s.to(tl.int64) * stride_ls + t * stride_lt + h, mask=s_ok, other=float("-inf"))
        m = tl.max(lse, 0)
        w = tl.math.exp2(lse - tl.where(m == float("-inf"), 0.0, m))
        part = tl.load(O_part + s[:, None].to(tl.int64) * stride_ps + t * stride_pt + h * stride_ph + d[None, :],
                       mask=s_ok[:, None] & (d[None, :] < head_dim), other=0.0)
        den = tl.sum(w, 0)
        o = tl.sum(part * w[:, None], 0) / tl.where(den == 0.0, 1.0, den)
        tl.store(O + row * stride_ot + h * stride_oh + d * stride_od, o.to(O.dtype.element_ty), mask=d < head_dim)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.lru_cache(maxsize=None)
def _dummy(device: torch.device) -> torch.Tensor:
    # stands in for the split buffers of unsplit launches (never read or written)
    return torch.empty(1, 1, 1, 1, dtype=torch.float32, device=device)


def _launch(cfg, query, key_cache, value_cache, out, block_table, query_start_loc, q_row_start,
            prefix_lens, tree_lens, tree_mask, qk_scale, max_query_len):
    _, hq, d = query.shape
    hkv = key_cache.shape[2]
    group = hq // hkv
    b = block_table.shape[0]
    n_rows = tree_mask.shape[0]
    splits = cfg.num_splits
    q_tiles = -(-max_query_len // (cfg.block_m // group))
    if splits > 1:
        o_part = torch.empty(splits, n_rows, hq, d, dtype=torch.float32, device=query.device)
        lse_part = torch.empty(splits, n_rows, hq, dtype=torch.float32, device=query.device)
    else:
        o_part = lse_part = _dummy(query.device)
    _tree_attn_fwd[(b * q_tiles, hkv, splits)](
        query, key_cache, value_cache, out, o_part, lse_part,
        block_table, query_start_loc, q_row_start, prefix_lens, tree_lens, tree_mask,
        qk_scale, d, tree_mask.shape[1], q_tiles, splits,
        *query.stride(), *key_cache.stride(), *value_cache.stride(), *out.stride(),
        o_part.stride(0), o_part.stride(1), o_part.stride(2),
        lse_part.stride(0), lse_part.stride(1),
        *block_table.stride(), *tree_mask.stride(),
        PAGE=key_cache.shape[1], GROUP=group, SPLIT=splits > 1,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d, DOT_FP32=cfg.dot_fp32,
        num_warps=cfg.num_warps, num_stages=NUM_STAGES,
    )
    if splits > 1:
        _merge_splits[(b * max_query_len, hq)](
            out, o_part, lse_part, query_start_loc, q_row_start, d, max_query_len, splits,
            *out.stride(), o_part.stride(0), o_part.stride(1), o_part.stride(2),
            lse_part.stride(0), lse_part.stride(1),
            BLOCK_S=MAX_SPLITS if splits <= MAX_SPLITS else _next_pow2(splits), BLOCK_D=cfg.block_d,
        )


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
    q_row_start: torch.Tensor | None = None,
    max_query_len: int | None = None,
    max_prefix_len: int | None = None,
    num_splits: int | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """Tree attention over a paged KV cache; see the module docstring for semantics.

    q_row_start [B] int32: request b's queries (and outputs) are rows
    q_row_start[b] .. q_row_start[b] + n_q(b) - 1 of `query` (and `out`), any
    number of rows; tree_mask rows stay indexed by query_start_loc. Other rows
    of `out` are not written. None: rows = query_start_loc (compact).
    max_query_len / max_prefix_len: host-side upper bounds. Pass both to avoid
    the one device sync (and the length checks that ride on it), e.g. under
    CUDA graphs. validate=False skips every argument check (the caller
    guarantees what `_check` tests, and contiguous int32 metadata vectors).
    num_splits / block_m / block_n: tuning; None picks `launch_config`'s defaults.
    """
    if triton is None:  # pragma: no cover
        raise RuntimeError("tree_attention: triton is not installed; use tree_attention_ref")
    if validate:
        _check(query, key_cache, value_cache, block_table, query_start_loc, prefix_lens, tree_lens, tree_mask,
               out, q_row_start)
        for name, val in (("block_m", block_m), ("block_n", block_n)):
            if val is not None and (val < 16 or val & (val - 1)):
                raise ValueError(f"{name}: expected a power of 2 >= 16, got {val}")
        if num_splits is not None and num_splits < 1:
            raise ValueError(f"num_splits: expected >= 1, got {num_splits}")
        query_start_loc, prefix_lens, tree_lens = (
            t.contiguous() for t in (query_start_loc, prefix_lens, tree_lens))
        if q_row_start is not None:
            q_row_start = q_row_start.contiguous()
    if max_query_len is None or max_prefix_len is None:
        stats, mq, mp = _length_stats(block_table, query_start_loc, prefix_lens, tree_lens, q_row_start)
        if validate:
            _check_lengths(stats, tree_mask.shape[0], query.shape[0], tree_mask.shape[1],
                           block_table.shape[1] * key_cache.shape[1])
        max_query_len = mq if max_query_len is None else max_query_len
        max_prefix_len = mp if max_prefix_len is None else max_prefix_len
    if out is None:
        out = torch.empty_like(query)
    b = block_table.shape[0]
    if tree_mask.shape[0] == 0 or b == 0 or max_query_len == 0:
        return out
    _, hq, d = query.shape
    hkv = key_cache.shape[2]
    cfg = launch_config(max_query_len, max_prefix_len, hq // hkv, d, query.dtype, _num_sms(query.device), b, hkv,
                        interpret=_interpreting(), block_m=block_m, block_n=block_n, num_splits=num_splits)
    qk_scale = (1.0 / math.sqrt(d) if scale is None else scale) * 1.4426950408889634  # log2(e)
    _launch(cfg, query, key_cache, value_cache, out, block_table, query_start_loc,
            query_start_loc if q_row_start is None else q_row_start,
            prefix_lens, tree_lens, tree_mask, qk_scale, max_query_len)
    return out


def warmup(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    max_query_len_bound: int,
    *,
    out: torch.Tensor | None = None,
    n_words: int = 1,
    num_sms: int | None = None,
    max_prefix_len_bound: int = MAX_CONTEXT,
    configs=None,
) -> int:
    """Launch the kernels once per config of `compile_set(...)` on a one-token dummy
    request, so every variant a serving call can need is compiled now. Returns the
    number of launches.

    query / out / key_cache / value_cache: tensors with the dtype, head counts,
    head size, block size and strides of the serving calls (e.g. the real KV cache
    and a view of the step's query; only block 0 / row 0 are read, nothing of
    them is written). out: an example of the output buffer (its strides are
    copied into a one-row scratch); default: contiguous rows like `query`.
    n_words: mask width of the serving calls (any value compiles the same).
    configs: launch these instead of compile_set's (tests).
    """
    if triton is None:  # pragma: no cover
        raise RuntimeError("tree_attention: triton is not installed")
    _, hq, d = query.shape
    hkv = key_cache.shape[2]
    dev = query.device
    num_sms = _num_sms(dev) if num_sms is None else num_sms
    if configs is None:
        configs = compile_set(max_query_len_bound, hq // hkv, d, query.dtype, num_sms, hkv,
                              max_prefix_len_bound=max_prefix_len_bound, interpret=_interpreting())
    i32 = dict(dtype=torch.int32, device=dev)
    q = query[:1]
    if out is None:
        scratch = torch.empty(1, hq, d, dtype=query.dtype, device=dev)
    else:
        scratch = torch.empty_strided((1, hq, d), out.stride(), dtype=out.dtype, device=dev)
    block_table = torch.zeros(1, 2, **i32)
    qsl = torch.tensor([0, 1], **i32)
    prefix_lens = torch.ones(1, **i32)
    tree_lens = torch.ones(1, **i32)
    mask = torch.ones(1, max(1, n_words), **i32)
    for cfg in sorted(configs):
        _launch(cfg, q, key_cache, value_cache, scratch, block_table, qsl, qsl, prefix_lens, tree_lens, mask,
                1.0, 1)
    return len(configs)
