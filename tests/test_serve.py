"""The README's contract: `vllm serve TARGET --speculative-config hass.json` works
literally (a file path), serves completions, and shows spec-decode counters on /metrics."""

import json
import subprocess
import time

import pytest

from helpers import (VLLM, check_identity_completion, get, metric, serve_env, start_server,
                     stop_server)

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


def test_vllm_serve_auto_counts_its_shapes_on_metrics(bigram_target, identity_head, tmp_path):
    """"tree": "auto" under `vllm serve`: the steps per chosen shape are counters on the
    API server's /metrics (the worker's chooser writes them, auto_metrics reads them). The
    shapes are forced here (chain 3 every step, the test-only schedule) so that the counts
    are exact: every drafted step is verified in the next one (the last one's drafts may
    be left when the request ends)."""
    spec_file = tmp_path / "hass.json"
    spec_file.write_text(json.dumps({"method": "hass", "model": str(identity_head), "tree": "auto"}))
    proc, base, log = start_server(
        [VLLM, "serve", str(bigram_target), "--speculative-config", str(spec_file),
         "--enforce-eager", "--dtype", "float32", "--max-model-len", "512"],
        tmp_path / "serve.log", env=serve_env(VLLM_HASS_AUTO_SCHEDULE="3/1/4"))
    try:
        check_identity_completion(base, bigram_target, "chain", drafts_per_step=3)
        time.sleep(1.5)  # the stats file's idle flush (~0.5 s after the last step)
        text = get(base + "/metrics")
    finally:
        stop_server(proc, log)
    drafts = metric(text, "vllm:spec_decode_num_drafts_total")
    chain = metric(text, "vllm:hass_auto_tree_steps_total", 'shape="3/1/4"')
    assert drafts <= chain <= drafts + 1 and drafts > 0, text
    assert metric(text, "vllm:hass_auto_tree_steps_total") == chain  # no other shape
    assert metric(text, "vllm:hass_auto_head_off_steps_total") == 0
    assert "# TYPE vllm:hass_auto_tree_steps_total counter" in text


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
