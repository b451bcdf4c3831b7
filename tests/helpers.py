"""Helpers shared by the tests (plain functions; fixtures live in conftest.py)."""

import gc
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import torch

from vllm_hass import fixtures
from vllm_hass.converters.convert import write_plugin_checkpoint

# Identity-head scale that makes the draft confident (top-1 prob > 0.4) on the
# tiny target, so EAGLE-2's rerank keeps the whole top-1 path (see fixtures.py).
CONFIDENT = 2e4


def write_head(dir_, target, state_fn, **flags):
    cfg = fixtures.target_config(target)
    hc = fixtures.head_config_for(cfg, **flags)
    write_plugin_checkpoint(dir_, hc, state_fn(hc), target=cfg, dtype="float32", force=True)
    return dir_


def make_llm(target, spec=None, **kw):
    from vllm import LLM

    args = dict(enforce_eager=True, dtype="float32", max_model_len=1024, seed=0,
                disable_log_stats=False, max_num_seqs=16)
    args.update(kw)
    return LLM(str(target), speculative_config=spec, **args)


def free_llm(llm):
    """Shut the engine down. In-process engines share vLLM's global distributed
    state, so only one may be alive at a time."""
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def spec_metrics(llm) -> dict:
    """vLLM's spec-decode counters from LLM.get_metrics()."""
    out = {}
    for m in llm.get_metrics():
        if m.name.startswith("vllm:spec_decode"):
            key = m.name.removeprefix("vllm:spec_decode_")
            out[key] = list(m.values) if hasattr(m, "values") else m.value
    return out


def prompts(n, vocab=400, length=(3, 12), seed=0):
    import random

    rng = random.Random(seed)
    return [
        {"prompt_token_ids": [rng.randrange(2, vocab) for _ in range(rng.randint(*length))]}
        for _ in range(n)
    ]


def token_ids(outputs):
    return [list(o.outputs[0].token_ids) for o in outputs]


# --- `vllm serve` in a subprocess ----------------------------------------------------

VLLM = shutil.which("vllm", path=str(Path(sys.executable).parent)) or "vllm"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_env(**extra):
    env = dict(os.environ)
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the real server: engine in its own process
    env.update(extra)
    return env


def get(url, data=None, timeout=60):
    req = urllib.request.Request(url, data=json.dumps(data).encode() if data else None,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.read().decode()


def metric(text: str, name: str, label: str = "") -> float:
    """Sum of a Prometheus counter over its series (optionally those carrying `label`)."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith((name + "{", name + " ")) and label in line)


def start_server(argv: list[str], log_path: Path, env=None, timeout: float = 300):
    """Start a server whose argv ends without --host/--port; wait for /health.
    Returns (process, base url, log file)."""
    port = free_port()
    log = open(log_path, "w")
    proc = subprocess.Popen(argv + ["--host", "127.0.0.1", "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, env=env or serve_env())
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while True:
        if proc.poll() is not None:
            log.close()
            raise AssertionError(log_path.read_text()[-3000:])
        try:
            get(base + "/health", timeout=2)
            return proc, base, log
        except OSError:
            if time.time() > deadline:
                stop_server(proc, log)
                raise AssertionError("server did not come up: " + log_path.read_text()[-2000:])
            time.sleep(1)


def stop_server(proc, log) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def check_identity_completion(base, target, mode, drafts_per_step):
    """32 greedy tokens from the identity head on the bigram target: every draft is right."""
    body = json.loads(get(base + "/v1/completions", {
        "model": str(target), "prompt": "The quick brown fox", "max_tokens": 32,
        "temperature": 0, "ignore_eos": True}))
    assert body["usage"]["completion_tokens"] == 32
    text = get(base + "/metrics")
    drafts = metric(text, "vllm:spec_decode_num_drafts_total")
    drafted = metric(text, "vllm:spec_decode_num_draft_tokens_total")
    accepted = metric(text, "vllm:spec_decode_num_accepted_tokens_total")
    assert drafts > 0 and drafted == drafts_per_step * drafts
    if mode == "chain":
        assert accepted == drafted
    else:  # every step accepts the full depth-4 path: tau = 5 (32 tokens = 1 + 6*5 + 1)
        per_depth = [metric(text, "vllm:spec_decode_num_accepted_tokens_per_pos_total",
                            f'position="{d}"') for d in range(6)]
        assert per_depth[:4] == [drafts] * 4 and per_depth[4:] == [0, 0]
        assert accepted == 4 * drafts


# --- exact target distributions (T > 0 tests) ----------------------------------------------


def chi_square_ok(counts: torch.Tensor, exact: torch.Tensor, z: float = 3.09) -> tuple[float, float]:
    """Pearson chi-square of observed counts vs exact probabilities; cells expecting < 5
    draws are pooled. Returns (statistic, critical value at p = 0.001, Wilson-Hilferty)."""
    n = counts.sum()
    exp = (exact * n).flatten()
    obs = counts.flatten()
    small = exp < 5
    exp = torch.cat([exp[~small], exp[small].sum().unsqueeze(0)])
    obs = torch.cat([obs[~small], obs[small].sum().unsqueeze(0)])
    stat = ((obs - exp) ** 2 / exp.clamp(min=1e-12)).sum().item()
    dof = exp.numel() - 1
    crit = dof * (1 - 2 / (9 * dof) + z * (2 / (9 * dof)) ** 0.5) ** 3
    return stat, crit


def exact_joint(target, prompt: list[int], k: int):
    """The target's exact joint law of its next k tokens after `prompt` at T = 1 (float64,
    transformers), as a [V]*k tensor. Small vocabularies only (V**k sequences)."""
    import itertools

    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(target), dtype=torch.float64)
    V = model.config.vocab_size
    joint = torch.ones([V] * 0, dtype=torch.float64)
    with torch.no_grad():
        for i in range(k):
            prefixes = list(itertools.product(range(V), repeat=i))
            seqs = torch.tensor([prompt + list(p) for p in prefixes])
            step = model(seqs).logits[:, -1].softmax(-1).view([V] * i + [V])
            joint = joint.unsqueeze(-1) * step
    return joint
