"""One bench configuration in a fresh process.

    python -m vllm_hass.bench.worker JOB.json RESULT.json

A vLLM engine does not hand everything back when it is deleted, so each engine
configuration (and the oracle) runs in its own process; the parent reads
RESULT.json. Lines starting with PROGRESS on stdout advance the parent's bar.
"""

from __future__ import annotations

import json
import sys
import time

PROGRESS = "@@bench-progress"


def tick() -> None:
    print(PROGRESS, flush=True)


def spec_counters(llm) -> dict:
    """Cumulative spec-decode counters (summed over engines) from vLLM's metrics."""
    from vllm.v1.metrics.reader import Counter, Vector

    c = {"drafts": 0, "draft_tokens": 0, "accepted": 0, "per_pos": []}
    names = {
        "vllm:spec_decode_num_drafts": "drafts",
        "vllm:spec_decode_num_draft_tokens": "draft_tokens",
        "vllm:spec_decode_num_accepted_tokens": "accepted",
    }
    for m in llm.get_metrics():
        if isinstance(m, Counter) and m.name in names:
            c[names[m.name]] += m.value
        elif isinstance(m, Vector) and m.name == "vllm:spec_decode_num_accepted_tokens_per_pos":
            if len(c["per_pos"]) < len(m.values):
                c["per_pos"] += [0] * (len(m.values) - len(c["per_pos"]))
            for i, v in enumerate(m.values):
                c["per_pos"][i] += v
    return c


def batches(prompts: list, batch_size: int) -> list[list]:
    """Full batches of `batch_size`, cycling through the prompts (at least one pass)."""
    n = -(-max(len(prompts), batch_size) // batch_size) * batch_size
    reqs = [prompts[i % len(prompts)] for i in range(n)]
    return [reqs[i:i + batch_size] for i in range(0, n, batch_size)]


def run_engine(job: dict) -> dict:
    import os

    from vllm import LLM, SamplingParams

    if job.get("auto_stats"):  # "tree": "auto": the runner writes its choices there
        os.environ["VLLM_HASS_AUTO_STATS"] = job["auto_stats"]

    llm = LLM(
        model=job["target"],
        tokenizer=job["target"],
        speculative_config=job["speculative_config"],
        dtype=job["dtype"],
        enforce_eager=job["enforce_eager"],
        max_model_len=job["max_model_len"],
        max_num_seqs=max(job["batch_sizes"]),
        seed=job["seed"],
        disable_log_stats=False,  # the spec-decode counters come from the stat loggers
        **job.get("engine_kwargs", {}),
    )
    prompts = [{"prompt_token_ids": p} for p in job["prompts"]]
    # Warm-up: first-call allocations and kernel selection stay out of the timings.
    llm.generate(prompts[: max(job["batch_sizes"])], SamplingParams(max_tokens=4, temperature=0),
                 use_tqdm=False)
    runs = []
    for temperature in job["temperatures"]:
        sp = SamplingParams(temperature=temperature, max_tokens=job["max_tokens"], ignore_eos=True,
                            seed=job["seed"] if temperature > 0 else None)
        for bs in job["batch_sizes"]:
            chunks = batches(prompts, bs)
            before = spec_counters(llm)
            t0 = time.perf_counter()
            outs = []
            for chunk in chunks:
                outs += llm.generate(chunk, sp, use_tqdm=False)
            elapsed = time.perf_counter() - t0
            after = spec_counters(llm)
            per_pos = [a - (before["per_pos"][i] if i < len(before["per_pos"]) else 0)
                       for i, a in enumerate(after["per_pos"])]
            runs.append({
                "batch_size": bs,
                "temperature": temperature,
                "num_requests": len(outs),
                "output_tokens": sum(len(o.outputs[0].token_ids) for o in outs),
                "elapsed_s": elapsed,
                "drafts": after["drafts"] - before["drafts"],
                "draft_tokens": after["draft_tokens"] - before["draft_tokens"],
                "accepted": after["accepted"] - before["accepted"],
                "accepted_per_pos": per_pos,
                # Greedy outputs of the first pass over the prompts, to check losslessness.
                "tokens": [list(o.outputs[0].token_ids) for o in outs[: len(prompts)]]
                if temperature == 0 else None,
            })
            tick()
    if job.get("auto_stats") and os.path.exists(job["auto_stats"]):
        with open(job["auto_stats"]) as f:
            return {"runs": runs, "auto": json.load(f)}
    return {"runs": runs}


def run_oracle(job: dict) -> dict:
    import torch

    from vllm_hass.bench.oracle import oracle_tau

    out = []
    for shape in job["shapes"]:
        r = oracle_tau(
            job["target"], job["head"], job["prompts"], job["max_tokens"],
            tree=shape.get("tree"), k=shape.get("k"),
            dtype=getattr(torch, job["dtype"]), device=job["device"], progress=tick,
            draft_vocab_size=shape.get("draft_vocab_size", 0),
        )
        out.append({"name": shape["name"], **{k: v for k, v in shape.items() if k != "name"}, **r.to_dict()})
    return {"oracle": out}


def main(argv: list[str]) -> int:
    job_path, result_path = argv
    with open(job_path) as f:
        job = json.load(f)
    t0 = time.perf_counter()
    result = run_oracle(job) if job["kind"] == "oracle" else run_engine(job)
    result["wall_s"] = time.perf_counter() - t0
    with open(result_path, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
