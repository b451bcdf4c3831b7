"""The README's contract: `vllm serve TARGET --speculative-config hass.json` works
literally (a file path), serves completions, and shows spec-decode counters on /metrics."""

import json
import subprocess

import pytest

from helpers import VLLM, check_identity_completion, serve_env, start_server, stop_server

pytestmark = pytest.mark.engine


@pytest.mark.parametrize("mode", ["chain", "tree"])
def test_vllm_serve_with_hass_json_file(bigram_target, identity_head, tmp_path, mode):
    spec_file = identity_head / "hass.json"  # as `vllm-hass convert` wrote it: a chain of 3
    if mode == "tree":
        spec_file = tmp_path / "hass.json"
        spec_file.write_text(json.dumps({"method": "hass", "model": str(identity_head),
                                         "tree": {"depth": 4, "top_k": 3, "total_tokens": 12}}))
    proc, base, log = start_server(
        [VLLM, "serve", str(bigram_target), "--speculative-config", str(spec_file),
         "--enforce-eager", "--dtype", "float32", "--max-model-len", "512"],
        tmp_path / "serve.log")
    try:
        check_identity_completion(base, bigram_target, mode, drafts_per_step=3 if mode == "chain" else 11)
    finally:
        stop_server(proc, log)


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
