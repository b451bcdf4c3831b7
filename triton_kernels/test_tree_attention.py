"""Tree attention: Triton kernel vs torch reference, and the reference vs independent math.

Runs on CPU under the Triton interpreter (TRITON_INTERPRET=1). Tolerances
(kernel vs fp32 reference, output in the input dtype):
  fp32  atol = rtol = 1e-5   (IEEE dots; only summation order differs)
  fp16  atol = rtol = 2e-3   (~4 ulp at |x| ~ 1: P is rounded to fp16 before P@V on GPU)
  bf16  atol = rtol = 2e-2   (~2.5 ulp at |x| ~ 1)
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from . import tree_attention as ta  # noqa: E402
from .testing import run_uninterpreted  # noqa: E402
from .tree_attention import (  # noqa: E402
    SPLIT_COUNTS,
    LaunchConfig,
    build_tree_mask,
    compile_set,
    launch_config,
    pack_tree_mask,
    split_kv_cache,
    tree_ancestor_mask,
    tree_attention,
    tree_attention_ref,
    unpack_tree_mask,
    warmup,
)

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
# physical orders of the logical [num_blocks, Hkv, block_size, 2D] cache
LAYOUTS = {"contiguous": (0, 1, 2, 3), "token_major": (0, 2, 1, 3), "head_major": (1, 0, 2, 3)}


# --------------------------------------------------------------------------- builders


def tree_parents(kind: str, n: int, gen: torch.Generator) -> list[int]:
    if kind == "single" or n == 1:
        return [-1]
    if kind == "chain":
        return [-1] + list(range(n - 1))
    if kind == "star":
        return [-1] + [0] * (n - 1)
    assert kind == "random"
    return [-1] + [int(torch.randint(0, j, (1,), generator=gen)) for j in range(1, n)]


def kv_cache(num_blocks, hkv, bs, d, dtype, layout):
    """Logical [num_blocks, Hkv, bs, 2D] with the given physical order, NaN-filled."""
    perm = LAYOUTS[layout]
    logical = (num_blocks, hkv, bs, 2 * d)
    phys = torch.full([logical[i] for i in perm], float("nan"), dtype=dtype)
    inv = [perm.index(i) for i in range(4)]
    kv = phys.permute(*inv)
    assert kv.shape == logical
    return kv


def make_problem(prefix_lens, trees, *, hq, hkv, d, dtype, bs=16, layout="contiguous",
                 queries=None, n_words=None, seed=0):
    """A batch whose unused cache slots are NaN and whose mask has garbage bits past tree_len,
    so any read outside the visible set shows up as NaN or a mismatch."""
    gen = torch.Generator().manual_seed(seed)
    b = len(trees)
    tree_lens = [len(p) for p in trees]
    ctx = [p + t for p, t in zip(prefix_lens, tree_lens)]
    need = [-(-c // bs) for c in ctx]
    max_blocks = max(need) + 1
    num_blocks = sum(need) + 3
    kv = kv_cache(num_blocks, hkv, bs, d, dtype, layout)
    k, v = split_kv_cache(kv)
    perm = torch.randperm(num_blocks, generator=gen)
    spare = perm[sum(need):]  # never written: NaN
    block_table = spare[torch.randint(0, len(spare), (b, max_blocks), generator=gen)].int()
    used = 0
    for i, c in enumerate(ctx):
        block_table[i, : need[i]] = perm[used: used + need[i]].int()
        used += need[i]
        pos = torch.arange(c)
        blk = block_table[i].long()[pos // bs]
        k[blk, pos % bs] = torch.randn(c, hkv, d, generator=gen).to(dtype)
        v[blk, pos % bs] = torch.randn(c, hkv, d, generator=gen).to(dtype)

    width = max(tree_lens)
    parents = torch.full((b, width), -1, dtype=torch.int64)
    for i, p in enumerate(trees):
        parents[i, : len(p)] = torch.tensor(p)
    tl = torch.tensor(tree_lens, dtype=torch.int32)
    if queries is None:
        qlens = tree_lens
        qsl = torch.tensor([0] + torch.cumsum(tl, 0).tolist(), dtype=torch.int32)
        mask = build_tree_mask(parents, tl, n_words=n_words)
    else:
        qlens = [len(q) for q in queries]
        qsl = torch.tensor([0] + torch.cumsum(torch.tensor(qlens), 0).tolist(), dtype=torch.int32)
        nodes = torch.tensor([n for q in queries for n in q], dtype=torch.int64)
        mask = build_tree_mask(parents, tl, qsl, nodes, n_words=n_words)
    # garbage bits for slots >= tree_len: the kernel must ignore them
    req = torch.repeat_interleave(torch.arange(b), torch.tensor(qlens))
    cols = torch.arange(mask.shape[1] * 32)
    mask = mask | pack_tree_mask(cols[None, :] >= tl[req].long()[:, None], mask.shape[1])

    query = torch.randn(int(qsl[-1]), hq, d, generator=gen).to(dtype)
    return dict(query=query, key_cache=k, value_cache=v, block_table=block_table, query_start_loc=qsl,
                prefix_lens=torch.tensor(prefix_lens, dtype=torch.int32), tree_lens=tl, tree_mask=mask)


def check(args, dtype, **kw):
    ref = tree_attention_ref(**args)
    out = tree_attention(**args, **kw)
    assert not out.isnan().any()
    tol = TOL[dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)
    return out, ref


def naive_ancestors(parents: list[int]) -> torch.Tensor:
    n = len(parents)
    m = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        j = i
        while j >= 0:
            m[i, j] = True
            j = parents[j]
    return m


# --------------------------------------------------------------------------- mask helpers


def test_ancestor_mask_matches_walk_and_excludes_siblings():
    gen = torch.Generator().manual_seed(1)
    trees = [tree_parents("random", 40, gen), tree_parents("chain", 40, gen), tree_parents("star", 40, gen)]
    # a forest whose slots are not topologically ordered: parent after child
    trees.append([3, 3, 0, -1, 1] + [-1] * 35)
    parents = torch.tensor(trees)
    anc = tree_ancestor_mask(parents)
    for t, a in zip(trees, anc):
        assert torch.equal(a, naive_ancestors(t))
    star = anc[2]
    assert star[5, 0] and star[5, 5] and not star[5, 6]  # root + self, never a sibling


def test_pack_roundtrip_and_bit31():
    gen = torch.Generator().manual_seed(2)
    m = torch.rand(7, 200, generator=gen) < 0.5
    m[:, 31] = True  # sign bit of word 0
    packed = pack_tree_mask(m, n_words=8)
    assert packed.shape == (7, 8) and packed.dtype == torch.int32
    assert (packed[:, 0] < 0).all()
    assert torch.equal(unpack_tree_mask(packed, 200), m)
    assert (unpack_tree_mask(packed, 256)[:, 200:] == 0).all()


def test_build_tree_mask_rows_and_frontier():
    trees = [[-1, 0, 0, 1], [-1, 0]]
    parents = torch.tensor([trees[0], trees[1] + [-1, -1]])
    tl = torch.tensor([4, 2], dtype=torch.int32)
    full = unpack_tree_mask(build_tree_mask(parents, tl), 4)
    assert full.shape == (6, 4)
    assert torch.equal(full[:4], naive_ancestors(trees[0]))
    assert torch.equal(full[4:, :2], naive_ancestors(trees[1])) and not full[4:, 2:].any()
    qsl = torch.tensor([0, 2, 3], dtype=torch.int32)
    front = unpack_tree_mask(build_tree_mask(parents, tl, qsl, torch.tensor([3, 2, 1])), 4)
    assert torch.equal(front, torch.stack([full[3], full[2], full[5]]))


@pytest.mark.parametrize("bad, msg", [
    ([[-1, 0, 5]], "parents: entries must be in"),
    ([[1, 2, 0]], "cycle"),
])
def test_mask_builder_rejects_bad_parents(bad, msg):
    with pytest.raises(ValueError, match=msg):
        tree_ancestor_mask(torch.tensor(bad))


def test_split_kv_cache_views():
    kv = torch.randn(3, 2, 4, 16).permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    k, v = split_kv_cache(kv)
    assert k.shape == v.shape == (3, 4, 2, 8)
    assert k.untyped_storage().data_ptr() == kv.untyped_storage().data_ptr()
    assert torch.equal(k[1, 2, 0], kv[1, 0, 2, :8]) and torch.equal(v[1, 2, 0], kv[1, 0, 2, 8:])


# --------------------------------------------------------------------------- the reference itself


@pytest.mark.parametrize("prefix", [0, 5, 33])
def test_ref_chain_is_causal_attention(prefix):
    """A chain tree is plain causal attention over context + chain (SDPA, no mask of ours)."""
    n, hq, hkv, d = 9, 4, 2, 32
    args = make_problem([prefix], [tree_parents("chain", n, None)], hq=hq, hkv=hkv, d=d,
                        dtype=torch.float32, layout="token_major")
    ref = tree_attention_ref(**args)
    bs = args["key_cache"].shape[1]
    pos = torch.arange(prefix + n)
    blk = args["block_table"][0].long()[pos // bs]
    k = args["key_cache"][blk, pos % bs].repeat_interleave(hq // hkv, 1).transpose(0, 1)
    v = args["value_cache"][blk, pos % bs].repeat_interleave(hq // hkv, 1).transpose(0, 1)
    q = torch.zeros(hq, prefix + n, d)
    q[:, prefix:] = args["query"].transpose(0, 1)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True)[:, prefix:].transpose(0, 1)
    torch.testing.assert_close(ref, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", [tree_attention_ref, tree_attention])
def test_sibling_perturbation_is_invisible(impl):
    """Perturbing the K/V of a sibling (and its subtree) leaves a node's output bit-identical."""
    parents = [-1, 0, 0, 1, 2, 1]  # node 1's subtree {1, 3, 5}; node 2's {2, 4}
    args = make_problem([20], [parents], hq=4, hkv=1, d=32, dtype=torch.float32)
    base = impl(**args)
    bs = args["key_cache"].shape[1]
    for slot in (2, 4):
        pos = 20 + slot
        blk = int(args["block_table"][0, pos // bs])
        args["key_cache"][blk, pos % bs] += 3.0
        args["value_cache"][blk, pos % bs] -= 5.0
    after = impl(**args)
    for node in (0, 1, 3, 5):
        assert torch.equal(after[node], base[node])
    assert not torch.equal(after[2], base[2]) and not torch.equal(after[4], base[4])


# --------------------------------------------------------------------------- kernel vs reference

BS = 16
MIXED_PREFIX = [0, 1, BS - 1, BS, 3 * BS + 5]
MIXED_TREES = ["random", "chain", "star", "single", "random"]
MIXED_LENS = [11, 7, 9, 1, 24]

CASES = [  # dtype, GQA ratio, head_dim, layout, num_splits: representative, not a full product
    (torch.float32, 1, 32, "contiguous", 1),
    (torch.float32, 3, 32, "token_major", 2),  # GQA ratio that is not a power of 2
    (torch.float32, 4, 80, "head_major", 1),   # head_dim that is not a power of 2
    (torch.float32, 4, 64, "token_major", 3),
    (torch.float32, 8, 128, "head_major", 1),
    (torch.float16, 4, 64, "contiguous", 1),
    (torch.float16, 1, 128, "token_major", 2),
    (torch.bfloat16, 8, 32, "token_major", 1),
    (torch.bfloat16, 4, 128, "head_major", 4),
]


@pytest.mark.parametrize("dtype, group, d, layout, splits", CASES,
                         ids=lambda x: str(x).replace("torch.", ""))
def test_mixed_batch(dtype, group, d, layout, splits):
    gen = torch.Generator().manual_seed(group * d)
    trees = [tree_parents(k, n, gen) for k, n in zip(MIXED_TREES, MIXED_LENS)]
    hkv = 2 if group < 8 else 1
    args = make_problem(MIXED_PREFIX, trees, hq=group * hkv, hkv=hkv, d=d, dtype=dtype, bs=BS, layout=layout)
    check(args, dtype, num_splits=splits, block_n=16)


@pytest.mark.parametrize("splits", [1, 3])
def test_frontier_queries(splits):
    """Draft expansion: only some nodes query (n_q != tree_len), one request has none."""
    gen = torch.Generator().manual_seed(3)
    trees = [tree_parents("random", 12, gen), tree_parents("star", 6, gen), tree_parents("chain", 5, gen)]
    queries = [[9, 10, 11, 4], [], [4]]
    args = make_problem([37, 0, 16], trees, hq=8, hkv=2, d=64, dtype=torch.float16, queries=queries)
    check(args, torch.float16, num_splits=splits, block_n=16)


def test_max_depth_and_256_slots():
    """A 128-deep chain and a 200-node tree (mask of 8 words) in one launch."""
    gen = torch.Generator().manual_seed(4)
    trees = [tree_parents("chain", 128, gen), tree_parents("random", 200, gen)]
    args = make_problem([3, 50], trees, hq=2, hkv=1, d=32, dtype=torch.float32, n_words=8)
    assert args["tree_mask"].shape[1] == 8
    check(args, torch.float32)


def test_nothing_visible_gives_zero_and_out_param():
    args = make_problem([0, 18], [[-1, 0], [-1]], hq=4, hkv=2, d=32, dtype=torch.float32)
    args["tree_mask"][0] = 0  # first query: no context, no tree slot
    out = torch.empty(3, 32, 4).transpose(1, 2)  # strided out
    got = tree_attention(**args, out=out, scale=0.3)
    assert got is out
    assert torch.equal(out[0], torch.zeros(4, 32))
    torch.testing.assert_close(out, tree_attention_ref(**args, scale=0.3), atol=1e-5, rtol=1e-5)


def test_hints_skip_sync_and_match():
    gen = torch.Generator().manual_seed(5)
    trees = [tree_parents("random", 10, gen), tree_parents("chain", 3, gen)]
    args = make_problem([40, 2], trees, hq=4, hkv=1, d=32, dtype=torch.float32)
    out = tree_attention(**args, max_query_len=16, max_prefix_len=64)  # loose bounds are fine
    torch.testing.assert_close(out, tree_attention_ref(**args), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- fixed compile set, fast path


def _contexts(limit=8192):
    """Every 37th length plus each power of two and each split threshold 4 * block_n * 2^k, +-1."""
    ctx = set(range(1, limit + 1, 37))
    for e in range(14):
        for base in (1 << e, 4 * 32 << e, 4 * 64 << e):
            ctx.update((base - 1, base, base + 1))
    return sorted(c for c in ctx if 1 <= c <= limit)


@pytest.mark.parametrize("num_sms", [132, 1])
def test_launch_configs_lie_in_compile_set(num_sms):
    """Verification (60-token trees) and expansion (top_k = 10 queries), Llama-3-8B heads (group 4, d 128,
    8 KV heads) in fp16: every context length and batch size maps into one small precomputed set."""
    group, d, hkv, dtype = 4, 128, 8, torch.float16
    cs = compile_set(60, group, d, dtype, num_sms, hkv)
    assert all(isinstance(c, LaunchConfig) for c in cs)
    seen = set()
    for n_q in (60, 10, 1, 17, 33):
        for ctx in _contexts():
            for batch in range(1, 65):
                cfg = launch_config(n_q, ctx, group, d, dtype, num_sms, batch, hkv)
                seen.add(cfg)
    assert seen <= cs, sorted(seen - cs)[:3]
    assert {c.block_m for c in cs} <= {16, 32, 64, 128}
    assert {c.num_splits for c in cs} <= set(SPLIT_COUNTS)
    # the LaunchConfigs (split counts included) and, smaller, the distinct compiled kernels
    assert len(cs) <= (24 if num_sms > 1 else 4), len(cs)
    assert len({c.compile_key for c in cs}) <= (8 if num_sms > 1 else 4)
    if num_sms == 1:
        assert {c.num_splits for c in cs} == {1}
    else:
        assert max(c.num_splits for c in seen) > 1  # the heuristic does split small batches
    # the bound is respected: a shorter bound gives a subset
    assert compile_set(10, group, d, dtype, num_sms, hkv) <= cs


def test_compile_set_is_exact_for_long_contexts():
    """Up to 128k context, a dense sample of launch_config stays inside compile_set (1 KV head: 64 splits)."""
    cs = compile_set(16, 4, 128, torch.bfloat16, 132, 1)
    ctx = sorted(set(range(1, 131073, 997)) | {(1 << e) + k for e in range(18) for k in (-1, 0, 1)})
    got = {launch_config(q, c, 4, 128, torch.bfloat16, 132, b, 1)
           for q in (1, 5, 16) for c in ctx if c <= 131072 for b in (1, 2, 3, 5, 9, 33, 132, 200)}
    assert got <= cs and 64 in {c.num_splits for c in got}


@pytest.mark.parametrize("splits", SPLIT_COUNTS)
def test_each_split_count_matches_reference(splits):
    """One small case per split count the heuristic can pick (merge path included)."""
    gen = torch.Generator().manual_seed(splits)
    # 300 context slots = 19 tiles of 16: with 32 or 64 splits some splits are empty (lse = -inf)
    args = make_problem([300], [tree_parents("random", 5, gen)], hq=2, hkv=1, d=32, dtype=torch.float32, bs=16)
    check(args, torch.float32, num_splits=splits, block_n=16)


def _rows_problem(seed=6, dtype=torch.float32):
    """Tree requests whose rows sit at non-contiguous offsets of a 40-row step (other rows: not trees)."""
    gen = torch.Generator().manual_seed(seed)
    trees = [tree_parents("random", 7, gen), tree_parents("chain", 4, gen), tree_parents("star", 5, gen)]
    queries = [[6, 5, 3], [], [1, 2, 3, 4, 0]]
    args = make_problem([30, 3, 17], trees, hq=4, hkv=2, d=32, dtype=dtype, queries=queries)
    row0 = [4, 40, 21]  # request 1 has no queries (its start may be the end of the step)
    full = torch.randn(40, 4, 32, generator=gen).to(dtype)
    qsl = args["query_start_loc"].tolist()
    for b, r in enumerate(row0):
        full[r: r + qsl[b + 1] - qsl[b]] = args["query"][qsl[b]: qsl[b + 1]]
    rows = [r + i for b, r in enumerate(row0) for i in range(qsl[b + 1] - qsl[b])]
    return args, full, torch.tensor(row0, dtype=torch.int32), torch.tensor(rows)


@pytest.mark.parametrize("splits", [1, 3])
def test_q_row_start_reads_and_writes_rows_in_place(splits):
    args, full, row0, rows = _rows_problem()
    compact = tree_attention_ref(**args)
    kw = dict(args, query=full, q_row_start=row0)
    sentinel = torch.full_like(full, 7.0)
    ref = tree_attention_ref(**kw, out=sentinel.clone())
    torch.testing.assert_close(ref[rows], compact, atol=1e-6, rtol=1e-6)  # same as the compact call
    out = sentinel.clone()
    got = tree_attention(**kw, out=out, num_splits=splits, block_n=16)
    assert got is out
    torch.testing.assert_close(out[rows], compact, atol=1e-5, rtol=1e-5)
    untouched = torch.ones(40, dtype=torch.bool)
    untouched[rows] = False
    assert torch.equal(out[untouched], sentinel[untouched]) and torch.equal(ref[untouched], sentinel[untouched])


def test_fast_path_skips_checks_and_sync(monkeypatch):
    """validate=False with both bounds: no argument check and no device->host read."""
    args, full, row0, rows = _rows_problem(seed=7)
    want = tree_attention_ref(**args)

    def boom(*a, **k):
        raise AssertionError("called on the fast path")

    monkeypatch.setattr(ta, "_check", boom)
    monkeypatch.setattr(ta, "_length_stats", boom)
    monkeypatch.setattr(torch.Tensor, "tolist", boom)
    monkeypatch.setattr(torch.Tensor, "item", boom)
    out = torch.zeros_like(full)
    tree_attention(**dict(args, query=full), q_row_start=row0, out=out, max_query_len=5, max_prefix_len=30,
                   validate=False)
    monkeypatch.undo()
    torch.testing.assert_close(out[rows], want, atol=1e-5, rtol=1e-5)
    with pytest.raises(AssertionError, match="fast path"):  # the default path still checks
        monkeypatch.setattr(ta, "_check", boom)
        tree_attention(**args, max_query_len=5, max_prefix_len=30)


@pytest.mark.parametrize("row0, msg", [
    (lambda r: r.long(), "q_row_start: expected int32"),
    (lambda r: r[:2], r"q_row_start: expected shape \(3,\)"),
    (lambda r: r + 30, r"q_row_start: request rows must lie in \[0, 40\)"),
    (lambda r: r - 5, r"q_row_start: request rows must lie in"),
])
@pytest.mark.parametrize("impl", [tree_attention, tree_attention_ref])
def test_q_row_start_errors(impl, row0, msg):
    args, full, r, _ = _rows_problem()
    with pytest.raises(ValueError, match=msg):
        impl(**dict(args, query=full), q_row_start=row0(r))


def test_warmup_launches_every_config():
    """warmup runs each config of the set on a one-token dummy (here the CPU set, plus split configs)
    and writes nothing into the example tensors."""
    args = make_problem([5], [[-1, 0]], hq=8, hkv=2, d=64, dtype=torch.float16)
    k, v, q = args["key_cache"], args["value_cache"], args["query"]
    before = [t.clone() for t in (k, v, q)]
    assert warmup(q, k, v, 60, num_sms=1) == len(compile_set(60, 4, 64, torch.float16, 1, 2)) == 4
    split = [c._replace(num_splits=s) for c in compile_set(8, 4, 64, torch.float16, 1, 2) for s in (2, 64)]
    assert warmup(q, k, v, 8, out=torch.empty_like(q), configs=split) == len(split) == 4
    for a, b in zip((k, v, q), before):
        assert torch.equal(a.nan_to_num(1.0), b.nan_to_num(1.0))


@pytest.mark.parametrize("field, value, msg", [
    ("query", lambda a: a["query"].half(), "key_cache: dtype must match query"),
    ("query", lambda a: a["query"][:, :3], "Hq=3 must be a multiple of Hkv=2"),
    ("block_table", lambda a: a["block_table"].long(), "block_table: expected int32"),
    ("prefix_lens", lambda a: a["prefix_lens"][:1], r"prefix_lens: expected shape \(2,\)"),
    ("tree_mask", lambda a: a["tree_mask"][:2], r"tree_mask: expected \[5, n_words\]"),
    ("tree_lens", lambda a: torch.tensor([40, 2], dtype=torch.int32), "exceeds the 32 slots"),
    ("prefix_lens", lambda a: torch.tensor([400, 0], dtype=torch.int32), "exceeds block_table capacity"),
    ("key_cache", lambda a: a["key_cache"][..., :16], r"key_cache: expected \[num_blocks, block_size, Hkv, 32\]"),
])
@pytest.mark.parametrize("impl", [tree_attention, tree_attention_ref])
def test_argument_errors(impl, field, value, msg):
    args = make_problem([4, 9], [[-1, 0, 0], [-1, 0]], hq=4, hkv=2, d=32, dtype=torch.float32)
    args[field] = value(args)
    with pytest.raises(ValueError, match=msg):
        impl(**args)


def compile_for_cuda():
    """Lower every kernel variant to cubin for sm_80/sm_90 with Triton's bundled ptxas (no GPU needed)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from vllm_hass.kernels import tree_attention as ta

    def compile_(fn, ptrs, consts, cap, warps=4):
        sig = {n: ptrs.get(n, "i32") for n in fn.arg_names}
        sig.update({k: "constexpr" for k in consts})
        src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
        assert triton.compile(src, target=GPUTarget("cuda", cap, 32), options=dict(num_warps=warps)).asm["cubin"]

    ints = {n: "*i32" for n in ("block_table", "q_start_loc", "q_row_start", "prefix_lens", "tree_lens", "tree_mask")}
    for dt, cap, split, block_m in (("bf16", 90, True, 128), ("fp16", 80, False, 64), ("fp32", 90, False, 32)):
        ptrs = dict(ints, Q=f"*{dt}", K=f"*{dt}", V=f"*{dt}", O=f"*{dt}", O_part="*fp32", Lse_part="*fp32",
                    qk_scale="fp32")
        compile_(ta._tree_attn_fwd, ptrs, dict(PAGE=16, GROUP=4, SPLIT=split, BLOCK_M=block_m, BLOCK_N=64,
                                               BLOCK_D=128, DOT_FP32=dt == "fp32"), cap, 8 if block_m == 128 else 4)
    compile_(ta._merge_splits, dict(O="*bf16", O_part="*fp32", Lse_part="*fp32", q_start_loc="*i32",
                                    q_row_start="*i32"),
             dict(BLOCK_S=ta.MAX_SPLITS, BLOCK_D=128), 90)


def test_compiles_for_cuda():
    """The interpreter never lowers the kernels; compile them for real GPUs in a non-interpreted process."""
    pytest.importorskip("triton.backends.nvidia")
    run_uninterpreted("test_tree_attention", "compile_for_cuda")


def serving_variants():
    """Triton's cache keys (the binder's specialisation + options, for sm_90) of the launches warmup makes,
    and of serving-like calls (Llama-3-8B heads, fp16, H100 SM count) across contexts, batches, query
    lengths, mask widths, buffer widths and q_row_start; nothing is launched, no GPU needed."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import compute_cache_key, create_function_from_signature

    from vllm_hass.kernels import tree_attention as ta

    backend = make_backend(GPUTarget("cuda", 90, 32))
    keys = {"fwd": set(), "merge": set()}

    class Recorder:
        def __init__(self, fn, name):
            self.binder = create_function_from_signature(fn.signature, fn.params, backend)
            self.name, self.cache = name, {}

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                _, spec, opts = self.binder(*args, **kwargs)
                keys[self.name].add(compute_cache_key(self.cache, spec, opts))
            return launch

    for name, p in (("fwd", "_tree_attn_fwd"), ("merge", "_merge_splits")):
        fn = getattr(ta, p)
        assert {q.name for q in fn.params if q.do_not_specialize} <= set(fn.arg_names)
        setattr(ta, p, Recorder(fn, name))
    ta._num_sms = lambda device: 132
    hq, hkv, d, page = 32, 8, 128, 16
    kv = torch.empty(520, hkv, page, 2 * d, dtype=torch.float16)
    k, v = ta.split_kv_cache(kv)
    qkv = torch.empty(4096, (hq + 2 * hkv) * d, dtype=torch.float16)  # query: a view of the fused qkv output
    query_all = qkv[:, : hq * d].view(-1, hq, d)
    out_all = torch.empty(4096, hq, d, dtype=torch.float16)
    i32 = dict(dtype=torch.int32)
    bt_buf, mask_buf = torch.zeros(256, 520, **i32), torch.zeros(4096, 4, **i32)
    n = ta.warmup(query_all, k, v, 60, out=out_all, num_sms=132)
    assert n == len(ta.compile_set(60, hq // hkv, d, torch.float16, 132, hkv))
    warm = {name: set(s) for name, s in keys.items()}
    for key in keys.values():
        key.clear()
    calls = 0
    for n_q in (1, 10, 33, 60):
        for batch in (1, 2, 3, 8, 17, 64):
            for prefix in (1, 16, 17, 255, 1000, 4096, 8000):
                for n_words, rows, width in ((1, False, 520), (2, True, 517), (4, True, 33)):
                    t = batch * n_q
                    qsl = torch.arange(0, t + 1, n_q, **i32)
                    lens = torch.full((batch,), prefix, **i32)
                    bt = bt_buf[:batch, :width] if width == 520 else torch.zeros(batch, width, **i32)
                    kw = dict(q_row_start=qsl[:-1] + 7) if rows else {}
                    q, o = (query_all, out_all) if rows else (query_all[:t], out_all[:t])
                    ta.tree_attention(q, k, v, bt, qsl, lens, torch.full((batch,), n_q, **i32),
                                      mask_buf[:t, :n_words], out=o, max_query_len=n_q,
                                      max_prefix_len=prefix, validate=False, **kw)
                    calls += 1
    assert warm["fwd"] and keys["fwd"] <= warm["fwd"], sorted(keys["fwd"] - warm["fwd"])[:2]
    assert warm["merge"] and keys["merge"] <= warm["merge"], sorted(keys["merge"] - warm["merge"])[:2]
    assert len(warm["fwd"]) <= 8 and len(warm["merge"]) == 1, (len(warm["fwd"]), len(warm["merge"]))
    print(calls, len(warm["fwd"]), len(keys["fwd"]))


def test_serving_calls_compile_nothing_after_warmup():
    """Real Triton specialisation (not the interpreter): after warmup, no serving call needs a new kernel."""
    pytest.importorskip("triton.backends.nvidia")
    run_uninterpreted("test_tree_attention", "serving_variants")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_bench_without_cuda_exits_2(capsys):
    from .bench import main

    assert main([]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bench: no CUDA device") and "\n" not in err
