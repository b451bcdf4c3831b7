"""Coverage of a head's draft vocabulary prefixes on the target's greedy outputs.

    python docs/results/draft_vocab_coverage.py RESULTS.json HEAD_DIR 4096,8192,16384

RESULTS.json is a `vllm-hass bench` result: its no-speculation T = 0 outputs (token ids,
prompts the vocabulary never saw) are what the draft must guess; prints the fraction of
those tokens inside each prefix of the stored vocabulary.
"""

import json
import sys

from vllm_hass.vocab import read_vocab


def main(results, head, sizes):
    res = json.load(open(results))
    toks = [t for r in res["runs"] if r["config"] == "nospec" and r["temperature"] == 0
            for seq in (r.get("tokens") or []) for t in seq]
    if not toks:  # tokens live in the raw job results
        job = json.load(open(results.replace("results.json", "jobs/nospec.result.json")))
        toks = [t for run in job["runs"] if run["temperature"] == 0 for seq in run["tokens"] for t in seq]
    ids = read_vocab(head)[0].tolist()
    print(f"| draft vocab | coverage of {len(toks)} greedy output tokens |")
    print("|---:|---:|")
    for n in sizes:
        inside = set(ids[:n])
        print(f"| {n} | {sum(t in inside for t in toks) / len(toks):.1%} |")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], [int(x) for x in sys.argv[3].split(",")])
