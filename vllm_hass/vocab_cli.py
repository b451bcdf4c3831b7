"""`vllm-hass vocab`: choose a head's draft vocabulary from token frequencies.

    vllm-hass vocab --target T --data DATA_DIR --size 8192 --out HEAD   # `train data` output
    vllm-hass vocab --target T --data mtbench --generate-tokens 128 --size 8192 --out HEAD

DATA is either a training-data directory (its assistant tokens are counted: those
are what the draft is asked to guess) or a prompt dataset (mtbench, humaneval,
sharegpt or FILE.jsonl), on which vLLM generates the target's own greedy outputs,
which are what a served draft must guess. `--holdout F` keeps the last F of the
records/prompts out of the counts and reports coverage on them. The result is
stored in HEAD (vllm_hass/vocab.py); hass.json's `draft_vocab_size` may then take
any prefix of it.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from vllm_hass.errors import UserError

DATASETS = ("mtbench", "humaneval", "sharegpt")
DEFAULT_GENERATE = 128


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("vocab", help="store a reduced draft vocabulary in a converted head",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", required=True, help="the target model directory")
    p.add_argument("--data", required=True, help="a `vllm-hass train data` directory, or "
                   "mtbench, humaneval, sharegpt, FILE.jsonl (prompts the target answers)")
    p.add_argument("--size", required=True, type=int, help="tokens in the vocabulary (specials included)")
    p.add_argument("--out", required=True, help="head directory made by `vllm-hass convert` or `train fit`")
    p.add_argument("--generate-tokens", type=int, default=None,
                   help=f"prompt datasets: greedy tokens generated per prompt (default {DEFAULT_GENERATE})")
    p.add_argument("--num-prompts", type=int, default=None, help="prompt datasets: the first N only")
    p.add_argument("--max-prompt-len", type=int, default=1024)
    p.add_argument("--with-prompts", action="store_true",
                   help="also count prompt (non-assistant) tokens, not only what the target writes")
    p.add_argument("--holdout", type=float, default=0.0,
                   help="fraction of records/prompts (the last ones) left out and used for coverage")
    p.add_argument("--force", action="store_true", help="replace a vocabulary OUT already has")
    p.set_defaults(func=run)


def is_dataset(data: str) -> bool:
    return data in DATASETS or data.endswith(".jsonl")


def check_head(out: Path, vocab_size: int, force: bool) -> None:
    """OUT is a plugin head (made by convert/train fit) for this target's vocabulary."""
    from vllm_hass.converters.layout import PLUGIN_ARCH, _read_json
    from vllm_hass.vocab import read_vocab

    if not out.is_dir():
        raise UserError(f"--out {out}: no such head directory (convert the head first: "
                        "`vllm-hass convert SRC --target T --out OUT`)")
    if not (out / "config.json").exists():
        raise UserError(f"--out {out}: no config.json (expected a head made by `vllm-hass convert`)")
    cfg = _read_json(out / "config.json")
    if PLUGIN_ARCH not in (cfg.get("architectures") or []):
        raise UserError(f"--out {out}/config.json: 'architectures' is {cfg.get('architectures')}, "
                        f"expected [\"{PLUGIN_ARCH}\"] (a head made by `vllm-hass convert`)")
    if cfg.get("vocab_size") != vocab_size:
        raise UserError(f"--out {out}/config.json: 'vocab_size' is {cfg.get('vocab_size')}, "
                        f"the target's is {vocab_size}")
    ids, _ = read_vocab(out)
    if ids is not None and not force:
        raise UserError(f"--out {out}: already has a draft vocabulary of {ids.numel()} tokens "
                        "(pass --force to replace it)")


def split(n: int, holdout: float, what: str) -> int:
    """Records kept for counting (the first ones); the rest are held out."""
    held = math.ceil(holdout * n) if holdout > 0 else 0
    if n - held < 1:
        raise UserError(f"--holdout {holdout}: leaves none of the {n} {what} to count")
    return n - held


def from_data_dir(args, V: int):
    """(counts [V], held-out counts [V] or None, source) from a training-data directory."""
    from vllm_hass.train.data import Samples
    from vllm_hass.vocab import count_tokens

    samples = Samples(args.data)
    keep = split(len(samples), args.holdout, "records")
    what = "all tokens" if args.with_prompts else "assistant tokens"
    where = f"--data {args.data}"
    seqs = lambda idx: (samples.tokens(i, args.with_prompts).numpy() for i in idx)  # noqa: E731
    counts = count_tokens(seqs(range(keep)), V, where)
    held = count_tokens(seqs(range(keep, len(samples))), V, where) if keep < len(samples) else None
    return counts, held, f"train data {Path(args.data).absolute()} ({what} of {keep} records)"


def prompt_texts(dataset: str, num_prompts: int | None) -> list[str]:
    if dataset == "sharegpt":
        from vllm_hass import assets

        texts = []
        for r in assets.sharegpt_conversations():
            first = next((t.get("value") for t in r["conversations"] if isinstance(t, dict)
                          and t.get("from") in ("human", "user")), None)
            if isinstance(first, str) and first.strip():
                texts.append(first)
            if num_prompts is not None and len(texts) >= num_prompts:
                break
        return texts
    from vllm_hass.bench.datasets import load_texts

    return load_texts(dataset, num_prompts)


def generate(target: Path, prompts: list[list[int]], max_tokens: int, max_model_len: int):
    """The target's greedy output ids per prompt, batched through vLLM (float32, eager)."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(target), dtype="float32", enforce_eager=True, seed=0,
              max_model_len=max_model_len)
    try:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                            SamplingParams(temperature=0.0, max_tokens=max_tokens))
        return [list(o.outputs[0].token_ids) for o in outs]
    finally:  # in-process engines share vLLM's global state: leave none behind
        llm.llm_engine.engine_core.shutdown()


def from_generation(args, V: int, tcfg: dict):
    from transformers import AutoTokenizer

    from vllm_hass.bench.datasets import encode
    from vllm_hass.vocab import count_tokens

    n_gen = DEFAULT_GENERATE if args.generate_tokens is None else args.generate_tokens
    max_pos = int(tcfg.get("max_position_embeddings") or 2048)
    if not 1 <= n_gen < max_pos:
        raise UserError(f"--generate-tokens {n_gen}: expected 1 .. {max_pos - 1} (the target's "
                        "max_position_embeddings leaves room for the prompt)")
    if args.num_prompts is not None and args.num_prompts < 1:
        raise UserError(f"--num-prompts {args.num_prompts}: expected an integer >= 1")
    texts = prompt_texts(args.data, args.num_prompts)
    if not texts:
        raise UserError(f"--data {args.data}: no prompts")
    keep = split(len(texts), args.holdout, "prompts")
    tok = AutoTokenizer.from_pretrained(str(args.target))
    prompt_len = min(args.max_prompt_len, max_pos - n_gen)
    prompts = encode(texts, tok, prompt_len)
    outs = generate(Path(args.target), prompts, n_gen, prompt_len + n_gen)
    seqs = [o + (p if args.with_prompts else []) for p, o in zip(prompts, outs)]
    counts = count_tokens(seqs[:keep], V, "generated tokens")
    held = count_tokens(seqs[keep:], V, "generated tokens") if keep < len(seqs) else None
    what = "outputs and prompts" if args.with_prompts else "outputs"
    return counts, held, (f"greedy {what} of {Path(args.target).absolute()} on {args.data} "
                          f"({keep} prompts, up to {n_gen} tokens each)")


def run(args) -> int:
    from vllm_hass.converters.convert import target_config
    from vllm_hass.vocab import build, special_ids, write_vocab

    tcfg = target_config(args.target)
    V = tcfg.get("vocab_size")
    if not isinstance(V, int):
        raise UserError(f"--target {args.target}/config.json: missing field 'vocab_size'")
    out = Path(args.out)
    check_head(out, V, args.force)
    specials = special_ids(args.target, V)
    lo = max(1, len(specials))
    if not lo <= args.size < V:
        raise UserError(f"--size {args.size}: expected {lo} .. {V - 1} (at least the "
                        f"{len(specials)} special tokens, below the target's vocab_size {V})")
    if not 0 <= args.holdout < 1:
        raise UserError(f"--holdout {args.holdout}: expected a fraction in [0, 1)")
    data = Path(args.data)
    if data.is_dir():
        if args.generate_tokens is not None or args.num_prompts is not None:
            raise UserError("--generate-tokens/--num-prompts: only with a prompt dataset; "
                            f"--data {args.data} is a training-data directory")
        counts, held, source = from_data_dir(args, V)
    elif is_dataset(args.data):
        if args.data.endswith(".jsonl") and not data.is_file():
            raise UserError(f"--data {args.data}: no such file")
        counts, held, source = from_generation(args, V, tcfg)
    else:
        raise UserError(f"--data {args.data}: neither a training-data directory (made by "
                        f"`vllm-hass train data`) nor a prompt dataset ({', '.join(DATASETS)} "
                        "or FILE.jsonl)")
    if args.holdout:
        source += f", holdout {args.holdout:g}"
    ids, meta = build(counts, specials, args.size, source, held)
    path = write_vocab(out, ids, V, meta)
    print(f"draft vocabulary: {args.size:,} of {V:,} tokens ({len(specials)} special)")
    print(f"counted: {meta['tokens_counted']:,} tokens ({source})")
    line = f"coverage: {100 * meta['coverage']:.2f}% of the counted tokens"
    if held is not None:
        line += f"; held-out {100 * meta['holdout_coverage']:.2f}% of {meta['holdout_tokens']:,} tokens"
    print(line)
    print(f"wrote {path} (config.json: draft_vocab_size {args.size})")
    return 0
