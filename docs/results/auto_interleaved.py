"""`"tree": "auto"` against no speculation, both engines alive in one process, batch by
batch in turn (issue 15's target at B = 1, 4, 16, 64).

    VLLM_CPU_OMP_THREADS_BIND=1 taskset -c 1 python docs/results/auto_interleaved.py \\
        --target T --spec vllm_hass/heads/smollm2-135m-instruct-hass/hass.json \\
        [--batch-sizes 1,4,16,64] [--num-prompts 8] [--max-tokens 32] [--rounds 3] [--out DIR]

Why beside `vllm-hass bench`: the bench starts a fresh process per configuration and
round, and on this 2-core VM a whole process runs up to ±10 % faster or slower than the
next with the same configuration (measured: the same engine in 9 processes in a row). Six
rounds leave the median ratio a few percent uncertain, about the size of the 3 % target.
Here the two engines share the process, the machine's moment and the allocator, and take
turns every batch (order swapped each round), so each batch's ratio compares like with
like; the table gives the median of those ratios and the totals. Same prompts (MT-bench,
the bench's loader), greedy, ignore_eos, each engine warmed up as the bench does. What
this cannot see is a cost that only a process of its own would show; the bench's rows
beside it are that check.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--target", required=True)
    p.add_argument("--spec", required=True, help="a hass.json; its tree is replaced by \"auto\"")
    p.add_argument("--batch-sizes", default="1,4,16,64")
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out")
    args = p.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # both engines in this process
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from vllm_hass.bench import datasets
    from vllm_hass.bench.worker import batches
    from vllm_hass.config import load_spec_dict

    spec = {**load_spec_dict(args.spec), "tree": "auto"}
    spec.pop("num_speculative_tokens", None)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    tok = AutoTokenizer.from_pretrained(args.target)
    ids = datasets.encode(datasets.load_texts("mtbench", args.num_prompts), tok, 1024)
    prompts = [{"prompt_token_ids": x} for x in ids]
    max_len = max(len(x) for x in ids) + args.max_tokens + 64  # the tree's slots fit
    engines = {}
    for name, sc in (("nospec", None), ("auto", spec)):
        engines[name] = LLM(model=args.target, speculative_config=sc, dtype="float32",
                            enforce_eager=True, max_model_len=max_len, max_num_seqs=max(sizes), seed=0)
        engines[name].generate(prompts[: max(sizes)], SamplingParams(max_tokens=4, temperature=0),
                               use_tqdm=False)
    sp = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    rows = []
    for B in sizes:
        t = {n: [] for n in engines}
        same = True
        for rnd in range(args.rounds):
            order = list(engines) if rnd % 2 == 0 else list(engines)[::-1]
            for chunk in batches(prompts, B):
                outs = {}
                for name in order:
                    t0 = time.perf_counter()
                    outs[name] = engines[name].generate(chunk, sp, use_tqdm=False)
                    t[name].append(time.perf_counter() - t0)
                same &= all(a.outputs[0].token_ids == b.outputs[0].token_ids
                            for a, b in zip(outs["nospec"], outs["auto"]))
        ratios = [n / a for n, a in zip(t["nospec"], t["auto"])]  # auto's speed / no-spec's
        rows.append({"batch_size": B, "batches": len(ratios), "median_ratio": statistics.median(ratios),
                     "total_ratio": sum(t["nospec"]) / sum(t["auto"]),
                     "q1": statistics.quantiles(ratios, n=4)[0] if len(ratios) > 1 else ratios[0],
                     "q3": statistics.quantiles(ratios, n=4)[2] if len(ratios) > 1 else ratios[0],
                     "nospec_s": sum(t["nospec"]), "auto_s": sum(t["auto"]), "identical": same})
        print(rows[-1], flush=True)
    stats = engines["auto"].llm_engine.vllm_config.speculative_config.draft_model_config.hf_config
    path = getattr(stats, "hass_auto_stats", None)
    time.sleep(1.5)  # the stats file's idle flush
    chosen = json.loads(Path(path).read_text()) if path and Path(path).exists() else {}
    md = [f"### auto vs no speculation, interleaved in one process · SmolLM2-135M · float32 · "
          f"{args.num_prompts} MT-bench prompts × {args.max_tokens} tokens · {args.rounds} rounds", "",
          "| B | batches compared | auto / no-spec speed: median (quartiles) | totals | outputs |",
          "|---:|---:|---:|---:|---|"]
    for r in rows:
        md.append(f"| {r['batch_size']} | {r['batches']} | {r['median_ratio']:.3f} "
                  f"({r['q1']:.3f}–{r['q3']:.3f}) | {r['total_ratio']:.3f} | "
                  f"{'identical' if r['identical'] else 'DIFFERENT'} |")
    md += ["", f"auto's shapes (engine steps): {chosen.get('shape_steps')}, head off in "
           f"{chosen.get('head_off_steps')} of {chosen.get('steps')}"]
    text = "\n".join(md) + "\n"
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "auto_interleaved.md").write_text(text)
        (out / "auto_interleaved.json").write_text(json.dumps({"rows": rows, "auto": chosen,
                                                               "args": vars(args)}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
