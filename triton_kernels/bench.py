"""GPU benchmark for tree attention and KV compaction: `python -m vllm_hass.kernels.bench`.

Llama-3-8B attention shapes (32 q heads, 8 KV heads, d=128, bf16), paged cache
with block size 16. For each (batch, context, tree size) it reports the tree
kernel's median time, its K/V bandwidth (bytes of K/V it must read / time) as a
fraction of the device's HBM peak, and its time relative to
  (a) torch SDPA with an explicit boolean tree mask over the same K/V gathered
      into contiguous tensors, and
  (b) causal attention (torch SDPA, lower-right causal, flash/efficient kernel)
      over the same number of query tokens and the same context, without a tree.
Then KV compaction over 32 layers: bytes moved (read + write of K and V of the
pairs whose slot changes) / time vs peak.

Times come from CUDA graphs when capture works (no launch overhead in the
number), else from triton.testing.do_bench; the median is reported.
Importing this module does nothing; without CUDA, main() exits with code 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import torch

# HBM peak in GB/s, matched against torch.cuda.get_device_name() (first hit wins: specific before generic)
PEAK_GBPS = [
    ("GH200", 4000.0), ("H200", 4800.0), ("H100 NVL", 3900.0), ("H100 PCIe", 2000.0), ("H100", 3350.0),
    ("B200", 8000.0), ("A100 80GB PCIe", 1935.0), ("A100-SXM4-80GB", 2039.0), ("A100", 1555.0),
    ("L40S", 864.0), ("L40", 864.0), ("A10G", 600.0), ("L4", 300.0), ("RTX 4090", 1008.0),
]

HQ, HKV, D, PAGE = 32, 8, 128, 16


def peak_gbps(name: str) -> float | None:
    for key, gbps in PEAK_GBPS:
        if key.lower() in name.lower():
            return gbps
    return None


def _time_ms(fn) -> tuple[float, str]:
    import triton.testing

    fn()
    torch.cuda.synchronize()
    try:
        return triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median"), "graph"
    except Exception:  # capture not possible: fall back to event timing (includes launch overhead)
        torch.cuda.synchronize()
        return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median"), "events"


def _random_parents(n: int, gen: torch.Generator) -> list[int]:
    # EAGLE-2-like: each node hangs off one of the few most recent nodes (deep, bushy near the frontier)
    return [-1] + [int(torch.randint(max(0, j - 8), j, (1,), generator=gen)) for j in range(1, n)]


def _sdpa(q, k, v, mask):
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    try:
        return sdpa(q, k, v, attn_mask=mask, enable_gqa=True)
    except (TypeError, RuntimeError):  # older torch / backend without GQA
        g = q.shape[1] // k.shape[1]
        return sdpa(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), attn_mask=mask)


def bench_tree(batch: int, context: int, tree: int, dtype, peak: float | None, device="cuda", timer=None) -> dict:
    from .tree_attention import build_tree_mask, split_kv_cache, tree_attention, unpack_tree_mask

    dev = torch.device(device)
    timer = timer or _time_ms
    gen = torch.Generator().manual_seed(batch * 100003 + context * 101 + tree)
    n_ctx = context + tree
    blocks = math.ceil(n_ctx / PAGE)
    kv = torch.randn(batch * blocks + 1, HKV, PAGE, 2 * D, device=dev, dtype=dtype)
    k_cache, v_cache = split_kv_cache(kv)
    block_table = torch.randperm(batch * blocks, generator=gen).view(batch, blocks).int().to(dev)
    parents = torch.tensor([_random_parents(tree, gen) for _ in range(batch)], device=dev)
    tree_lens = torch.full((batch,), tree, dtype=torch.int32, device=dev)
    prefix_lens = torch.full((batch,), context, dtype=torch.int32, device=dev)
    qsl = torch.arange(0, batch * tree + 1, tree, dtype=torch.int32, device=dev)
    mask = build_tree_mask(parents, tree_lens)
    q = torch.randn(batch * tree, HQ, D, device=dev, dtype=dtype)
    out = torch.empty_like(q)

    def run_tree():
        tree_attention(q, k_cache, v_cache, block_table, qsl, prefix_lens, tree_lens, mask, out=out,
                       max_query_len=tree, max_prefix_len=context)

    # the same data, gathered contiguous for torch
    pos = torch.arange(n_ctx, device=dev)
    phys = block_table.long()[:, pos // PAGE]  # [B, n_ctx]
    kg = k_cache[phys, pos % PAGE].permute(0, 2, 1, 3).contiguous()  # [B, Hkv, n_ctx, D]
    vg = v_cache[phys, pos % PAGE].permute(0, 2, 1, 3).contiguous()
    qg = q.view(batch, tree, HQ, D).transpose(1, 2).contiguous()  # [B, Hq, T, D]
    vis = torch.ones(batch, 1, tree, n_ctx, dtype=torch.bool, device=dev)
    vis[:, 0, :, context:] = unpack_tree_mask(mask, tree).view(batch, tree, tree)

    run_tree()
    want = _sdpa(qg, kg, vg, vis).transpose(1, 2).reshape(batch * tree, HQ, D)
    err = (out.float() - want.float()).abs().max().item()

    try:
        from torch.nn.attention.bias import causal_lower_right
        causal = causal_lower_right(tree, n_ctx)
    except ImportError:  # pragma: no cover
        causal = torch.ones(tree, n_ctx, dtype=torch.bool, device=dev).tril(context)

    t_tree, how = timer(run_tree)
    t_mask, _ = timer(lambda: _sdpa(qg, kg, vg, vis))
    t_causal, _ = timer(lambda: _sdpa(qg, kg, vg, causal))
    kv_bytes = 2 * batch * HKV * n_ctx * D * kv.element_size()
    gbps = kv_bytes / (t_tree * 1e-3) / 1e9
    del kv, kg, vg
    return dict(batch=batch, context=context, tree=tree, tree_ms=t_tree, timing=how, kv_gbps=gbps,
                frac_peak=gbps / peak if peak else None, vs_sdpa_mask=t_tree / t_mask,
                vs_causal=t_tree / t_causal, max_abs_err_vs_sdpa=err)


def bench_compact(batch: int, layers: int, path: int, dtype, peak: float | None, device="cuda", timer=None) -> dict:
    from .kv_compact import kv_compact
    from .tree_attention import split_kv_cache

    dev = torch.device(device)
    timer = timer or _time_ms
    gen = torch.Generator().manual_seed(batch)
    prefix, tree = 100, 64
    blocks = math.ceil((prefix + tree) / PAGE)
    kv = torch.randn(layers, batch * blocks, HKV, PAGE, 2 * D, device=dev, dtype=dtype)
    k, v = split_kv_cache(kv)
    block_table = torch.randperm(batch * blocks, generator=gen).view(batch, blocks).int().to(dev)
    src, dst = [], []
    for _ in range(batch):  # root stays, every later accepted node moves down
        nodes = [0] + sorted(torch.randperm(tree - 1, generator=gen)[: path - 1].add(1).tolist())
        src += [prefix + n for n in nodes]
        dst += [prefix + j for j in range(path)]
    i32 = dict(dtype=torch.int32, device=dev)
    cu = torch.arange(0, batch * path + 1, path, **i32)
    src, dst = torch.tensor(src, **i32), torch.tensor(dst, **i32)
    moved = int((src != dst).sum())
    kv_compact(k, v, block_table, cu, src, dst, validate=True)
    t5d, how = timer(lambda: kv_compact(k, v, block_table, cu, src, dst))
    kl, vl = list(k.unbind(0)), list(v.unbind(0))
    tlist, _ = timer(lambda: kv_compact(kl, vl, block_table, cu, src, dst))
    nbytes = 2 * 2 * moved * layers * HKV * D * kv.element_size()  # (read + write) x (K + V)
    gbps = nbytes / (t5d * 1e-3) / 1e9
    return dict(batch=batch, layers=layers, path=path, compact_ms=t5d, compact_list_ms=tlist, timing=how,
                bytes=nbytes, gbps=gbps, frac_peak=gbps / peak if peak else None)


def _fmt(x, spec):
    return "n/a" if x is None else format(x, spec)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vllm_hass.kernels.bench", description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32, 64])
    p.add_argument("--context", type=int, nargs="+", default=[512, 2048, 8192])
    p.add_argument("--tree", type=int, nargs="+", default=[8, 32, 64])
    p.add_argument("--layers", type=int, default=32, help="layers for KV compaction")
    p.add_argument("--path", type=int, default=6, help="accepted path length for KV compaction")
    p.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    p.add_argument("--peak-gbps", type=float, default=None, help="HBM peak; default from the device-name table")
    p.add_argument("--out", help="also write the results as JSON here")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench: no CUDA device (torch.cuda.is_available() is False); this benchmark needs a GPU",
              file=sys.stderr)
        return 2
    try:
        import triton  # noqa: F401
    except ImportError:
        print("bench: triton is not installed", file=sys.stderr)
        return 2

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    name = torch.cuda.get_device_name()
    peak = args.peak_gbps or peak_gbps(name)
    print(f"# {name}, peak {_fmt(peak, '.0f')} GB/s, torch {torch.__version__}, triton {triton.__version__}, "
          f"Hq={HQ} Hkv={HKV} d={D} {args.dtype}, block_size={PAGE}\n")
    print("| batch | context | tree | tree attn (us) | K/V GB/s | % peak | vs SDPA+mask | vs causal | max err |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    tree_rows = []
    for b in args.batch:
        for c in args.context:
            for t in args.tree:
                r = bench_tree(b, c, t, dtype, peak)
                tree_rows.append(r)
                print(f"| {b} | {c} | {t} | {r['tree_ms'] * 1e3:.1f} | {r['kv_gbps']:.0f} | "
                      f"{_fmt(r['frac_peak'] and 100 * r['frac_peak'], '.0f')} | {r['vs_sdpa_mask']:.2f}x | "
                      f"{r['vs_causal']:.2f}x | {r['max_abs_err_vs_sdpa']:.1e} |", flush=True)
                torch.cuda.empty_cache()
    print("\n| batch | layers | path | kv_compact 5-D (us) | list of layers (us) | GB/s | % peak |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    compact_rows = []
    for b in args.batch:
        r = bench_compact(b, args.layers, args.path, dtype, peak)
        compact_rows.append(r)
        print(f"| {b} | {r['layers']} | {r['path']} | {r['compact_ms'] * 1e3:.1f} | {r['compact_list_ms'] * 1e3:.1f} "
              f"| {r['gbps']:.0f} | {_fmt(r['frac_peak'] and 100 * r['frac_peak'], '.0f')} |", flush=True)
        torch.cuda.empty_cache()
    print("\nratios: tree-attention time / baseline time (lower is better); timing:", tree_rows[0]["timing"])
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=name, peak_gbps=peak, dtype=args.dtype, torch=torch.__version__,
                           triton=triton.__version__, tree_attention=tree_rows, kv_compact=compact_rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
