"""Self-distilled training data at token level: the target's own replies, kept as token ids.

`vllm-hass train gen` picks single-turn prompts (ShareGPT's first human turns by default,
deduplicated, never an evaluation prompt), lets vLLM write the replies in one batched run
(every core; a stated mix of greedy and T = 1 samples), and stores, per prompt, the exact
prompt ids the engine was given and the exact output ids it produced. `train data --tokens`
then computes the target's features on precisely those ids: a detokenize/retokenize round
trip can change tokens (merges across the reply boundary, normalisation), and the draft must
learn the token sequences the served target emits, not a re-encoding of their text.

tokens.jsonl, one record a line:
    {"id": "sharegpt:<conv id>", "source": "sharegpt", "prompt_ids": [...],
     "output_ids": [...], "temperature": 0.0 | 1.0, "seed": int | null,
     "finish_reason": "stop" | "length", "eval": true (only with --eval-data)}

Evaluation prompts (MT-bench first turns, HumanEval) never become training data: they are
filtered out of every training source, and `--prompts mtbench|humaneval --eval-data` marks
its records so that `train data` records it and `train fit` refuses the result.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from vllm_hass.errors import UserError

EVAL_DATASETS = ("mtbench", "humaneval")


def _norm(text: str) -> str:
    return " ".join(text.split()).lower()


def eval_prompts() -> set[str]:
    """Normalised texts of the evaluation prompts (MT-bench first turns, HumanEval)."""
    from vllm_hass.bench.datasets import load_texts

    return {_norm(t) for d in EVAL_DATASETS for t in load_texts(d)}


def is_greedy(i: int, greedy_fraction: float) -> bool:
    """A deterministic, evenly spread mix: prompt i is greedy when floor((i + 1) f) >
    floor(i f), so any n consecutive prompts hold floor(n f) or so greedy ones
    (f = 0.75: 1 sampled, then 3 greedy, repeating; f = 0.5: sampled, greedy, ...)."""
    return int((i + 1) * greedy_fraction + 1e-9) > int(i * greedy_fraction + 1e-9)


def sharegpt_prompts(num: int, skip: int = 0) -> list[tuple[str, str]]:
    """(id, first human turn) of ShareGPT records after `skip` usable ones: non-empty,
    deduplicated by normalised text, and not one of the evaluation prompts."""
    from vllm_hass import assets

    banned, seen, out, usable = eval_prompts(), set(), [], 0
    for r in assets.sharegpt_conversations():
        first = next((t.get("value") for t in r["conversations"] if isinstance(t, dict)
                      and t.get("from") in ("human", "user")), None)
        if not isinstance(first, str) or not first.strip():
            continue
        key = _norm(first)
        if key in seen or key in banned or any(b in key for b in banned if len(b) > 40):
            continue
        seen.add(key)
        usable += 1
        if usable > skip:
            out.append((f"sharegpt:{r.get('id')}", first))
        if len(out) >= num:
            break
    return out


def file_prompts(source: str, num: int, skip: int, eval_data: bool) -> list[tuple[str, str]]:
    """FILE.jsonl (evaluation prompts left out) or, for evaluation data only, mtbench /
    humaneval themselves."""
    from vllm_hass.bench.datasets import load_texts

    texts = load_texts(source)
    if not eval_data:
        banned = eval_prompts()
        texts = [t for t in texts if _norm(t) not in banned]
    name = source if source in EVAL_DATASETS else Path(source).name
    return [(f"{name}:{skip + i}", t) for i, t in enumerate(texts[skip:skip + num])]


def encode_prompts(tok, prompts: list[tuple[str, str]], max_prompt_tokens: int) -> list[dict]:
    """Chat-templated prompt ids; prompts longer than max_prompt_tokens are dropped (a
    truncated question is not what users send)."""
    out = []
    for pid, text in prompts:
        rendered = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                           add_generation_prompt=True)
        ids = tok(rendered, add_special_tokens=False)["input_ids"]
        if len(ids) <= max_prompt_tokens:
            out.append({"id": pid, "prompt_ids": list(ids)})
    return out


def generate(target: Path, records: list[dict], *, max_tokens: int, greedy_fraction: float,
             seed: int, max_model_len: int) -> list[dict]:
    """Fills output_ids/temperature/seed/finish_reason of each record, in one vLLM run."""
    from vllm import LLM, SamplingParams

    params = []
    for i, r in enumerate(records):
        greedy = is_greedy(i, greedy_fraction)
        r["temperature"] = 0.0 if greedy else 1.0
        r["seed"] = None if greedy else seed * 1_000_003 + i
        params.append(SamplingParams(temperature=r["temperature"], seed=r["seed"],
                                     max_tokens=max_tokens))
    llm = LLM(model=str(target), dtype="float32", enforce_eager=True, seed=seed,
              max_model_len=max_model_len, max_num_seqs=128)
    try:
        outs = llm.generate([{"prompt_token_ids": r["prompt_ids"]} for r in records], params)
    finally:  # in-process engines share vLLM's global state: leave none behind
        llm.llm_engine.engine_core.shutdown()
    for r, o in zip(records, outs):
        if list(o.prompt_token_ids) != r["prompt_ids"]:
            raise AssertionError(f"{r['id']}: vLLM changed the prompt ids")
        r["output_ids"] = list(o.outputs[0].token_ids)
        r["finish_reason"] = o.outputs[0].finish_reason
    return records


def write_records(path: Path, records: list[dict]) -> None:
    """Atomic: the file is complete or absent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    with tmp.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


def read_records(path: str | os.PathLike, limit: int | None = None) -> list[dict]:
    """tokens.jsonl -> records, each checked (one-line errors naming the line and field)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--tokens {path}: no such file")
    out = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{where}: not JSON ({e.msg}); expected one record a line") from None
            if not isinstance(r, dict):
                raise UserError(f"{where}: expected an object with prompt_ids and output_ids")
            for k in ("prompt_ids", "output_ids"):
                v = r.get(k)
                if not (isinstance(v, list) and v and all(isinstance(t, int) and not isinstance(t, bool)
                                                         and t >= 0 for t in v)):
                    raise UserError(f"{where}: '{k}' must be a non-empty list of token ids (ints >= 0)")
            out.append(r)
            if limit is not None and len(out) >= limit:
                break
    if not out:
        raise UserError(f"--tokens {path}: no records")
    return out


def encode_record(r: dict, max_len: int, vocab_size: int, where: str) -> tuple[list[int], list[int]]:
    """input_ids = prompt + reply exactly as generated; loss_mask = 1 on the reply."""
    ids = r["prompt_ids"] + r["output_ids"]
    if max(ids) >= vocab_size:
        raise UserError(f"{where}: token id {max(ids)} is outside the target's vocabulary "
                        f"({vocab_size}); expected ids made by this target's tokenizer")
    mask = [0] * len(r["prompt_ids"]) + [1] * len(r["output_ids"])
    return ids[:max_len], mask[:max_len]


def run_gen(args) -> int:
    from transformers import AutoTokenizer

    target, out = Path(args.target), Path(args.out)
    if not (target / "config.json").is_file():
        raise UserError(f"--target {target}: expected a local HF model directory with config.json")
    if out.suffix != ".jsonl":
        raise UserError(f"--out {out}: expected a FILE.jsonl")
    if out.exists() and not args.force:
        raise UserError(f"--out {out}: exists (pass --force to replace it)")
    if args.prompts in EVAL_DATASETS and not args.eval_data:
        raise UserError(f"--prompts {args.prompts}: an evaluation set; pass --eval-data to make "
                        "held-out evaluation data from it (`train fit` refuses such data)")
    if args.eval_data and args.prompts == "sharegpt":
        raise UserError("--eval-data: expects --prompts mtbench, humaneval or FILE.jsonl")
    if not 0.0 <= args.greedy_fraction <= 1.0:
        raise UserError(f"--greedy-fraction {args.greedy_fraction}: expected 0 .. 1")
    for name in ("num_prompts", "max_tokens", "max_prompt_tokens"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)}: expected an integer >= 1")
    tok = AutoTokenizer.from_pretrained(str(target))
    if not tok.chat_template:
        raise UserError(f"--target {target}: the tokenizer has no chat template")
    want = args.num_prompts
    picked: list[dict] = []
    pool = args.num_prompts * 2  # some prompts are too long: ask for more, keep the first N
    while len(picked) < want:
        if args.prompts == "sharegpt":
            raw = sharegpt_prompts(pool, args.skip)
        else:
            raw = file_prompts(args.prompts, pool, args.skip, args.eval_data)
        picked = encode_prompts(tok, raw, args.max_prompt_tokens)[:want]
        if len(raw) < pool:  # the source is exhausted
            break
        pool *= 2
    if not picked:
        raise UserError(f"--prompts {args.prompts}: no prompt of at most {args.max_prompt_tokens} tokens")
    for r in picked:
        r["source"] = args.prompts if args.prompts in ("sharegpt", *EVAL_DATASETS) \
            else Path(args.prompts).name
        if args.eval_data:
            r["eval"] = True  # `train fit` refuses data made from these
    records = generate(target, picked, max_tokens=args.max_tokens,
                       greedy_fraction=args.greedy_fraction, seed=args.seed,
                       max_model_len=args.max_prompt_tokens + args.max_tokens)
    write_records(out, records)
    n_out = sum(len(r["output_ids"]) for r in records)
    greedy = sum(r["temperature"] == 0 for r in records)
    print(json.dumps({"records": len(records), "greedy": greedy, "sampled": len(records) - greedy,
                      "output_tokens": n_out,
                      "prompt_tokens": sum(len(r["prompt_ids"]) for r in records),
                      "out": str(out)}))
    return 0
