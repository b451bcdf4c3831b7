"""Mutation check: each bug below is applied in turn to a copy of the tree, and the tests
that should catch it are run against the copy. Every mutant must be caught.

    python tests/mutants.py            # all mutants (make mutants)
    python tests/mutants.py --list     # names and what each breaks
    python tests/mutants.py NAME ...   # some of them

A mutant names what it breaks and is located by a snippet of code this project owns,
which must occur exactly once in its file: when a rewrite moves that code, the script
stops with "snippet not found" instead of silently testing nothing, and the snippet is
updated with the rewrite. The copy is imported through PYTHONPATH (vLLM's worker
processes inherit it), and the script checks that the copy is what gets imported.
Exit status 0 only if every mutant was caught and the unmutated copy passes its tests.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

FORCED = "tests/test_engine_tree.py::test_greedy_identical_to_no_speculation[1]"
ORACLE_TREE = "tests/test_engine_oracle.py::test_plugin_drafts_the_oracles_trees[fc_bias+norms-tree]"
SAMPLER = "tests/test_sampler_power.py"


@dataclass
class Mutant:
    name: str
    breaks: str
    path: str
    edits: list[tuple[str, str]]  # (snippet, replacement), each snippet unique in the file
    tests: list[str]


MUTANTS = [
    Mutant("verify-rope-off-by-one", "(a) RoPE position of tree nodes off by one (verification)",
           "vllm_hass/step.py",
           [("    pos_vals = computed[b_idx].astype(np.int64) + depths[b_idx, s_idx]\n",
             "    pos_vals = computed[b_idx].astype(np.int64) + depths[b_idx, s_idx] + 1\n")],
           [FORCED]),
    Mutant("verify-mask-sibling-visible", "(b) a tree node may attend to one sibling (verification)",
           "vllm_hass/step.py",
           [("    anc &= live[:, None, :]\n",
             "    anc &= live[:, None, :]\n"
             "    sib = (parents[:, 1:] == parents[:, :-1]) & (parents[:, 1:] >= 0)\n"
             "    anc[:, 1:, :-1] |= sib[:, :, None] & np.eye(N - 1, dtype=bool)\n")],
           [FORCED]),
    Mutant("compaction-skipped", "(c) KV compaction of the accepted path skipped",
           "vllm_hass/runner.py",
           [("        if step.max_depth > 0:  # some tree was verified",
             "        if False:  # some tree was verified")],
           [FORCED]),
    Mutant("compaction-one-slot-late", "(d) compaction copies to the slot after the right one",
           "vllm_hass/sampler.py",
           [("    dst = torch.where(move, root + depth, root)\n",
             "    dst = torch.where(move, root + depth + 1, root)\n")],
           [FORCED]),
    Mutant("first-pass-wrong-hidden", "(e) the draft's first pass reads the previous position's "
           "hidden state", "vllm_hass/step.py",
           [("    hidden_rows = fp.target_start + slot\n",
             "    hidden_rows = (fp.target_start + slot - 1).clamp(min=0)\n")],
           [ORACLE_TREE]),
    Mutant("greedy-first-matching-child", "(f) greedy acceptance stops at the first matching "
           "child instead of taking the longest path", "vllm_hass/tree.py",
           [("    best = torch.where(ok, trees.depths, -1).argmax(1)\n",
             "    best = torch.where(ok & (trees.depths == 1), 1, 0).argmax(1)\n")],
           [FORCED]),
    Mutant("rejected-sibling-not-zeroed", "(g) at T > 0 a rejected sibling keeps its probability "
           "for the next sibling", "vllm_hass/tree.py",
           [("        p.scatter_(1, x, torch.where(gone, 0.0, px))\n", "")],
           [SAMPLER]),
    Mutant("residual-not-renormalised", "(h) at T > 0 the residual is not renormalised",
           "vllm_hass/tree.py",
           [("        mass = p.sum(-1, dtype=torch.float64).unsqueeze(1) - (pxd.cumsum(1) - pxd)\n",
             "        mass = p.sum(-1, dtype=torch.float64).unsqueeze(1)\n")],
           [SAMPLER]),
    Mutant("top-p-after-rejection", "(i) top-p applied to the residual after the rejection "
           "instead of to the target's distribution before it", "vllm_hass/sampler.py",
           [("    p = md.top_p[row_req] if md.top_p is not None else None\n",
             "    p = None\n"),
            ("def _sample_fn(u: torch.Tensor, offset: int):\n",
             "def _sample_fn(u: torch.Tensor, offset: int, top_p=None):\n"),
            ("        p = p.clamp(min=0).double()\n",
             "        p = p.clamp(min=0).double()\n"
             "        if top_p is not None:\n"
             "            s, i = p.sort(-1, descending=True)\n"
             "            tot = s.sum(-1, keepdim=True).clamp(min=1e-30)\n"
             "            drop = (s.cumsum(-1) - s) / tot >= top_p.unsqueeze(1).to(p.dtype)\n"
             "            p = p.scatter(1, i, s.masked_fill(drop, 0.0))\n"),
            ("_sample_fn(u, n_accept), max_children", "_sample_fn(u, n_accept, md.top_p), max_children")],
           [SAMPLER]),
    Mutant("fc-bias-dropped", "(j) fc.bias loaded but not applied", "vllm_hass/draft_model.py",
           [("            prefix=maybe_prefix(prefix, \"fc\"),\n            return_bias=False,\n",
             "            prefix=maybe_prefix(prefix, \"fc\"),\n            return_bias=False,\n"
             "            skip_bias_add=True,\n")],
           [ORACLE_TREE]),
    Mutant("hidden-norm-skipped", "(k) the draft skips its hidden-state norm when the head has one",
           "vllm_hass/draft_model.py",
           [("        if self.hidden_norm is not None:\n", "        if False:\n")],
           [ORACLE_TREE]),
    Mutant("draft-rope-off-by-one", "the draft's expansion nodes one position too far",
           "vllm_hass/drafting.py",
           [("pos = (base + c.levels).unsqueeze(-1)", "pos = (base + c.levels + 1).unsqueeze(-1)")],
           [ORACLE_TREE]),
    Mutant("draft-mask-sibling-visible", "a draft expansion node also sees its frontier neighbour",
           "vllm_hass/tree.py",
           [("    anc[:, ar, ar] = True\n",
             "    anc[:, ar, ar] = True\n    anc[:, ar[1:], ar[:-1]] = True\n"),
            ("        anc[:, ar, step * K + ar] = True\n",
             "        anc[:, ar, step * K + ar] = True\n"
             "        anc[:, ar[1:], step * K + ar[:-1]] = True\n")],
           [ORACLE_TREE]),
    Mutant("no-draft-step-through-tree-path", "a step where no request has drafts still runs the "
           "tree layout and tree sampler (vLLM builds spec metadata every step)",
           "vllm_hass/runner.py",
           [("        if spec_md is not None and spec_md.max_spec_len > 0:\n",
             "        if spec_md is not None:\n")],
           ["tests/test_engine_auto.py::test_steps_without_drafts_run_as_without_speculation"]),
]


def copy_tree(dst: Path) -> Path:
    """The repository's files (tracked and untracked, not ignored) under dst/repo, and a
    dst/path/vllm_hass that imports from the copy (kernels and converters included)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    repo = dst / "repo"
    for f in filter(None, files):
        src = ROOT / f
        if src.is_file():
            (repo / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, repo / f)
    (repo / "vllm_hass" / "kernels").symlink_to(repo / "triton_kernels")
    (repo / "vllm_hass" / "converters").symlink_to(repo / "converters")
    path = dst / "path"
    path.mkdir()
    (path / "vllm_hass").symlink_to(repo / "vllm_hass")
    return repo


def apply(repo: Path, m: Mutant) -> dict[Path, str]:
    """Apply m's edits; returns the original texts for undo."""
    f = repo / m.path
    orig = f.read_text()
    text = orig
    for old, new in m.edits:
        n = text.count(old)
        if n != 1:
            raise SystemExit(f"mutant {m.name}: snippet {'not found' if n == 0 else f'found {n} times'} "
                             f"in {m.path}: {old.strip()[:80]!r} (update tests/mutants.py)")
        text = text.replace(old, new)
    f.write_text(text)
    return {f: orig}


def run_tests(repo: Path, env: dict, tests: list[str], timeout: float) -> tuple[int, str, float]:
    t0 = time.time()
    try:
        r = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                            *tests], cwd=repo, env=env, capture_output=True, text=True,
                           timeout=timeout)
        code, out = r.returncode, r.stdout + r.stderr
    except subprocess.TimeoutExpired:
        code, out = -1, "timeout"
    return code, out, time.time() - t0


def summary_line(out: str) -> str:
    lines = [ln for ln in out.splitlines() if " passed" in ln or " failed" in ln or "error" in ln]
    return lines[-1].strip("= ") if lines else out.strip().splitlines()[-1] if out.strip() else ""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", help="mutants to run (default: all)")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per test run")
    args = ap.parse_args(argv)
    if args.list:
        for m in MUTANTS:
            print(f"{m.name:30s} {m.breaks}  [{m.path}; {', '.join(m.tests)}]")
        return 0
    chosen = [m for m in MUTANTS if not args.names or m.name in args.names]
    unknown = set(args.names) - {m.name for m in MUTANTS}
    if unknown:
        raise SystemExit(f"unknown mutant(s): {', '.join(sorted(unknown))} (see --list)")

    with tempfile.TemporaryDirectory(prefix="vllm-hass-mutants-") as tmp:
        repo = copy_tree(Path(tmp))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(Path(tmp) / "path"), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
        where = subprocess.run([sys.executable, "-c", "import vllm_hass.kernels.tree_attention as t, "
                                "vllm_hass; print(vllm_hass.__file__, t.__file__)"], env=env,
                               cwd=repo, capture_output=True, text=True).stdout.split()
        if len(where) != 2 or not all(p.startswith(tmp) for p in where):
            raise SystemExit(f"the copy is not what gets imported: {where}")
        for m in chosen:  # every snippet exists before anything runs
            for f, text in apply(repo, m).items():
                f.write_text(text)

        results = []
        needed = sorted({t for m in chosen for t in m.tests})
        code, out, secs = run_tests(repo, env, needed, args.timeout)
        print(f"{'(unmutated)':30s} {'passes' if code == 0 else 'FAILS'}  {secs:5.0f} s  {summary_line(out)}",
              flush=True)
        if code != 0:
            print(out[-3000:])
            return 1
        for m in chosen:
            undo = apply(repo, m)
            try:
                code, out, secs = run_tests(repo, env, m.tests, args.timeout)
            finally:
                for f, text in undo.items():
                    f.write_text(text)
            caught = code == 1  # tests ran and failed (not a crash of pytest itself)
            results.append({"name": m.name, "breaks": m.breaks, "caught": caught, "exit": code,
                             "seconds": round(secs, 1), "tests": m.tests, "summary": summary_line(out)})
            print(f"{m.name:30s} {'caught' if caught else 'ESCAPED'}  {secs:5.0f} s  {summary_line(out)}",
                  flush=True)
    n = sum(r["caught"] for r in results)
    print(f"mutants caught: {n}/{len(results)}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0 if n == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
