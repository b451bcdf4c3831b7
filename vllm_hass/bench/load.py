"""`vllm-hass bench load`: many concurrent OpenAI-API clients against `vllm serve`.

A serving plugin is judged by what it does when many clients, broken clients and a
full KV cache arrive at once, not by one request at a time. This starts `vllm serve`
itself (127.0.0.1, a free port) once per speculative config and once without
speculation, sends each the same seeded traffic for a bounded time and count (streaming
and not, chat and completions, T = 0 and T > 0, random max_tokens, stop strings, n > 1,
logprobs, seeds, and clients that hang up mid-stream), and stops every server it
started. Then it replays every greedy request that completed on a speculative server
against the no-speculation server and compares token ids: speculation must not change
a T = 0 output.

    vllm-hass bench load --target T --spec hass.json --clients 32 --duration 60 --out runs/load

Reported per server: requests/s, output tok/s, p50/p99 time to first token and
inter-token latency (per token: a chunk of k tokens after a gap g counts k gaps of g/k,
so chains, trees and no-spec compare), errors by kind, preemptions and tau (vLLM's
counters on /metrics), the server's RSS (its process tree) at start, minute 1 and end,
and, with the worker probe (bench/probe.py), which request ids the plugin still holds
once the traffic is over. Exit status 1 when any check fails.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from itertools import pairwise
from pathlib import Path

from vllm_hass.demo import _http as demo_http
from vllm_hass.demo import spec_counters
from vllm_hass.errors import UserError

PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Speculative decoding drafts several tokens with a small model and verifies them.",
    "Write a Python function that adds two numbers.",
    "Once upon a time there was a little robot who wanted to learn how to write poems.",
    "for i in range(10): print(i * i)",
    "Explain in one sentence why the sky is blue.",
    "A draft tree lets the target check many continuations at once.",
    "List three colours and a fruit of each colour.",
]
STOPS = [["."], ["\n"], [" the", "e "], ["o"], [")", ":"]]
# For targets that ship no chat template (the tiny fixtures): vLLM refuses chat requests
# without one.
PLAIN_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                  "assistant:")


@dataclass
class Settings:
    target: Path
    specs: list[Path]
    clients: int = 32
    duration: float = 60.0
    max_requests: int = 100_000
    max_tokens: int = 64
    disconnect: float = 0.15
    seed: int = 0
    serve_args: list[str] = field(default_factory=list)
    out: Path | None = None
    nospec_load: bool = True  # also load the no-spec server (its figures); else replay only
    overlap_start: bool = False  # start the no-spec server with the first (CI: one start-up less)
    probe: bool = True
    request_timeout: float = 600.0
    start_timeout: float = 900.0
    max_rss_growth: float | None = None


@dataclass
class Result:
    path: str
    body: dict
    kind: str  # "ok", "disconnected", or an error kind
    detail: str = ""
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    e2e: float = 0.0
    tokens: int = 0
    prompt_ids: list[int] | None = None
    outputs: list[list[int]] | None = None


# -- servers -----------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(url: str, data: dict | None = None, timeout: float = 60) -> str:
    return demo_http(url, data, timeout)  # the demo's request helper, with a shorter timeout


def _has_chat_template(target: Path) -> bool:
    cfg = target / "tokenizer_config.json"
    return (target / "chat_template.jinja").is_file() or (
        cfg.is_file() and "chat_template" in json.loads(cfg.read_text()))


class Server:
    """One `vllm serve` subprocess: the project's CPU settings (float32, eager) first so
    that `serve_args` can override them, the probe as a worker extension when asked."""

    def __init__(self, target: Path, spec: Path | None, s: Settings, workdir: Path, label: str):
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.model = str(target)
        self.label = label
        cmd = [str(Path(sys.executable).parent / "vllm"), "serve", str(target),
               *(["--speculative-config", str(spec)] if spec else []),
               "--enforce-eager", "--dtype", "float32", "--host", "127.0.0.1", "--port", str(self.port)]
        if not _has_chat_template(target):
            tpl = workdir / "chat_template.jinja"
            tpl.write_text(PLAIN_TEMPLATE)
            cmd += ["--chat-template", str(tpl)]
        env = dict(os.environ)
        env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the real server: engine in its own process
        if s.probe:
            cmd += ["--worker-extension-cls", "vllm_hass.bench.probe.HassStateProbe"]
            env["VLLM_SERVER_DEV_MODE"] = "1"  # exposes POST /collective_rpc
        self.cmd = cmd + list(s.serve_args)
        self.log_path = workdir / f"serve-{label.replace(' ', '-').replace(',', '-')}.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 (open while the server runs; stop() closes it)
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def wait_up(self, timeout: float) -> None:
        deadline = time.time() + timeout
        while True:
            if self.proc.poll() is not None:
                raise UserError(f"vllm serve ({self.label}) exited with status {self.proc.returncode}; "
                                f"log: {self.log_path}\n{self.log_path.read_text()[-3000:]}")
            try:
                _http(self.base + "/health", timeout=2)
                return
            except OSError:
                if time.time() > deadline:
                    raise UserError(f"vllm serve ({self.label}) not up after {timeout:.0f} s; "
                                    f"log: {self.log_path}") from None
                time.sleep(1)

    def rss(self) -> int:
        """Bytes resident in the server and its children (API server, engine, workers)."""
        import psutil

        try:
            p = psutil.Process(self.proc.pid)
            procs = [p, *p.children(recursive=True)]
        except psutil.NoSuchProcess:
            return 0
        total = 0
        for q in procs:
            try:
                total += q.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(30)
        self._log.close()


def _metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith((name + "{", name + " ")))


# -- traffic -----------------------------------------------------------------------


def make_request(rng: random.Random, model: str, s: Settings, hang_up: bool) -> tuple[str, dict, int | None]:
    """(path, body, chunks to read before hanging up or None). Disconnecting clients are
    always streaming; n > 1 only at T > 0 (vLLM refuses n > 1 with greedy sampling)."""
    chat = rng.random() < 0.5
    cut = rng.randint(1, 3) if hang_up else None
    stream = cut is not None or rng.random() < 0.5
    greedy = rng.random() < 0.5
    prompt = " ".join(rng.choice(PROMPTS) for _ in range(rng.randint(1, 3)))
    body: dict = {"model": model, "max_tokens": rng.randint(1, s.max_tokens),
                  "temperature": 0.0 if greedy else rng.choice([0.7, 1.0]),
                  "return_token_ids": True, "stream": stream}
    body.update({"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt})
    if stream:
        body["stream_options"] = {"include_usage": True}
    if rng.random() < 0.2:
        body["stop"] = rng.choice(STOPS)
    if rng.random() < 0.3:
        body["ignore_eos"] = True
    if not greedy and rng.random() < 0.5:
        body["seed"] = rng.randrange(1 << 30)
    if not greedy and rng.random() < 0.2:
        body["n"] = rng.choice([2, 3])
    if rng.random() < 0.2:
        k = rng.randint(0, 5)
        body.update({"logprobs": True, "top_logprobs": k} if chat else {"logprobs": k})
    return ("/v1/chat/completions" if chat else "/v1/completions"), body, cut


def _check(r: Result, finish: list, usage: dict | None) -> Result:
    """A complete answer: every choice finished, the usage adds up, `length` means max_tokens.
    `finish`: each choice's finish_reason, in the order of r.outputs."""
    n = r.body.get("n", 1)
    outs = r.outputs or []
    if len(outs) != n or len(finish) != n or None in finish:
        r.kind, r.detail = "broken_response", f"{len(outs)} choices, finish {finish}"
    elif usage is None or usage.get("completion_tokens") != sum(map(len, outs)):
        r.kind, r.detail = "usage_mismatch", f"usage {usage}, tokens {list(map(len, outs))}"
    elif any(f == "length" and len(o) != r.body["max_tokens"] for o, f in zip(outs, finish)):
        r.kind, r.detail = "wrong_length", f"max_tokens {r.body['max_tokens']}, {list(map(len, outs))}"
    elif r.prompt_ids is None:
        r.kind, r.detail = "broken_response", "no prompt_token_ids"
    return r


async def _read_stream(resp, r: Result, t0: float, cut: int | None) -> Result:
    outs: dict[int, list[int]] = {}
    finish: dict[int, str | None] = {}
    usage, done, chunks, last = None, False, 0, t0
    async for raw in resp.content:
        line = raw.strip()
        if not line:
            continue
        if not line.startswith(b"data: "):
            r.kind, r.detail = "broken_stream", line[:80].decode(errors="replace")
            return r
        if line == b"data: [DONE]":
            done = True
            break
        chunk = json.loads(line[6:])
        if "error" in chunk:
            r.kind, r.detail = "stream_error", str(chunk["error"])[:200]
            return r
        r.prompt_ids = r.prompt_ids or chunk.get("prompt_token_ids")
        usage = chunk.get("usage") or usage
        for ch in chunk.get("choices") or []:
            r.prompt_ids = r.prompt_ids or ch.get("prompt_token_ids")
            i = ch["index"]
            outs.setdefault(i, [])
            finish.setdefault(i, None)
            ids = ch.get("token_ids") or []
            if ids:
                now = time.perf_counter()
                if r.ttft is None:
                    r.ttft = now - t0
                elif r.body.get("n", 1) == 1:
                    r.itl += [(now - last) / len(ids)] * len(ids)
                last = now
                outs[i] += ids
                r.tokens += len(ids)
                chunks += 1
            if ch.get("finish_reason"):
                finish[i] = ch["finish_reason"]
        if cut is not None and chunks >= cut:
            resp.close()  # hang up mid-stream: the server must abort the request
            r.kind = "disconnected"
            return r
    if not done:
        r.kind, r.detail = "broken_stream", "no [DONE]"
        return r
    r.outputs = [outs[i] for i in sorted(outs)]
    return _check(r, [finish[i] for i in sorted(outs)], usage)


async def send(session, base: str, path: str, body: dict, cut: int | None, timeout: float) -> Result:
    """One request; never raises: failures come back as Result.kind."""
    import aiohttp

    r = Result(path, body, "ok")
    t0 = time.perf_counter()
    try:
        async with session.post(base + path, json=body,
                                timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            if resp.status != 200:
                r.kind = "http_5xx" if resp.status >= 500 else f"http_{resp.status}"
                r.detail = (await resp.text())[:300]
            elif body.get("stream"):
                r = await _read_stream(resp, r, t0, cut)
            else:
                data = await resp.json()
                choices = data.get("choices") or []
                r.prompt_ids = data.get("prompt_token_ids") or (choices[0].get("prompt_token_ids")
                                                                if choices else None)
                r.outputs = [c.get("token_ids") or [] for c in choices]
                r.tokens = sum(map(len, r.outputs))
                r = _check(r, [c.get("finish_reason") for c in choices], data.get("usage"))
    except asyncio.TimeoutError:
        r.kind = "timeout"
    except aiohttp.ClientPayloadError as e:
        r.kind, r.detail = "broken_response", str(e)[:200]
    except aiohttp.ClientError as e:
        r.kind, r.detail = f"connection:{type(e).__name__}", str(e)[:200]
    except (ValueError, KeyError, TypeError) as e:  # JSON that is not an OpenAI answer
        r.kind, r.detail = "bad_json", f"{type(e).__name__}: {e}"[:200]
    r.e2e = time.perf_counter() - t0
    return r


async def _traffic(server: Server, s: Settings, rss: list) -> tuple[list[Result], float]:
    import aiohttp

    results: list[Result] = []
    budget = [s.max_requests]
    deadline = time.monotonic() + s.duration
    t0 = time.monotonic()

    async def client(i: int, session) -> None:
        rng = random.Random(s.seed * 100_003 + i)  # the same traffic on every server
        phase, j = i / s.clients, 0  # hang up on every 1/disconnect-th request, clients staggered:
        while time.monotonic() < deadline and budget[0] > 0:  # the fraction holds in short runs too
            budget[0] -= 1
            hang_up = int((j + 1) * s.disconnect + phase) > int(j * s.disconnect + phase)
            path, body, cut = make_request(rng, server.model, s, hang_up)
            j += 1
            results.append(await send(session, server.base, path, body, cut, s.request_timeout))

    async def sample_rss() -> None:
        while True:
            rss.append((round(time.monotonic() - t0, 1), server.rss()))
            await asyncio.sleep(5)

    sampler = asyncio.create_task(sample_rss())
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn) as session:
        await asyncio.gather(*(client(i, session) for i in range(s.clients)))
    elapsed = time.monotonic() - t0
    sampler.cancel()
    rss.append((round(elapsed, 1), server.rss()))
    return results, elapsed


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def load(server: Server, s: Settings) -> tuple[dict, list[Result]]:
    """Warm up, run the traffic, then check the server is healthy and holds nothing."""
    _http(server.base + "/v1/completions", {"model": server.model, "prompt": "warm up", "max_tokens": 8})
    before = _http(server.base + "/metrics")
    rss: list = []
    results, elapsed = asyncio.run(_traffic(server, s, rss))
    after = _http(server.base + "/metrics")
    c0, c1 = spec_counters(before), spec_counters(after)
    delta = {k: c1[k] - c0.get(k, 0.0) for k in c1 if k != "per_pos"}
    per_pos = [a - (c0["per_pos"][i] if i < len(c0["per_pos"]) else 0.0) for i, a in enumerate(c1["per_pos"])]
    drafts, accepted = delta.get("num_drafts", 0.0), delta.get("num_accepted_tokens", 0.0)
    errors: dict[str, int] = {}
    for r in results:
        if r.kind not in ("ok", "disconnected"):
            errors[r.kind] = errors.get(r.kind, 0) + 1
    m1 = next((b for t, b in rss[:-1] if t >= 60), None)  # the first sample after minute 1 of the load
    stream_ok = [r for r in results if r.kind == "ok" and r.ttft is not None]
    itl = [g for r in stream_ok for g in r.itl]
    summary = {
        "label": server.label, "clients": s.clients, "duration_s": round(elapsed, 1),
        "requests": len(results), "ok": sum(r.kind == "ok" for r in results),
        "disconnected": sum(r.kind == "disconnected" for r in results), "errors": errors,
        "error_examples": [f"{r.kind}: {r.detail}" for r in results if r.kind in errors][:5],
        "greedy_ok": sum(r.kind == "ok" and r.body["temperature"] == 0 for r in results),
        "req_per_s": len(results) / elapsed, "out_tok_per_s": sum(r.tokens for r in results) / elapsed,
        "ttft_p50": _pct([r.ttft for r in stream_ok], 0.5), "ttft_p99": _pct([r.ttft for r in stream_ok], 0.99),
        "itl_p50": _pct(itl, 0.5), "itl_p99": _pct(itl, 0.99),
        "preemptions": _metric(after, "vllm:num_preemptions_total") - _metric(before, "vllm:num_preemptions_total"),
        "tau": accepted / drafts + 1 if drafts else None,
        "spec": {"drafts": drafts, "draft_tokens": delta.get("num_draft_tokens", 0.0), "accepted": accepted,
                 "per_pos": per_pos},
        "counters_consistent": sum(per_pos) == accepted and all(a >= b for a, b in pairwise(per_pos)),
        "rss_mb": {"start": rss[0][1] / 2**20, "minute1": m1 / 2**20 if m1 else None, "end": rss[-1][1] / 2**20},
        "rss_growth_from_minute1": (rss[-1][1] - m1) / m1 if m1 else None,
    }
    summary.update(_after(server, s))
    return summary, results


def _after(server: Server, s: Settings) -> dict:
    """A final request must answer; then no request may be left in the engine, in the KV
    cache, or (probe) in the plugin's per-request state that vLLM's runner no longer holds."""
    out: dict = {}
    try:
        body = json.loads(_http(server.base + "/v1/completions", {
            "model": server.model, "prompt": "final", "max_tokens": 4, "temperature": 0}))
        out["healthy_after"] = body["usage"]["completion_tokens"] >= 1
    except (OSError, ValueError, KeyError) as e:
        out["healthy_after"], out["health_error"] = False, str(e)[:200]
        return out
    m = _http(server.base + "/metrics")
    out["left_in_engine"] = {"running": _metric(m, "vllm:num_requests_running"),
                             "waiting": _metric(m, "vllm:num_requests_waiting"),
                             "kv_cache_usage": _metric(m, "vllm:kv_cache_usage_perc")}
    if s.probe:
        st = json.loads(_http(server.base + "/collective_rpc", {"method": "hass_state"}))["results"][0]
        held = set(st["requests"])
        out["plugin_state"] = {
            "runner_requests": len(held),
            "store": None if st["store"] is None else len(st["store"]),
            "store_stale": None if st["store"] is None else len(set(st["store"]) - held),
            "store_bound": 2 * st["max_num_reqs"],  # its rows: replaced by every step's trees
            "params_ok": None if st["params_ok"] is None else len(st["params_ok"]),
            "params_ok_stale": None if st["params_ok"] is None else len(set(st["params_ok"]) - held),
            "params_ok_bound": 5 * st["max_num_reqs"],
            "prunes_params": st["prunes_params"],
        }
    return out


# -- T = 0 against no speculation -----------------------------------------------------


def replay(server: Server, results: list[Result], concurrency: int = 16) -> dict:
    """Send every completed greedy request again, whole and non-streaming, and compare
    prompt and output token ids with what `results` got."""
    import aiohttp

    greedy = [r for r in results if r.kind == "ok" and r.body["temperature"] == 0]

    async def run() -> list[Result]:
        sem = asyncio.Semaphore(concurrency)
        async with aiohttp.ClientSession() as session:
            async def one(r: Result) -> Result:
                body = {k: v for k, v in r.body.items() if k != "stream_options"}
                body.update(stream=False, model=server.model)
                async with sem:
                    return await send(session, server.base, r.path, body, None, 600)
            return await asyncio.gather(*(one(r) for r in greedy))

    refs = asyncio.run(run())
    mismatches, examples, errors = 0, [], 0
    for r, ref in zip(greedy, refs):
        if ref.kind != "ok":
            errors += 1
            continue
        if ref.prompt_ids != r.prompt_ids or ref.outputs != r.outputs:
            mismatches += 1
            a, b = (r.outputs or [[]])[0], (ref.outputs or [[]])[0]
            first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            if len(examples) < 5:
                examples.append({"path": r.path, "body": {k: v for k, v in r.body.items() if k != "model"},
                                 "first_diff": first, "got": a[max(0, first - 2):first + 4],
                                 "reference": b[max(0, first - 2):first + 4],
                                 "same_prompt": ref.prompt_ids == r.prompt_ids})
    return {"compared": len(greedy), "mismatches": mismatches, "replay_errors": errors, "examples": examples}


# -- the whole run -----------------------------------------------------------------------


def _label(spec: Path) -> str:
    cfg = json.loads(spec.read_text())
    t = cfg.get("tree")
    return f"tree {t['depth']},{t['top_k']},{t['total_tokens']}" if t else f"chain {cfg.get('num_speculative_tokens')}"


def run_all(s: Settings) -> dict:
    """Every spec, then no-spec (load unless disabled, then the T = 0 replay). Each server
    is stopped before the next starts, except with overlap_start (then the idle no-spec
    server shares the machine with the first run: its figures are then not clean)."""
    out = s.out or Path(tempfile.mkdtemp(prefix="vllm-hass-load-"))
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(s).items()},
                    "runs": [], "greedy_vs_nospec": {}}
    report["settings"]["specs"] = [str(p) for p in s.specs]
    all_results: dict[str, list[Result]] = {}
    ref = Server(s.target, None, s, out, "nospec") if s.overlap_start else None
    try:
        for i, spec in enumerate(s.specs):
            label = _label(spec)
            label += f" #{i + 1}" if label in all_results else ""
            print(f"[load] {label}: starting vllm serve", flush=True)
            srv = Server(s.target, spec, s, out, label)
            try:
                srv.wait_up(s.start_timeout)
                print(f"[load] {label}: {s.clients} clients for {s.duration:.0f} s", flush=True)
                summary, all_results[label] = load(srv, s)
                report["runs"].append(summary)
            finally:
                srv.stop()
        print("[load] nospec: starting vllm serve", flush=True)
        ref = ref or Server(s.target, None, s, out, "nospec")
        ref.wait_up(s.start_timeout)
        if s.nospec_load:
            print(f"[load] nospec: {s.clients} clients for {s.duration:.0f} s", flush=True)
            summary, all_results["nospec"] = load(ref, s)
            report["runs"].append(summary)
        for label, results in all_results.items():
            print(f"[load] {label}: replaying greedy requests on nospec", flush=True)
            report["greedy_vs_nospec"][label] = replay(ref, results)
    finally:
        if ref is not None:
            ref.stop()
    report["failures"] = failures(report, s)
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "results.md").write_text(markdown(report))
    report["out"] = str(out)
    return report


def failures(report: dict, s: Settings) -> list[str]:
    """Every check that failed, one line each (empty: all passed)."""
    bad = []
    for r in report["runs"]:
        name = r["label"]
        if r["errors"]:
            bad.append(f"{name}: errors {r['errors']}")
        if not r.get("healthy_after"):
            bad.append(f"{name}: no answer after the load ({r.get('health_error')})")
        if not r["counters_consistent"]:
            bad.append(f"{name}: spec-decode counters inconsistent {r['spec']}")
        left = r.get("left_in_engine", {})
        if any(left.values()):
            bad.append(f"{name}: left in the engine after the load: {left}")
        st = r.get("plugin_state")
        if st and st["store"] is not None and st["store"] > st["store_bound"]:
            bad.append(f"{name}: plugin draft store grew to {st['store']} entries")
        if st and st["prunes_params"] and (st["store_stale"] or st["params_ok_stale"]):
            bad.append(f"{name}: plugin holds finished requests: {st}")
        if st and st["params_ok"] is not None and st["params_ok"] > st["params_ok_bound"]:
            bad.append(f"{name}: plugin params cache grew to {st['params_ok']} entries")
        g = r["rss_growth_from_minute1"]
        if s.max_rss_growth is not None and g is not None and g > s.max_rss_growth:
            bad.append(f"{name}: RSS grew {100 * g:.1f}% from minute 1 to the end")
    for name, g in report["greedy_vs_nospec"].items():
        if name != "nospec" and (g["mismatches"] or g["replay_errors"]):
            bad.append(f"{name}: {g['mismatches']} of {g['compared']} greedy outputs differ from nospec "
                       f"({g['replay_errors']} replay errors)")
    return bad


def _f(x, fmt: str = "{:.2f}") -> str:
    return "" if x is None else fmt.format(x)


def markdown(report: dict) -> str:
    s = report["settings"]
    title = (f"`vllm-hass bench load`: {s['clients']} clients, {s['duration']:.0f} s, max_tokens ≤ "
             f"{s['max_tokens']}, {100 * s['disconnect']:.0f}% disconnects; target `{s['target']}`; "
             f"serve args `{' '.join(s['serve_args'])}`")
    header = ("| server | requests | ok | disconnected | errors | req/s | out tok/s | TTFT p50 / p99 s "
              "| ITL p50 / p99 ms | preemptions | τ | RSS MB start / 1 min / end | greedy = nospec |")
    lines = [title, "", header, "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in report["runs"]:
        g = report["greedy_vs_nospec"].get(r["label"])
        same = "" if g is None else f"{g['compared'] - g['mismatches']}/{g['compared']}"
        if r["label"] == "nospec" and g is not None:
            same += " (replay of itself)"
        rss = r["rss_mb"]
        lines.append(
            f"| {r['label']} | {r['requests']} | {r['ok']} | {r['disconnected']} | "
            f"{sum(r['errors'].values())} | {r['req_per_s']:.2f} | {r['out_tok_per_s']:.1f} | "
            f"{_f(r['ttft_p50'])} / {_f(r['ttft_p99'])} | {_f(r['itl_p50'] and 1e3 * r['itl_p50'], '{:.0f}')} / "
            f"{_f(r['itl_p99'] and 1e3 * r['itl_p99'], '{:.0f}')} | {r['preemptions']:.0f} | {_f(r['tau'])} | "
            f"{rss['start']:.0f} / {_f(rss['minute1'], '{:.0f}')} / {rss['end']:.0f} | {same} |")
    lines += ["", "checks: " + ("all passed" if not report["failures"] else "; ".join(report["failures"])), ""]
    return "\n".join(lines)


# -- CLI -------------------------------------------------------------------------------


def add_parser(sub) -> None:
    p = sub.add_parser("load", help="concurrent OpenAI-API clients against `vllm serve` (it starts "
                       "them): throughput, latency, errors, preemptions, RSS, T = 0 vs no-spec",
                       description=__doc__.splitlines()[0])
    p.add_argument("--target", required=True, help="target model directory")
    p.add_argument("--spec", action="append", required=True,
                   help="speculative config JSON; repeat for several (e.g. chain and tree)")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--duration", type=float, default=60.0, help="seconds of traffic per server")
    p.add_argument("--max-requests", type=int, default=100_000, help="requests per server at most")
    p.add_argument("--max-tokens", type=int, default=64, help="each request draws max_tokens in 1..this")
    p.add_argument("--disconnect", type=float, default=0.15, help="fraction of requests that hang up")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--serve-args", default="", help="extra `vllm serve` arguments, one string "
                   "(e.g. '--max-model-len 2048 --max-num-seqs 16')")
    p.add_argument("--no-nospec-load", action="store_true",
                   help="start the no-spec server only for the T = 0 replay (no reference figures)")
    p.add_argument("--request-timeout", type=float, default=600.0,
                   help="seconds one request may take (then it counts as an error: timeout)")
    p.add_argument("--no-probe", action="store_true", help="do not inspect the plugin's state afterwards")
    p.add_argument("--max-rss-growth", type=float, help="fail when RSS grows more than this fraction "
                   "from minute 1 to the end (e.g. 0.05)")
    p.add_argument("--out", help="directory for results.md, results.json and the server logs")


def run(args) -> int:
    import shlex

    for flag, v in (("--clients", args.clients), ("--duration", args.duration),
                    ("--max-requests", args.max_requests), ("--max-tokens", args.max_tokens),
                    ("--request-timeout", args.request_timeout)):
        if v <= 0:
            raise UserError(f"{flag} {v}: expected a positive number")
    if not 0 <= args.disconnect <= 1:
        raise UserError(f"--disconnect {args.disconnect}: expected a fraction in [0, 1]")
    target = Path(args.target)
    if not (target / "config.json").is_file():
        raise UserError(f"--target {args.target}: expected a model directory with config.json")
    for spec in args.spec:
        if not Path(spec).is_file():
            raise UserError(f"--spec {spec}: no such file")
    s = Settings(target=target, specs=[Path(p) for p in args.spec], clients=args.clients,
                 duration=args.duration, max_requests=args.max_requests, max_tokens=args.max_tokens,
                 disconnect=args.disconnect, seed=args.seed, serve_args=shlex.split(args.serve_args),
                 out=Path(args.out) if args.out else None, nospec_load=not args.no_nospec_load,
                 probe=not args.no_probe, max_rss_growth=args.max_rss_growth,
                 request_timeout=args.request_timeout)
    report = run_all(s)
    print(markdown(report))
    print(f"results: {report['out']}/results.md, results.json")
    return 1 if report["failures"] else 0
