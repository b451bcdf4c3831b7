"""What one draft level costs next to one target decode step, per draft vocabulary size.

    vllm-hass bench draft-level --target T --head H --draft-vocab 4096,8192,16384,0

A draft level is the head's forward for `width` tokens (1 for a chain, top_k for a
tree's frontier) over a `--context`-token draft KV cache, plus its lm_head over the
draft vocabulary's rows (`W[draft_ids]`, cut once, as the plugin serves it), log-softmax
and top-k. The target step is one token through the target (transformers, with a KV cache of
the same context). Both in plain torch in one process, one thread (vLLM's CPU worker
serves a 2-core machine with one torch thread), alternated every iteration (A B C ...),
medians reported: the ratio, not the absolute times, is the figure.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from vllm_hass.errors import UserError


def add_parser(sub) -> None:
    p = sub.add_parser("draft-level", help="time one draft level vs one target decode step per draft "
                       "vocabulary size (plain torch, alternated)")
    p.add_argument("--target", required=True, help="target model directory (HF format)")
    p.add_argument("--head", required=True, help="head directory (with draft_vocab.safetensors for V > 0)")
    p.add_argument("--draft-vocab", dest="dl_vocab", default="0", help="sizes, comma-separated (0 = full)")
    p.add_argument("--width", type=int, default=1, help="tokens per draft level (1 = chain, top_k = tree)")
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--iters", type=int, default=40)
    p.add_argument("--threads", type=int, default=1)


def measure(target_dir, head_dir, vocabs, width=1, context=256, iters=40, top_k=10) -> dict:
    """{'target_ms': t, 'levels': {V: {'ms': t, 'over_step': ratio}}} (V = 0: full)."""
    import torch

    from vllm_hass.bench.oracle import Oracle, Target
    from vllm_hass.vocab import read_vocab

    o = Oracle.load(Path(target_dir), Path(head_dir))
    V = o.lm_head.shape[0]
    ids = read_vocab(head_dir)[0] if any(vocabs) else None
    rows = {v: (o.lm_head if not v else o.lm_head[ids[:v]].contiguous()) for v in vocabs}
    target = Target(o.model)
    ctx = [int(t) % V for t in torch.arange(context) * 7919]
    target.forward(ctx, list(range(context)))
    cfg = o.head.config
    nkv, d, H = cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
    past = (torch.randn(1, nkv, context, d), torch.randn(1, nkv, context, d))
    emb = o.embed[torch.tensor(ctx[:width])][None]  # [1, w, H]
    hid = torch.randn(1, width, H)
    pos = torch.full((1, width), context)
    mask = torch.ones(1, 1, width, context + width, dtype=torch.bool)

    def step():
        target.forward([ctx[-1]], [context])
        target.keep(context, [])

    def level(W):
        out, _ = o.head(emb, hid, pos, mask=mask, past_kv=past)
        o.head.logits(out[0], W).float().log_softmax(-1).topk(min(top_k, W.shape[0]))

    times = {"step": [], **{v: [] for v in vocabs}}
    with torch.no_grad():
        for i in range(iters + 3):
            for key, fn in (("step", step), *((v, lambda W=rows[v]: level(W)) for v in vocabs)):
                t0 = time.perf_counter()
                fn()
                if i >= 3:  # warm-up iterations are not timed
                    times[key].append(time.perf_counter() - t0)
    t_step = statistics.median(times["step"]) * 1e3
    return {"target_ms": t_step, "vocab_size": V,
            "levels": {v: {"ms": statistics.median(times[v]) * 1e3,
                           "over_step": statistics.median(times[v]) * 1e3 / t_step} for v in vocabs}}


def run(args) -> int:
    import torch

    from vllm_hass.bench.flags import int_list

    vocabs = int_list(args.dl_vocab, "--draft-vocab", minimum=0)
    if args.width < 1:
        raise UserError(f"--width {args.width}: expected a positive integer")
    torch.set_num_threads(args.threads)
    r = measure(args.target, args.head, vocabs, args.width, args.context, args.iters)
    full = r["levels"].get(0, {}).get("ms")
    print(f"### draft level (width {args.width}) vs target step · context {args.context} · "
          f"{args.threads} thread(s) · median of {args.iters}, alternated")
    print(f"target decode step: {r['target_ms']:.2f} ms\n")
    print("| draft vocab | level ms | level / target step | level / full-vocab level |")
    print("|---:|---:|---:|---:|")
    for v, x in sorted(r["levels"].items(), key=lambda kv: kv[0] or 1 << 40):
        rel = f"{x['ms'] / full:.2f}" if full else "—"
        print(f"| {v or r['vocab_size']} | {x['ms']:.2f} | {x['over_step']:.3f} | {rel} |")
    return 0
