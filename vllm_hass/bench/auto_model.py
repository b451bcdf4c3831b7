"""What `"tree": "auto"` would choose on a GPU, on paper (issue 15, item 6).

    vllm-hass bench auto-model [--gpu h100] [--tau 5.08] [--draft-vocab 0,32768] [--host-ms 0]

No GPU runs here: the chooser itself (auto_tree.Chooser over auto's grid, `shape_grid`)
is given the costs and the acceptance it would measure, and reports, per batch size, the
shape it would pick and the predicted speedup over no speculation.

Costs: the roofline of speedup_model (bytes moved and FLOPs at the GPU's datasheet peaks,
speedup_model.GPUS: H100 SXM5 3.35 TB/s HBM3, 989 TFLOPS dense BF16), Llama-3-8B shapes,
bf16, `--context` cached tokens per sequence, per part of auto_tree.Costs:
  verify(T)   the target over T tokens of B sequences (T/B each), lm_head over all T;
  first(r)    the head's forward (fc 2H->H + one decoder layer), no lm_head, r rows;
  level(r)    the head's forward + its lm_head (the draft vocabulary) over r rows;
  root(b)     the head's lm_head over b rows;
  overhead(B) `--host-ms`: host time per step that does not overlap the GPU. Trees run
              with synchronous scheduling, so each of auto's steps (no drafts included)
              pays it; vLLM without speculation, the baseline, schedules asynchronously
              on CUDA and is charged none (issue 13's harness measures the plugin's).
A roofline is a lower bound on each time; what decides between shapes is their ratios.

Acceptance: a calibrated head (EAGLE-2's observation that a node's draft confidence
predicts its acceptance): the target's next token is the draft's j-th choice with
probability a * (1 - a) ** (j - 1), so a node is on the accepted path with its
cumulative draft probability, and a tree's tau is 1 + the sum of its nodes' cumulative
probabilities, for the nodes EAGLE-2 keeps (top_k children of the top_k best frontier
nodes per level, then the total_tokens - 1 best overall). One parameter, a, fitted so that
the 6/10/60 tree has tau `--tau` (default 5.08: HASS, Llama-3-8B-Instruct, MT-bench, T=0,
the paper's Table 2). A real head's rank profile differs; `--tau` moves the whole table.
"""

from __future__ import annotations

import argparse
import heapq
import math

import numpy as np

from vllm_hass.errors import UserError


def add_parser(subparsers) -> argparse.ArgumentParser:
    from vllm_hass.bench.speedup_model import GPUS, SHAPES

    p = subparsers.add_parser("auto-model", help='the shapes "tree": "auto" would choose on a GPU '
                              "(roofline costs, a calibrated head), predicted speedup per batch size")
    p.add_argument("--model", dest="am_model", default="llama3-8b", choices=sorted(SHAPES))
    p.add_argument("--gpu", dest="am_gpu", default="h100", choices=sorted(GPUS))
    p.add_argument("--tau", dest="am_tau", type=float, default=5.08,
                   help="tau of the 6/10/60 tree the head is fitted to (default: the HASS paper's)")
    p.add_argument("--batch-sizes", dest="am_batch_sizes", default="1,2,4,8,16,32,64")
    p.add_argument("--draft-vocab", dest="am_draft_vocab", default="0,32768",
                   help="comma-separated draft vocabulary sizes (0 = the target's)")
    p.add_argument("--context", dest="am_context", type=int, default=1024)
    p.add_argument("--host-ms", dest="am_host_ms", type=float, default=0.0,
                   help="host time per step not overlapped with the GPU, in ms")
    p.add_argument("--out", dest="am_out", help="write auto_model.md/.json here")
    return p


# --- the calibrated head --------------------------------------------------------------


def tree_tau(a: float, depth: int, top_k: int, total_tokens: int) -> float:
    """tau of an EAGLE-2 tree for a calibrated head whose j-th choice is right with
    probability a (1 - a)^(j - 1) (module docstring)."""
    if depth == 0:
        return 1.0
    child = [a * (1 - a) ** j for j in range(top_k)]
    pool: list[float] = []  # every generated node's cumulative probability
    frontier = [1.0]  # the root
    for _ in range(depth):
        level = [f * c for f in frontier for c in child]
        pool.extend(level)
        frontier = heapq.nlargest(top_k, level)
    return 1.0 + sum(heapq.nlargest(total_tokens - 1, pool))


def fit_a(tau: float, tree=(6, 10, 60)) -> float:
    """The a whose tree `tree` has this tau (bisection: tau grows with a)."""
    lo, hi = 1e-6, 1 - 1e-9
    if not tree_tau(lo, *tree) < tau < tree_tau(hi, *tree):
        raise UserError(f"--tau {tau}: expected between 1 and {tree[0] + 1} (a {tree} tree)")
    for _ in range(80):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if tree_tau(mid, *tree) < tau else (lo, mid)
    return (lo + hi) / 2


class CalibratedTaus:
    """The Acceptance interface the chooser reads (tau / taus), from tree_tau."""

    def __init__(self, a: float):
        self.a = a
        self._cache: dict = {}

    def tau(self, shape) -> float:
        key = (shape.depth, shape.top_k, shape.total_tokens)
        if key not in self._cache:
            self._cache[key] = tree_tau(self.a, *key)
        return self._cache[key]

    def taus(self, g) -> np.ndarray:
        return np.array([self.tau(s) for s in g.shapes])


# --- the costs --------------------------------------------------------------------------


def roofline_costs(shape: dict, gpu: dict, B: int, context: int, draft_vocab: int, host_s: float,
                   bound) -> "object":
    """auto_tree.Costs at batch B with every part's prior from the roofline."""
    from vllm_hass.auto_tree import Costs
    from vllm_hass.bench.speedup_model import roofline

    H, V = shape["hidden"], shape["vocab"]
    Vd = draft_vocab or V
    max_tokens = B * bound.total_tokens
    costs = Costs(max_tokens, B, B * bound.top_k)

    def prior(part, xs, fn):
        xs = [x for x in xs if x >= 1]
        getattr(costs, part).set_prior(xs, [fn(x) for x in xs])

    tokens = [x for x in costs.verify.x if x >= B] or [B]
    prior("verify", tokens, lambda x: roofline(shape, gpu, B, x / B, context, shape["layers"], V))
    prior("first", tokens, lambda x: roofline(shape, gpu, B, x / B, context, 1, 0,
                                              extra_params=2 * H * H))
    prior("level", costs.level.x, lambda x: roofline(shape, gpu, B, x / B, context, 1, Vd,
                                                     extra_params=2 * H * H))
    prior("root", costs.root.x, lambda x: roofline(shape, gpu, x, 1, 0, 0, Vd))
    prior("overhead", costs.overhead.x, lambda x: host_s)
    return costs


def choose(shape: dict, gpu: dict, B: int, context: int, draft_vocab: int, host_s: float,
           taus: CalibratedTaus) -> dict:
    """The chooser's pick at batch B (every request drafted for, one token each besides
    drafts) against no speculation (head off), and the fixed trees beside it."""
    from vllm_hass.auto_tree import NONE, Chooser, Shape, shape_grid

    grid = shape_grid(6, 10, 60)
    bound = Shape(6, 10, 60)
    chooser = Chooser(grid, roofline_costs(shape, gpu, B, context, draft_vocab, host_s, bound), taus)
    _, rates = chooser.best(B, B, B)  # head on: what drafting shapes cost
    chooser.head_on = False
    off = chooser.rate(NONE, B, B, B)  # auto's no drafts: the head off, host time paid
    plain = B / chooser.costs.verify(B)  # vLLM without speculation (async: no host time)
    at = chooser.arrays.index
    drafting = max((s for s in grid if s != NONE), key=lambda s: rates[at[s]])
    pick = drafting if rates[at[drafting]] > off else NONE
    return {"batch_size": B, "draft_vocab": draft_vocab or shape["vocab"],
            "shape": pick.key, "tau": taus.tau(pick),
            "speedup": max(rates[at[drafting]], off) / plain,
            "fixed_6_10_60": rates[at[bound]] / plain,
            "best_chain": max(((s, rates[at[s]]) for s in grid if s.top_k == 1),
                              key=lambda x: x[1])[0].key,
            "best_chain_speedup": max(rates[at[s]] for s in grid if s.top_k == 1) / plain,
            "step_ms_no_spec": 1e3 * B / plain}


def run(args) -> int:
    from vllm_hass.bench.flags import int_list
    from vllm_hass.bench.speedup_model import GPUS, SHAPES, emit

    shape, gpu = SHAPES[args.am_model], GPUS[args.am_gpu]
    if args.am_host_ms < 0 or not math.isfinite(args.am_host_ms):
        raise UserError(f"--host-ms {args.am_host_ms}: expected a number >= 0")
    if args.am_context < 1:
        raise UserError(f"--context {args.am_context}: expected a positive integer")
    batch_sizes = int_list(args.am_batch_sizes, "--batch-sizes")
    vocabs = int_list(args.am_draft_vocab, "--draft-vocab", minimum=0)
    a = fit_a(args.am_tau)
    taus = CalibratedTaus(a)
    rows = [choose(shape, gpu, B, args.am_context, dv, args.am_host_ms / 1e3, taus)
            for dv in vocabs for B in batch_sizes]
    md = [f"### auto on paper · {args.am_model} · roofline of {args.am_gpu} datasheet peaks · bf16 · "
          f"context {args.am_context} · host {args.am_host_ms:g} ms/step · calibrated head a = {a:.3f} "
          f"(τ {args.am_tau:g} at 6/10/60)", "",
          "| B | draft vocab | no-spec step ms | auto's shape | τ | predicted speedup | "
          "fixed 6/10/60 | best chain | its speedup |",
          "|---:|---:|---:|---|---:|---:|---:|---|---:|"]
    for r in rows:
        md.append(f"| {r['batch_size']} | {r['draft_vocab']} | {r['step_ms_no_spec']:.2f} | {r['shape']} | "
                  f"{r['tau']:.2f} | {r['speedup']:.2f}× | {r['fixed_6_10_60']:.2f}× | "
                  f"{r['best_chain']} | {r['best_chain_speedup']:.2f}× |")
    emit("\n".join(md) + "\n", args.am_out, "auto_model", {
        "model": args.am_model, "gpu": args.am_gpu, "tau_6_10_60": args.am_tau, "a": a,
        "context": args.am_context, "host_ms": args.am_host_ms, "rows": rows})
    return 0
