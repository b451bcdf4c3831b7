"""`vllm-hass bench compare A B [--label ...]`: two heads' bench runs side by side.

Rows are the configs both runs measured (same batch size and temperature); the ratio
column is τ_B / τ_A, the figure the HASS paper reports against EAGLE-2. Both runs must
have used the same target, dataset, prompts and lengths, or the ratio means nothing:
that is checked, not assumed.
"""

from __future__ import annotations

from pathlib import Path

from vllm_hass.bench.report import read, vec
from vllm_hass.errors import UserError

SAME = ("target", "dataset", "num_prompts", "max_tokens", "max_model_len", "seed")


def add_parser(subparsers):
    p = subparsers.add_parser("compare", help="tau of two heads' bench runs side by side")
    p.add_argument("runs", nargs=2, metavar="DIR", help="two bench --out directories (A, B)")
    p.add_argument("--label", dest="labels", nargs=2, metavar=("A", "B"), default=None,
                   help="column names (default: the directory names)")
    return p


def table(a: dict, b: dict, labels: tuple[str, str]) -> str:
    for key in SAME:
        va, vb = a["meta"].get(key), b["meta"].get(key)
        if va != vb:
            raise UserError(f"bench compare: runs differ in {key} ({va!r} vs {vb!r}); "
                            "compare runs made with the same settings")

    def rows(res):
        out = {}
        for r in res["runs"]:
            if r.get("tau"):
                out[(r["config"], r["batch_size"], r["temperature"])] = r
        for o in res.get("oracle", []):
            if o.get("tau"):
                out[(o["config"], 1, 0.0)] = o
        return out

    ra, rb = rows(a), rows(b)
    keys = [k for k in ra if k in rb]
    if not keys:
        raise UserError("bench compare: the two runs share no config with a measured tau")
    la, lb = labels
    m = a["meta"]
    lines = [f"### {Path(m['target']).name} · {m['dataset']} · {m['num_prompts']} prompts × "
             f"{m['max_tokens']} tokens",
             f"| config | B | T | τ {la} | τ {lb} | {lb}/{la} | accept@1.. {la} | accept@1.. {lb} |",
             "|---|---:|---:|---:|---:|---:|---|---|"]
    for k in sorted(keys, key=lambda k: (k[2], k[0].startswith("oracle"), k[0], k[1])):
        x, y = ra[k], rb[k]
        lines.append(f"| {k[0]} | {k[1]} | {k[2]:g} | {x['tau']:.2f} | {y['tau']:.2f} | "
                     f"{y['tau'] / x['tau']:.3f}× | {per_pos(x)} | {per_pos(y)} |")
    return "\n".join(lines)


def per_pos(row: dict) -> str:
    # engine runs call it acceptance_per_pos, oracle shapes per_depth
    return vec(row.get("acceptance_per_pos") or row.get("per_depth"))


def run(args) -> int:
    labels = tuple(args.labels) if args.labels else tuple(Path(p).name for p in args.runs)
    print(table(read(args.runs[0]), read(args.runs[1]), labels))
    return 0
