"""`vllm-hass bench`: no speculation vs stock EAGLE vs HASS chain/tree vs the oracle.

    vllm-hass bench --target T --spec hass.json --dataset mtbench --batch-sizes 1,8,32 \\
        --temperature 0,1 --out runs/bench
    vllm-hass bench speedup-model --tau 5.08
    vllm-hass bench auto-model --gpu h100 --tau 5.08
    vllm-hass bench compare runs/bench-eagle runs/bench-hass --label EAGLE HASS
    vllm-hass bench host-overhead --batch-sizes 1,8,64
    vllm-hass bench load --target T --spec hass.json --clients 32 --duration 60 --out runs/load

Everything here is argument parsing and cheap validation; the work (and the heavy
imports) live in `runner.py` and `speedup_model.py`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vllm_hass.bench.flags import float_list, int_list, int_list_arg
from vllm_hass.errors import UserError

CONFIGS = ("nospec", "eagle", "hass-chain", "hass-tree", "hass-auto", "oracle")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "bench", help="measure tau, acceptance and throughput against no speculation",
        description=__doc__.splitlines()[0],
    )
    p.add_argument("--target", help="target model directory (HF format)")
    p.add_argument("--spec", help="speculative config JSON of the head (hass.json)")
    p.add_argument("--dataset", default="mtbench", help="mtbench, humaneval or FILE.jsonl")
    p.add_argument("--batch-sizes", default="1,8,32", help="comma-separated, e.g. 1,8,32")
    p.add_argument("--temperature", "--temperatures", dest="temperature", default="0,1",
                   help="comma-separated sampling temperatures, e.g. 0,1")
    p.add_argument("--out", help="output directory (results.md, results.json, *.png)")
    p.add_argument("--num-prompts", type=int, default=80, help="prompts taken from the dataset")
    p.add_argument("--max-tokens", type=int, default=256, help="output tokens per request")
    p.add_argument("--max-prompt-len", type=int, default=1024, help="longer prompts keep their end")
    p.add_argument("--device", choices=DEVICES, default="auto")
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="vLLM dtype (auto: float32 on CPU, the model's on CUDA); the oracle runs float32 "
                        "unless a dtype is given")
    p.add_argument("--configs", default=",".join(CONFIGS),
                   help=f"which to run, comma-separated from {','.join(CONFIGS)}")
    p.add_argument("--chain-k", type=int, help="draft tokens for chain configs (default: the spec's "
                                              "num_speculative_tokens, or its tree's depth)")
    p.add_argument("--tree", help="DEPTH,TOP_K,TOTAL_TOKENS for hass-tree (default: the spec's 'tree')")
    p.add_argument("--eager", action="store_true", help="enforce eager mode on CUDA too")
    p.add_argument("--rounds", type=int, default=2,
                   help="run the configurations this many times, alternated (A B A B); times are medians")
    p.add_argument("--draft-vocab", help="comma-separated draft vocabulary sizes (0 = full) to run each "
                                         "HASS configuration with (default: the spec's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true",
                   help="reuse results in OUT/jobs whose job is identical (finish an interrupted run)")
    p.set_defaults(func=run)

    sub = p.add_subparsers(dest="bench_command")
    from vllm_hass.bench.speedup_model import add_parser as add_speedup_parser

    add_speedup_parser(sub)
    from vllm_hass.bench.auto_model import add_parser as add_auto_model_parser

    add_auto_model_parser(sub)
    from vllm_hass.bench.compare import add_parser as add_compare_parser

    add_compare_parser(sub)
    from vllm_hass.bench.draft_level import add_parser as add_draft_level_parser

    add_draft_level_parser(sub)
    from vllm_hass.bench.load import add_parser as add_load_parser

    add_load_parser(sub)
    h = sub.add_parser("host-overhead", help="syncs, torch ops and host ms of the plugin's engine "
                       "step (stand-in forwards; runs without vLLM)")
    h.add_argument("--batch-sizes", default="1,8,64", type=int_list_arg("--batch-sizes"))
    h.add_argument("--steps", type=int, default=30, help="timed steps per configuration")
    h.add_argument("--device", default="cpu", help="cpu (syncs emulated) or cuda (real syncs)")
    h.add_argument("--events", action="store_true", help="list each counted sync")
    return p


def validate(args) -> dict:
    """Every check that needs no model, no dataset download and no vLLM."""
    from vllm_hass.bench import datasets

    if args.target is None:
        raise UserError("--target: required (a target model directory)")
    target = Path(args.target)
    if not (target / "config.json").is_file():
        raise UserError(f"--target {args.target}: expected a model directory with config.json")
    if args.out is None:
        raise UserError("--out: required (an output directory)")
    configs = [c for c in args.configs.split(",") if c]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown or not configs:
        raise UserError(f"--configs {args.configs}: expected names from {','.join(CONFIGS)}")
    needs_spec = any(c != "nospec" for c in configs)
    if needs_spec and args.spec is None:
        raise UserError("--spec: required for configs other than nospec (the head's hass.json)")
    if args.spec is not None and not Path(args.spec).is_file():
        raise UserError(f"--spec {args.spec}: no such file")
    datasets.check(args.dataset)
    for flag, v in (("--num-prompts", args.num_prompts), ("--max-tokens", args.max_tokens),
                    ("--max-prompt-len", args.max_prompt_len)):
        if v < 1:
            raise UserError(f"{flag} {v}: expected a positive integer")
    if args.rounds < 1:
        raise UserError(f"--rounds {args.rounds}: expected a positive integer")
    draft_vocab = None
    if args.draft_vocab is not None:
        parts = [p.strip() for p in args.draft_vocab.split(",") if p.strip()]
        if not parts or not all(p.isdigit() for p in parts):
            raise UserError(f"--draft-vocab {args.draft_vocab}: expected sizes >= 0, e.g. 4096,8192,0")
        draft_vocab = [int(p) for p in parts]
    if args.chain_k is not None and args.chain_k < 1:
        raise UserError(f"--chain-k {args.chain_k}: expected a positive integer")
    tree = None
    if args.tree is not None:
        parts = args.tree.split(",")
        if len(parts) != 3 or not all(p.strip().isdigit() for p in parts):
            raise UserError(f"--tree {args.tree}: expected DEPTH,TOP_K,TOTAL_TOKENS, e.g. 6,10,60")
        tree = dict(zip(("depth", "top_k", "total_tokens"), map(int, parts)))
    return {
        "target": target,
        "spec": Path(args.spec) if args.spec else None,
        "dataset": args.dataset,
        "batch_sizes": int_list(args.batch_sizes, "--batch-sizes"),
        "temperatures": float_list(args.temperature, "--temperature"),
        "out": Path(args.out),
        "num_prompts": args.num_prompts,
        "max_tokens": args.max_tokens,
        "max_prompt_len": args.max_prompt_len,
        "device": args.device,
        "dtype": args.dtype,
        "configs": configs,
        "chain_k": args.chain_k,
        "tree": tree,
        "eager": args.eager,
        "seed": args.seed,
        "resume": args.resume,
        "rounds": args.rounds,
        "draft_vocab": draft_vocab,
    }


def run(args) -> int:
    if getattr(args, "bench_command", None) == "speedup-model":
        from vllm_hass.bench.speedup_model import run as run_speedup

        return run_speedup(args)
    if getattr(args, "bench_command", None) == "auto-model":
        from vllm_hass.bench.auto_model import run as run_auto_model

        return run_auto_model(args)
    if getattr(args, "bench_command", None) == "host-overhead":
        from vllm_hass.bench.host_overhead import run as run_host_overhead

        return run_host_overhead(args)
    if getattr(args, "bench_command", None) == "draft-level":
        from vllm_hass.bench.draft_level import run as run_draft_level

        return run_draft_level(args)
    if getattr(args, "bench_command", None) == "load":
        from vllm_hass.bench.load import run as run_load

        return run_load(args)
    if getattr(args, "bench_command", None) == "compare":
        from vllm_hass.bench.compare import run as run_compare

        return run_compare(args)
    settings = validate(args)
    from vllm_hass.bench.runner import Bench

    return Bench.from_settings(settings).run()
