"""Training throughput before/after issue 17, EAGLE and HASS, alternated in one process.

    python docs/results/train_throughput.py --target T --data DATA [--samples 24] [--rounds 3]
        [--draft-vocab 16384] [--before-rev 0d27ba2]

"before": `batch_forward` of the trainer at --before-rev (read with `git show`: every
position through the full-vocabulary lm_head, q from the full softmax) with its default
bfloat16 lm_head; "before, float32": the same code with a float32 lm_head; "after": the
current trainer as `train fit` runs it now (auto = float32 lm_head on CPU, q and losses
only at the scored positions, over --draft-vocab tokens, q from the stored normaliser).
Each configuration trains a fresh seeded head for one pass over the same batches (AdamW
step included), rounds alternated A B C A B C; tok/s = padded tokens per CPU-second of
the process (all its threads: robust to other jobs on the machine, unlike wall time),
median over rounds. Prints a markdown table and a profile of the after/HASS pass.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from vllm_hass.converters.convert import target_config  # noqa: E402
from vllm_hass.head import HassHead  # noqa: E402
from vllm_hass.train import fit as now  # noqa: E402
from vllm_hass.train.data import Samples, batches, collate  # noqa: E402
from vllm_hass.train.draft_vocab import resolve  # noqa: E402


def load_before(rev: str):
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:vllm_hass/train/fit.py"],
                         capture_output=True, text=True, check=True).stdout
    path = Path("/tmp/vllm_hass_fit_before.py")
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("vllm_hass.train._fit_before", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def one_pass(mod, kw, cfg, plan, method):
    r = now.Recipe(**now.METHODS[method])
    torch.manual_seed(0)
    head = HassHead(cfg).float()
    opt = torch.optim.AdamW(head.parameters(), lr=1e-4, betas=(0.9, 0.95))
    tokens, t0 = 0, time.process_time()
    for batch in plan:
        opt.zero_grad(set_to_none=True)
        mod.batch_forward(head, batch, kw["embed"], kw["lm_head"], r, r.topk_w, None, True,
                          **kw["extra"])
        opt.step()
        tokens += int(batch["valid"].sum())
    return tokens / (time.process_time() - t0)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--samples", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--draft-vocab", type=int, default=16384)
    ap.add_argument("--batch-tokens", type=int, default=2048)
    ap.add_argument("--before-rev", default="0d27ba2")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--skip-bf16", action="store_true",
                    help="leave out 'before' with its bf16 default (7 tok/s for EAGLE on this "
                    "project's AVX2 VM: minutes per pass)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    tdir = Path(args.target)
    samples = Samples(args.data)
    idx = list(range(min(args.samples, len(samples))))
    plan = [collate([samples[i] for i in b])
            for b in batches([samples.lengths[i] for i in idx], args.batch_tokens, 0)]
    cfg = now.head_config(target_config(tdir))
    embed, lm32 = now.load_shared(tdir)
    vocab = resolve(args.draft_vocab, None, samples, idx, [], tdir, cfg.vocab_size)
    before = load_before(args.before_rev)
    confs = {
        "before (bf16 lm_head, full vocabulary)": (before, {"embed": embed, "lm_head": lm32.bfloat16(),
                                                           "extra": {}}),
        "before, float32 lm_head": (before, {"embed": embed, "lm_head": lm32, "extra": {}}),
        f"after (float32, packed, {args.draft_vocab} draft vocab, stored lse)": (now, {
            "embed": embed, "lm_head": lm32,
            "extra": {"vocab": vocab, "lm_draft": lm32[vocab.ids].contiguous(),
                      "lm_draft_f32": lm32[vocab.ids].contiguous() if samples.has_lse else None}}),
    }
    if args.skip_bf16:
        del confs[next(iter(confs))]
    rates = {(c, m): [] for c in confs for m in ("eagle", "hass")}
    for rnd in range(args.rounds):
        for c, (mod, kw) in confs.items():
            for m in ("eagle", "hass"):
                rates[c, m].append(one_pass(mod, kw, cfg, plan, m))
                print(f"round {rnd + 1} {c} {m}: {rates[c, m][-1]:.0f} tok/s", flush=True)
    base = {m: statistics.median(rates[next(iter(confs)), m]) for m in ("eagle", "hass")}
    n_tok = sum(int(b["valid"].sum()) for b in plan)
    print(f"\n{len(idx)} samples, {len(plan)} batches, {n_tok} tokens, {torch.get_num_threads()} threads, "
          f"median of {args.rounds} rounds\n")
    print("| configuration | EAGLE tok/CPU-s | HASS tok/CPU-s | EAGLE × | HASS × |\n|---|---:|---:|---:|---:|")
    for c in confs:
        e, h = statistics.median(rates[c, "eagle"]), statistics.median(rates[c, "hass"])
        print(f"| {c} | {e:.0f} | {h:.0f} | {e / base['eagle']:.2f} | {h / base['hass']:.2f} |")
    mod, kw = confs[list(confs)[-1]]
    with torch.profiler.profile() as prof:
        one_pass(mod, kw, cfg, plan[:2], "hass")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
