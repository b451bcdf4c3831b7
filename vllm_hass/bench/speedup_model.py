"""Predicted end-to-end HASS speedup for Llama-3-8B / 70B-shaped targets.

    vllm-hass bench speedup-model [--tau 5.08 | --results runs/bench/results.json]
    vllm-hass bench speedup-model --smoke      # tiny shapes, runs on CPU (for tests)

Real 8B/70B weights are not needed to time a step: cost is set by shapes. On a
GPU this times, with random bf16 weights,
  - one target decoder layer for b sequences x N new tokens each (N in 1, 8, 32,
    60) against a KV cache of --context tokens, with a tree mask; `--layers-timed`
    distinct layers run back to back (so weight reads hit HBM) and the per-layer
    time is scaled to the full depth (32 layers for 8B, 80 for 70B), plus lm_head
    over every new token;
  - one draft forward of the head (fc 2H->H + one decoder layer of the target's
    shape) for b x n tokens, plus lm_head over those rows;
then predicts, for an EAGLE-2 tree of (depth, top_k, total_tokens) and a measured tau:
  cycle(b)   = verify(b, total_tokens) + draft(b, ceil(tau)) + (depth - 1) * draft(b, top_k)
  speedup(b) = tau * verify(b, 1) / cycle(b)
Without a GPU, `--roofline h100` predicts the same step times from bytes moved and
FLOPs at a GPU's datasheet peaks (GPUS below): a lower bound on every time, so a
ratio of two such times (a draft level vs a target step) is what it is good for.
`--draft-vocab V` gives the head's lm_head V rows (a reduced draft vocabulary).
Not modelled: tensor parallelism (70B is timed as if it fit one GPU; per-layer
time divides roughly by the TP degree, communication excluded), sampling,
tree bookkeeping and scheduler overhead; all of them lower the real speedup.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

from vllm_hass.errors import UserError

SHAPES = {
    "llama3-8b": dict(hidden=4096, inter=14336, heads=32, kv_heads=8, layers=32, vocab=128256),
    "llama3-70b": dict(hidden=8192, inter=28672, heads=64, kv_heads=8, layers=80, vocab=128256),
}
# Datasheet peaks (NVIDIA H100 SXM5 / H200 SXM product pages: HBM3 3.35 TB/s, HBM3e 4.8 TB/s,
# dense BF16 989 TFLOPS); a roofline step time is max(bytes / bandwidth, flops / peak).
GPUS = {"h100": dict(bandwidth=3.35e12, flops=989e12), "h200": dict(bandwidth=4.8e12, flops=989e12)}
SMOKE_SHAPES = {"tiny": dict(hidden=256, inter=512, heads=4, kv_heads=2, layers=4, vocab=1024)}
# HASS paper, Table 2 (MT-bench, T=0, EAGLE-2 tree of depth 6 / 60 tokens).
PAPER = {"llama3-8b": {"speedup": 3.09, "tau": 5.08}}
PAPER_TAU = 5.08


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("speedup-model", help="predict speedup for Llama-3 8B/70B shapes from step times")
    p.add_argument("--tau", type=float, help="measured tau of the tree (default: from --results, else the paper's)")
    p.add_argument("--results", help="a bench results.json to take hass-tree (or oracle-tree) tau from")
    p.add_argument("--models", default="llama3-8b,llama3-70b", help=",".join(SHAPES))
    p.add_argument("--batch-sizes", dest="sm_batch_sizes", default="1,32")
    p.add_argument("--tokens", default="1,8,32,60", help="verify sizes N to time")
    p.add_argument("--tree", dest="sm_tree", default="6,10,60", help="DEPTH,TOP_K,TOTAL_TOKENS")
    p.add_argument("--context", type=int, default=1024, help="KV cache length per sequence")
    p.add_argument("--layers-timed", type=int, default=4, help="distinct layers timed, then scaled")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU: exercises the code, predicts nothing")
    p.add_argument("--out", dest="sm_out", help="write speedup_model.json/.md here")
    p.add_argument("--roofline", choices=sorted(GPUS), help="no GPU: predict step times from bytes and FLOPs "
                   "at this GPU's datasheet peaks (a lower bound; ratios are what it is for)")
    p.add_argument("--draft-vocab", dest="sm_draft_vocab", default="0",
                   help="comma-separated draft vocabulary sizes for the head's lm_head (0 = the target's)")
    return p


def layer_params(shape: dict) -> int:
    H, I, nh, nkv = shape["hidden"], shape["inter"], shape["heads"], shape["kv_heads"]
    d = H // nh
    return H * (nh + 2 * nkv) * d + H * H + 3 * H * I


def roofline(shape: dict, gpu: dict, b: int, N: int, context: int, layers: int, lm_rows: int,
             extra_params: int = 0, bytes_per=2) -> float:
    """Seconds for `layers` decoder layers (+ extra_params, + an lm_head of lm_rows) on b
    sequences x N new tokens over `context` cached tokens: weights and KV read once."""
    H, nkv, d = shape["hidden"], shape["kv_heads"], shape["hidden"] // shape["heads"]
    params = layers * layer_params(shape) + extra_params + lm_rows * H
    kv_bytes = layers * b * 2 * nkv * d * (context + N) * bytes_per
    flops = 2 * params * b * N + layers * 4 * b * N * (context + N) * H
    return max((params * bytes_per + kv_bytes) / gpu["bandwidth"], flops / gpu["flops"])


def roofline_model(shape: dict, gpu: dict, batch_sizes, tokens, tree, context, draft_vocab: int):
    """verify[(b, N)], draft[(b, m)] as time_model returns them, from the roofline."""
    V, H = shape["vocab"], shape["hidden"]
    depth, top_k, _ = tree
    verify = {(b, N): roofline(shape, gpu, b, N, context, shape["layers"], V)
              for b in batch_sizes for N in tokens}
    draft = {(b, m): roofline(shape, gpu, b, m, context, 1, draft_vocab or V, extra_params=2 * H * H)
             for b in batch_sizes for m in sorted({top_k, *range(1, depth + 2)})}
    return verify, draft


def tau_from_results(path: str) -> float:
    from vllm_hass.bench.report import read

    res = read(path, "--results")
    for r in sorted(res.get("runs", []), key=lambda r: r["batch_size"]):
        if r["config"] == "hass-tree" and r["temperature"] == 0 and r.get("tau"):
            return r["tau"]
    for o in res.get("oracle", []):
        if o["config"].startswith("oracle-tree") and o.get("tau"):
            return o["tau"]
    raise UserError(f"--results {path}: no hass-tree or oracle-tree tau at T=0 in it")


class Layers:
    """`n` distinct Llama decoder layers with random weights, run back to back."""

    def __init__(self, shape: dict, n: int, device, dtype):
        import torch

        H, I, nh, nkv = shape["hidden"], shape["inter"], shape["heads"], shape["kv_heads"]
        self.nh, self.nkv, self.d = nh, nkv, H // nh
        g = torch.Generator(device=device).manual_seed(0)

        def w(*s):
            return (torch.randn(*s, generator=g, device=device, dtype=dtype) * 0.02)

        self.layers = [dict(qkv=w((nh + 2 * nkv) * self.d, H), o=w(H, H), gu=w(2 * I, H), down=w(H, I),
                            n1=torch.ones(H, device=device, dtype=dtype), n2=torch.ones(H, device=device, dtype=dtype))
                       for _ in range(n)]

    def forward(self, x, kv_cache, mask):
        """x [b, N, H]; kv_cache: per layer (k, v) [b, nkv, C+N, d] (the new slots included)."""
        import torch.nn.functional as F

        b, N, H = x.shape
        for L, (k, v) in zip(self.layers, kv_cache):
            h = F.rms_norm(x, (H,), L["n1"])
            q, kn, vn = (h @ L["qkv"].t()).split([self.nh * self.d, self.nkv * self.d, self.nkv * self.d], -1)
            k[:, :, -N:] = kn.view(b, N, self.nkv, self.d).transpose(1, 2)
            v[:, :, -N:] = vn.view(b, N, self.nkv, self.d).transpose(1, 2)
            q = q.view(b, N, self.nh, self.d).transpose(1, 2)
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
            x = x + a.transpose(1, 2).reshape(b, N, H) @ L["o"].t()
            gate, up = (F.rms_norm(x, (H,), L["n2"]) @ L["gu"].t()).chunk(2, -1)
            x = x + (F.silu(gate) * up) @ L["down"].t()
        return x


def timer(fn, device, iters: int) -> float:
    """Median seconds per call; CUDA graphs on GPU so launch overhead is not counted."""
    import torch

    if device.type == "cuda":
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        replay = fn
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
            replay = graph.replay
        except RuntimeError:  # a kernel that cannot be captured: eager timing (overhead included)
            torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(iters):
            start.record()
            replay()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return statistics.median(times)
    fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_model(shape: dict, batch_sizes, tokens, tree, context, layers_timed, iters, device, dtype,
               draft_vocab: int = 0):
    """Seconds per verify(b, N) for the whole target, and per draft(b, n) for the head."""
    import torch

    n = min(layers_timed, shape["layers"])
    layers = Layers(shape, n, device, dtype)
    head = Layers(shape, 1, device, dtype)
    H, V = shape["hidden"], shape["vocab"]
    lm_head = torch.randn(V, H, device=device, dtype=dtype) * 0.02
    draft_lm_head = lm_head[: draft_vocab or V]  # a reduced draft vocabulary: its rows only
    fc = torch.randn(H, 2 * H, device=device, dtype=dtype) * 0.02
    depth, top_k, _ = tree

    def cache(b, N, n_layers):
        return [(torch.randn(b, layers.nkv, context + N, layers.d, device=device, dtype=dtype),
                 torch.randn(b, layers.nkv, context + N, layers.d, device=device, dtype=dtype))
                for _ in range(n_layers)]

    def tree_like_mask(N):
        # Any mask of the right size costs the same; a causal tail stands in for the tree.
        m = torch.ones(N, context + N, dtype=torch.bool, device=device)
        m[:, context:] = torch.ones(N, N, dtype=torch.bool, device=device).tril()
        return m

    verify, draft = {}, {}
    with torch.no_grad():
        for b in batch_sizes:
            for N in tokens:
                x, kv, mask = torch.randn(b, N, H, device=device, dtype=dtype), cache(b, N, n), tree_like_mask(N)
                t_layers = timer(lambda: layers.forward(x, kv, mask), device, iters)
                t_lm = timer(lambda: x @ lm_head.t(), device, iters)
                verify[(b, N)] = t_layers * shape["layers"] / n + t_lm
                kv = None  # free the cache before the next size
            for m in sorted({top_k, *range(1, depth + 2)}):
                e = torch.randn(b, m, 2 * H, device=device, dtype=dtype)
                kv, mask = cache(b, m, 1), tree_like_mask(m)
                draft[(b, m)] = timer(lambda: head.forward(e @ fc.t(), kv, mask) @ draft_lm_head.t(), device, iters)
                kv = None  # free the cache before the next size
    return verify, draft


def predict(verify, draft, b, tau, tree) -> dict:
    depth, top_k, total = tree
    root = min(max(1, math.ceil(tau)), depth + 1)
    t_verify = verify[(b, total)] if (b, total) in verify else None
    if t_verify is None:
        return {}
    cycle = t_verify + draft[(b, root)] + (depth - 1) * draft[(b, top_k)]
    return {"cycle_s": cycle, "draft_s": cycle - t_verify, "speedup": tau * verify[(b, 1)] / cycle}


def run(args) -> int:
    import torch

    if args.smoke:
        device, dtype, shapes = torch.device("cpu"), torch.float32, SMOKE_SHAPES
    elif args.roofline:
        device, dtype = None, None
        shapes = {m: SHAPES[m] for m in args.models.split(",") if m in SHAPES}
    else:
        if not torch.cuda.is_available():
            raise UserError("speedup-model needs a CUDA GPU (torch sees none); pass --smoke for a tiny CPU run "
                            "of the same code — the Llama-3 8B/70B predictions are owed until run on a GPU")
        device, dtype = torch.device("cuda"), torch.bfloat16
        names = [m for m in args.models.split(",") if m]
        bad = [m for m in names if m not in SHAPES]
        if bad or not names:
            raise UserError(f"--models {args.models}: expected names from {','.join(SHAPES)}")
        shapes = {m: SHAPES[m] for m in names}
    from vllm_hass.bench.flags import int_list

    batch_sizes = int_list(args.sm_batch_sizes, "--batch-sizes")
    try:
        tree = tuple(int(v) for v in args.sm_tree.split(","))
        assert len(tree) == 3 and min(tree) >= 1
    except (ValueError, AssertionError):
        raise UserError(f"--tree {args.sm_tree}: expected DEPTH,TOP_K,TOTAL_TOKENS, e.g. 6,10,60") from None
    tokens = sorted(set(int_list(args.tokens, "--tokens")) | {1, tree[2]})
    if args.tau is not None:
        tau, tau_src = args.tau, "--tau"
    elif args.results:
        tau, tau_src = tau_from_results(args.results), args.results
    else:
        tau, tau_src = PAPER_TAU, "paper (HASS, L3-8B, MT-bench)"
    if not 1 <= tau <= tree[0] + 1:
        raise UserError(f"--tau {tau}: expected 1..{tree[0] + 1} for a tree of depth {tree[0]}")
    vocabs = int_list(args.sm_draft_vocab, "--draft-vocab", minimum=0)
    if args.roofline:
        gpu = f"roofline of {args.roofline} datasheet peaks (no GPU run)"
    else:
        gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (smoke: tiny shapes)"
    rows = []
    for name, shape in shapes.items():
        for dv in vocabs:
            if args.roofline:
                verify, draft = roofline_model(shape, GPUS[args.roofline], batch_sizes, tokens, tree,
                                               args.context, dv)
            else:
                verify, draft = time_model(shape, batch_sizes, tokens, tree, args.context, args.layers_timed,
                                           args.iters, device, dtype, draft_vocab=dv)
            for b in batch_sizes:
                p = predict(verify, draft, b, tau, tree)
                rows.append({"model": name, "batch_size": b, "tau": tau, "draft_vocab": dv or shape["vocab"],
                             "draft_level_over_step": draft[(b, 1)] / verify[(b, 1)],
                             "verify_ms": {N: verify[(b, N)] * 1e3 for N in tokens},
                             "draft_ms": p["draft_s"] * 1e3, "cycle_ms": p["cycle_s"] * 1e3,
                             "speedup": p["speedup"], "paper": PAPER.get(name) if b == 1 else None})
    md = [f"### speedup model · {gpu} · tree {tree} · context {args.context} · τ {tau:.2f} from {tau_src}", "",
          "| model | B | draft vocab | " + " | ".join(f"verify N={N} ms" for N in tokens)
          + " | draft level / step | draft ms | cycle ms | predicted speedup | paper (T=0) |",
          "|---|---:|---:|" + "---:|" * (len(tokens) + 5)]
    for r in rows:
        paper = f"{r['paper']['speedup']:.2f}× (τ {r['paper']['tau']:.2f})" if r["paper"] else "—"
        md.append(f"| {r['model']} | {r['batch_size']} | {r['draft_vocab']} | "
                  + " | ".join(f"{v:.3f}" for v in r["verify_ms"].values())
                  + f" | {r['draft_level_over_step']:.3f} | {r['draft_ms']:.3f} | {r['cycle_ms']:.3f} | "
                    f"{r['speedup']:.2f}× | {paper} |")
    emit("\n".join(md) + "\n", args.sm_out, "speedup_model", {
        "device": gpu, "tree": tree, "context": args.context, "tau": tau, "tau_source": tau_src,
        "layers_timed": args.layers_timed,
        "rows": [{**r, "verify_ms": {str(k): v for k, v in r["verify_ms"].items()}} for r in rows]})
    return 0


def emit(text: str, out: str | None, stem: str, data: dict) -> None:
    """Print a model's table; with `out`, also write OUT/stem.md and OUT/stem.json."""
    print(text)
    if out:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{stem}.md").write_text(text)
        (out / f"{stem}.json").write_text(json.dumps(data, indent=2) + "\n")
