"""KV compaction: Triton kernel vs torch reference vs an independent snapshot; it is a copy, so torch.equal.

Runs on CPU under the Triton interpreter (TRITON_INTERPRET=1).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from .kv_compact import kv_compact, kv_compact_ref  # noqa: E402
from .testing import run_uninterpreted  # noqa: E402
from .tree_attention import split_kv_cache  # noqa: E402

# physical orders of the logical [L, num_blocks, Hkv, block_size, 2D] group cache
LAYOUTS = {"contiguous": (0, 1, 2, 3, 4), "block_major": (1, 0, 2, 3, 4), "token_major": (0, 1, 3, 2, 4)}
BS = 4

# (prefix_len, accepted path as tree-node indices); src = prefix + node_j, dst = prefix + j
PATHS = [
    (5, [0, 2, 3, 7, 8]),             # overlapping: dst 7 == src of the previous pair
    (16, [0]),                        # length 1: already in place
    (0, []),                          # nothing accepted
    (3, [0, 1, 4, 6, 9, 10, 11, 14]),  # longer than a chunk when block_pairs=2; crosses blocks
    (11, [2, 5]),                     # path without the root
]


def group_cache(n_layers, num_blocks, hkv, d, dtype, layout, seed=0):
    gen = torch.Generator().manual_seed(seed)
    perm = LAYOUTS[layout]
    logical = (n_layers, num_blocks, hkv, BS, 2 * d)
    shape = [logical[i] for i in perm]
    if dtype.is_floating_point:
        phys = torch.randn(shape, generator=gen).to(dtype)
    else:  # vLLM stores fp8 caches as uint8
        phys = torch.randint(0, 256, shape, generator=gen).to(dtype)
    kv = phys.permute(*[perm.index(i) for i in range(5)])
    assert kv.shape == logical
    return kv


def pairs_for(paths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    src = [p + n for p, nodes in paths for n in nodes]
    dst = [p + j for p, nodes in paths for j in range(len(nodes))]
    cu = [0]
    for _, nodes in paths:
        cu.append(cu[-1] + len(nodes))
    need = max(-(-(p + (max(nodes) + 1 if nodes else 0)) // BS) for p, nodes in paths)
    num_blocks = len(paths) * need + 2
    block_table = torch.randperm(num_blocks, generator=gen)[: len(paths) * need].view(len(paths), need).int()
    i32 = lambda x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
    return num_blocks, block_table, i32(cu), i32(src), i32(dst)


def expected(kv, block_table, cu, src, dst):
    """Independent of the reference: a per-request snapshot of sources, then plain element copies."""
    want = kv.clone()
    k, v = split_kv_cache(kv)
    wk, wv = split_kv_cache(want)
    for b in range(block_table.shape[0]):
        for i in range(int(cu[b]), int(cu[b + 1])):
            s, t = int(src[i]), int(dst[i])
            sb, db = int(block_table[b, s // BS]), int(block_table[b, t // BS])
            wk[:, db, t % BS] = k[:, sb, s % BS]  # reads the original kv: snapshot
            wv[:, db, t % BS] = v[:, sb, s % BS]
    return want


@pytest.mark.parametrize("dtype, layout, form, block_pairs", [
    (torch.float32, "contiguous", "5d", 16),
    (torch.float16, "block_major", "5d", 2),
    (torch.bfloat16, "token_major", "list", 2),
    (torch.float32, "block_major", "separate", 4),
    (torch.uint8, "token_major", "5d", 8),
], ids=lambda x: str(x).replace("torch.", ""))
def test_matches_reference_and_snapshot(dtype, layout, form, block_pairs):
    n_layers, hkv, d = 3, 2, 16
    num_blocks, block_table, cu, src, dst = pairs_for(PATHS)
    kv = group_cache(n_layers, num_blocks, hkv, d, dtype, layout)
    want = expected(kv, block_table, cu, src, dst)
    assert not torch.equal(want, kv)  # the case moves data

    ref = kv.clone()
    kv_compact_ref(*split_kv_cache(ref), block_table, cu, src, dst)
    assert torch.equal(ref, want)

    if form == "separate":  # one allocation per layer, each in its own layout
        layers = [kv[i].clone() for i in range(n_layers)]
        ks, vs = zip(*(split_kv_cache(t) for t in layers))
        kv_compact(list(ks), list(vs), block_table, cu, src, dst, block_pairs=block_pairs, validate=True)
        got = torch.stack(layers)
    else:
        got = kv.clone()
        k, v = split_kv_cache(got)
        if form == "list":
            k, v = list(k.unbind(0)), list(v.unbind(0))
        kv_compact(k, v, block_table, cu, src, dst, block_pairs=block_pairs, block_heads=1)
    assert torch.equal(got, want)  # moved slots and every untouched slot, bit for bit


def test_noop_batches():
    num_blocks, block_table, cu, src, dst = pairs_for([(3, []), (0, [0])])
    kv = group_cache(2, num_blocks, 1, 16, torch.float16, "contiguous")
    got = kv.clone()
    kv_compact(*split_kv_cache(got), block_table, cu, src, dst)
    assert torch.equal(got, kv)


@pytest.mark.parametrize("case, msg", [
    ("valid", None),
    ("later_src_is_dst", r"pair 0 \(request 0\) writes the slot pair 1 \(request 0\) reads"),
    ("duplicate_dst", "pairs 1 and 2 write the same slot"),
    ("cross_request", r"pair 0 \(request 0\) writes the slot pair 4 \(request 1\) reads"),
    ("out_of_range", r"dst_pos: positions must be in \[0, 12\)"),
])
def test_precondition(case, msg):
    num_blocks, block_table, _, _, _ = pairs_for([(5, [0, 1, 2, 3]), (2, [0, 3])])
    i32 = lambda x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
    cu = i32([0, 3, 5])
    # request 0: dst_2 = 7 = src_1 is allowed (the earlier pair already read it)
    src, dst = i32([5, 7, 8, 2, 5]), i32([5, 6, 7, 2, 3])
    if case == "later_src_is_dst":
        src, dst = i32([5, 6, 7, 2, 5]), i32([6, 7, 8, 2, 3])  # dst_0 = src_1
    elif case == "duplicate_dst":
        dst = i32([5, 7, 7, 2, 3])
    elif case == "cross_request":
        block_table[1] = block_table[0]  # shared blocks: request 1 reads slot 5, which request 0 writes
    elif case == "out_of_range":
        dst = i32([5, 6, 12, 2, 3])
    kv = group_cache(1, num_blocks, 1, 16, torch.float32, "contiguous")
    before = kv.clone()
    if msg is None:
        kv_compact(*split_kv_cache(kv), block_table, cu, src, dst, validate=True)
        assert torch.equal(kv, expected(before, block_table, cu, src, dst))
        return
    for fn, kw in ((kv_compact_ref, {}), (kv_compact, {"validate": True})):
        with pytest.raises(ValueError, match=msg):
            fn(*split_kv_cache(kv), block_table, cu, src, dst, **kw)
    assert torch.equal(kv, before)  # rejected before touching anything


@pytest.mark.parametrize("mutate, msg", [
    (lambda a: a.update(src_pos=a["src_pos"].long()), "src_pos: expected int32"),
    (lambda a: a.update(cu_pairs=a["cu_pairs"][:2]), r"cu_pairs: expected shape \(3,\)"),
    (lambda a: a.update(dst_pos=a["dst_pos"][:1]), r"dst_pos: expected shape \(3,\)"),
    (lambda a: a.update(value_caches=a["value_caches"][:1]), "value_caches: expected 2 layers"),
    (lambda a: a.update(key_caches=[a["key_caches"][0], a["key_caches"][1].contiguous()]),
     r"key_caches\[1\]: expected shape .* strides"),
    (lambda a: a.update(key_caches=a["key_caches"][0]), r"key_caches: expected \[L, num_blocks"),
])
def test_argument_errors(mutate, msg):
    num_blocks, block_table, cu, src, dst = pairs_for([(1, [0, 2]), (0, [1])])
    k, v = split_kv_cache(group_cache(2, num_blocks, 2, 16, torch.float32, "token_major"))
    args = dict(key_caches=list(k.unbind(0)), value_caches=list(v.unbind(0)), block_table=block_table,
                cu_pairs=cu, src_pos=src, dst_pos=dst)
    mutate(args)
    for fn in (kv_compact, kv_compact_ref):
        with pytest.raises(ValueError, match=msg):
            fn(**args)


def compile_for_cuda():
    """Lower both layer-addressing variants to cubin for sm_90 (no GPU needed)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from vllm_hass.kernels import kv_compact as kc

    fn = kc._kv_compact_kernel
    for ptr_table in (False, True):
        sig = {n: "i32" for n in fn.arg_names}
        sig.update(K="*bf16", V="*bf16", k_ptrs="*i64", v_ptrs="*i64", block_table="*i32", cu_pairs="*i32",
                   src_pos="*i32", dst_pos="*i32", stride_kl="i64", stride_vl="i64")
        consts = dict(PAGE=16, PTR_TABLE=ptr_table, BLOCK_P=16, BLOCK_H=2, BLOCK_D=128)
        sig.update({k: "constexpr" for k in consts})
        src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
        assert triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4)).asm["cubin"]


def test_compiles_for_cuda():
    """The interpreter never lowers the kernel; compile it for a real GPU in a non-interpreted process."""
    pytest.importorskip("triton.backends.nvidia")
    run_uninterpreted("test_kv_compact", "compile_for_cuda")
