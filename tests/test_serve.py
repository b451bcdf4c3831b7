"""The README's contract: `vllm serve TARGET --speculative-config hass.json` works
literally (a file path), serves completions, and shows spec-decode counters on /metrics."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.engine

VLLM = shutil.which("vllm", path=str(Path(sys.executable).parent)) or "vllm"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_env():
    env = dict(os.environ)
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the real server: engine in its own process
    return env


def get(url, data=None, timeout=60):
    req = urllib.request.Request(url, data=json.dumps(data).encode() if data else None,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.read().decode()


def metric(text: str, name: str, label: str = "") -> float:
    """Sum of a Prometheus counter over its series (optionally those carrying `label`)."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") and label in line)


@pytest.mark.parametrize("mode", ["chain", "tree"])
def test_vllm_serve_with_hass_json_file(bigram_target, identity_head, tmp_path, mode):
    spec_file = identity_head / "hass.json"  # as `vllm-hass convert` wrote it: a chain of 3
    if mode == "tree":
        spec_file = tmp_path / "hass.json"
        spec_file.write_text(json.dumps({"method": "hass", "model": str(identity_head),
                                         "tree": {"depth": 4, "top_k": 3, "total_tokens": 12}}))
    port = free_port()
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen(
        [VLLM, "serve", str(bigram_target), "--speculative-config",
         str(spec_file), "--enforce-eager", "--dtype", "float32",
         "--max-model-len", "512", "--host", "127.0.0.1", "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, env=serve_env())
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                get(base + "/health", timeout=2)
                break
            except OSError:
                assert time.time() < deadline, "server did not come up"
                time.sleep(1)
        body = json.loads(get(base + "/v1/completions", {
            "model": str(bigram_target), "prompt": "The quick brown fox", "max_tokens": 32,
            "temperature": 0, "ignore_eos": True}))
        assert body["usage"]["completion_tokens"] == 32
        text = get(base + "/metrics")
        drafts = metric(text, "vllm:spec_decode_num_drafts_total")
        drafted = metric(text, "vllm:spec_decode_num_draft_tokens_total")
        accepted = metric(text, "vllm:spec_decode_num_accepted_tokens_total")
        if mode == "chain":
            assert drafts > 0 and drafted == 3 * drafts
            assert accepted == drafted  # the identity head on the bigram target
        else:  # every step accepts the full depth-4 path: tau = 5 (32 tokens = 1 + 6*5 + 1)
            per_depth = [metric(text, "vllm:spec_decode_num_accepted_tokens_per_pos_total",
                                f'position="{d}"') for d in range(6)]
            assert drafts > 0 and drafted == 11 * drafts
            assert per_depth[:4] == [drafts] * 4 and per_depth[4:] == [0, 0]
            assert accepted == 4 * drafts
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_vllm_serve_rejects_bad_hass_json(bigram_target, identity_head, tmp_path):
    bad = tmp_path / "hass.json"
    bad.write_text(json.dumps({"method": "hass", "model": str(identity_head),
                               "num_speculative_tokens": 3, "topk": 4}))
    r = subprocess.run([VLLM, "serve", str(bigram_target), "--speculative-config", str(bad)],
                       capture_output=True, text=True, timeout=300, env=serve_env())
    assert r.returncode == 2
    errors = [line for line in r.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and f"{bad}: unknown key 'topk'" in errors[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr
