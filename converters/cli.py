"""`vllm-hass convert` and `vllm-hass inspect`."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert a HASS/EAGLE-1/2 head into a vLLM-ready directory",
        description="Read a head as the HASS/EAGLE repos save it, validate it against the "
        "target's config and write OUT (safetensors, config.json naming the plugin's "
        "architecture, hass.json). SRC is never modified; OUT is written atomically.",
    )
    p.add_argument("src", help="checkpoint directory (pytorch_model.bin or model.safetensors, "
                   "sharded or not, plus config.json)")
    p.add_argument("--target", required=True, help="the target model directory (its config.json)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                   help="weight dtype (default: the target's)")
    p.add_argument("--num-speculative-tokens", type=int, default=3,
                   help="chain length written to hass.json (default 3)")
    p.add_argument("--rope-from", choices=["head", "target"],
                   help="resolve a RoPE mismatch by keeping the head's or the target's settings")
    p.add_argument("--force", action="store_true", help="replace an existing OUT")
    p.set_defaults(func=run_convert)

    q = sub.add_parser("inspect", help="describe a draft-head checkpoint")
    q.add_argument("path", help="a checkpoint directory (HASS/EAGLE layout or converted)")
    q.add_argument("--json", action="store_true", help="machine-readable output")
    q.set_defaults(func=run_inspect)


def run_convert(args) -> int:
    from .convert import convert

    out, notes = convert(args.src, args.target, args.out, dtype=args.dtype, force=args.force,
                         rope_from=args.rope_from,
                         num_speculative_tokens=args.num_speculative_tokens)
    for n in notes:
        print(f"  {n}")
    print(f"wrote {out}")
    print(f"serve: vllm serve {args.target} --speculative-config {out / 'hass.json'}")
    return 0


def describe(path: str) -> dict:
    from .layout import check_weights, load_checkpoint

    ckpt = load_checkpoint(path)
    head = ckpt.head_config
    from vllm_hass.vocab import read_vocab

    problem, vocab = None, None
    try:
        check_weights(ckpt.weights, head, str(ckpt.path))
        ids, meta = read_vocab(ckpt.path)
        if ids is not None:
            vocab = {**meta, "size": ids.numel()}
    except ValueError as e:
        problem = str(e)
    n_params = sum(t.numel() for t in ckpt.weights.values())
    shared = {n: n in ckpt.weights for n in ("embed_tokens.weight", "lm_head.weight")}
    return {
        "path": str(ckpt.path),
        "layout": {"plugin": "vllm-hass plugin format",
                   "eagle": "HASS/EAGLE-1/2 repo format"}[ckpt.layout],
        "files": ckpt.files,
        "config_bias_key": ckpt.config.get("bias"),
        "kind": "HASS-style (fc.bias/norms)" if (head.fc_bias or head.embed_norm or
                                               head.input_layernorm) else "EAGLE-1/2",
        "fc_bias": head.fc_bias,
        "norms": {k: getattr(head, k) for k in ("embed_norm", "hidden_norm",
                                                 "input_layernorm", "lm_head_norm")},
        "own_embed_tokens": shared["embed_tokens.weight"],
        "own_lm_head": shared["lm_head.weight"],
        "parameters": n_params,
        "parameters_without_embeddings": sum(
            t.numel() for k, t in ckpt.weights.items() if k not in shared),
        "dtype": str(next(iter(ckpt.weights.values())).dtype).removeprefix("torch."),
        "shapes": {k: list(t.shape) for k, t in sorted(ckpt.weights.items())},
        "renamed": ckpt.renamed,
        "target_dims": {
            "hidden_size": head.hidden_size, "vocab_size": head.vocab_size,
            "num_attention_heads": head.num_attention_heads,
            "num_key_value_heads": head.num_key_value_heads, "head_dim": head.head_dim,
            "intermediate_size (head)": head.intermediate_size,
            "rope_theta": head.rope_theta, "rope_scaling": head.rope_scaling,
        },
        "draft_vocab": vocab,
        "problem": problem,
    }


def run_inspect(args) -> int:
    import json

    info = describe(args.path)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0 if info["problem"] is None else 1
    print(f"{info['path']}")
    print(f"  layout      {info['layout']}  ({', '.join(info['files'])})")
    print(f"  kind        {info['kind']}")
    print(f"  fc.bias     {'yes' if info['fc_bias'] else 'no'}")
    norms = [k for k, v in info["norms"].items() if v]
    print(f"  norms       {', '.join(norms) if norms else 'none'}")
    if info["config_bias_key"] is not None:
        print(f"  config      'bias': {info['config_bias_key']} (stock vLLM would read this as "
              "attention bias; `convert` drops it)")
    print(f"  embed/lm_head  own embed_tokens: {'yes' if info['own_embed_tokens'] else 'no'}, "
          f"own lm_head: {'yes' if info['own_lm_head'] else 'no'}")
    print(f"  parameters  {info['parameters']:,} ({info['parameters_without_embeddings']:,} "
          f"without embed/lm_head), {info['dtype']}")
    print(f"  draft vocab {_vocab_line(info['draft_vocab'], info['target_dims']['vocab_size'])}")
    print("  compatible target:")
    for k, v in info["target_dims"].items():
        print(f"    {k:26s}{v}")
    print("  weights:")
    for k, shape in info["shapes"].items():
        print(f"    {k:48s}{shape}")
    if info["renamed"]:
        print("  renamed: " + ", ".join(f"{a} -> {b}" for a, b in info["renamed"].items()))
    if info["problem"]:
        print(f"  PROBLEM: {info['problem']}")
        return 1
    return 0


def _vocab_line(v: dict | None, vocab_size: int) -> str:
    if v is None:
        return f"none (drafts over the full {vocab_size:,} tokens)"
    line = f"{v['size']:,} of {vocab_size:,} tokens"
    if "special_tokens" in v:
        line += f" ({v['special_tokens']} special)"
    if "coverage" in v:
        line += f"; coverage {100 * v['coverage']:.2f}% of {v.get('tokens_counted', 0):,} counted tokens"
    if "holdout_coverage" in v:
        line += f", held-out {100 * v['holdout_coverage']:.2f}% of {v.get('holdout_tokens', 0):,}"
    if v.get("source"):
        line += f" [{v['source']}]"
    return line
