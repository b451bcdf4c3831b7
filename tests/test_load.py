"""Issue 16 item 2: the load harness as a CI test (tiny fixtures, a few minutes of CPU).

32 clients for 25 s against `vllm serve` with a tree (the attentive head on the sharp
target: drafts are partly right, so verification accepts partial paths and moves KV),
with a KV cache of 16 blocks of 32 tokens for 16 sequences, so requests are preempted
and resumed, and 15% of requests hang up mid-stream. The no-spec server starts beside
the tree server (one start-up less) and only answers the T = 0 replay.
"""

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_hass.bench.load import Settings, make_request, run_all

TREE = {"depth": 4, "top_k": 3, "total_tokens": 12}
SERVE = "--max-model-len 256 --block-size 32 --num-gpu-blocks-override 16 --max-num-seqs 16"


def test_traffic_mix():
    """Valid bodies only (n > 1 needs T > 0; hang-ups stream) and every option present."""
    s = Settings(target=Path("."), specs=[])
    rng = random.Random(0)
    reqs = [make_request(rng, "m", s, hang_up=i % 7 == 0) for i in range(400)]
    for path, body, cut in reqs:
        assert body.get("n", 1) == 1 or body["temperature"] > 0
        assert cut is None or (body["stream"] and cut >= 1)
        assert 1 <= body["max_tokens"] <= s.max_tokens and body["return_token_ids"]
    bodies = [b for _, b, _ in reqs]
    for key in ("stop", "seed", "n", "logprobs", "ignore_eos", "messages", "prompt"):
        assert any(key in b for b in bodies), key
    assert {b["stream"] for b in bodies} == {True, False}
    assert {b["temperature"] == 0 for b in bodies} == {True, False}


def test_cli_refuses_bad_settings(tmp_path):
    r = subprocess.run([sys.executable, "-m", "vllm_hass.cli", "bench", "load", "--target", str(tmp_path),
                        "--spec", "x.json"], capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 2 and "expected a model directory" in r.stderr and "Traceback" not in r.stderr


@pytest.fixture(scope="module")
def report(sharp_target, attentive_head, tmp_path_factory):
    d = tmp_path_factory.mktemp("load")
    spec = d / "hass.json"
    spec.write_text(json.dumps({"method": "hass", "model": str(attentive_head), "tree": TREE}))
    s = Settings(target=sharp_target, specs=[spec], clients=32, duration=25, max_tokens=48,
                 disconnect=0.15, serve_args=SERVE.split(), out=d / "out", nospec_load=False,
                 overlap_start=True, start_timeout=600, request_timeout=300)
    return run_all(s)


@pytest.mark.engine
@pytest.mark.slow
def test_load_tree_lossless_under_preemption_and_disconnects(report):
    run = report["runs"][0]
    print((report["out"] + "/results.md"), json.dumps(run, indent=1))
    assert run["errors"] == {}, run["error_examples"]
    assert run["requests"] >= 48 and run["disconnected"] >= 0.1 * run["requests"]
    assert run["preemptions"] > 0
    assert run["spec"]["drafts"] > 0 and 0 < run["spec"]["accepted"] < run["spec"]["draft_tokens"]
    assert run["counters_consistent"], run["spec"]  # sum of accepted per position = accepted
    g = report["greedy_vs_nospec"][run["label"]]
    assert g["compared"] >= 20 and g["replay_errors"] == 0
    assert g["mismatches"] == 0, g["examples"]
    assert run["healthy_after"]
    assert run["left_in_engine"] == {"running": 0, "waiting": 0, "kv_cache_usage": 0}
    st = run["plugin_state"]
    # bounded today (the store keeps the last step's trees, the cache clears at 4 x max_num_seqs)
    assert st["store"] <= st["store_bound"] and st["params_ok"] <= st["params_ok_bound"], st
    assert report["failures"] == []


@pytest.mark.engine
@pytest.mark.slow
def test_plugin_params_cache_empty_after_load(report):
    """Once vLLM's runner drops a request (finished or aborted), the plugin holds nothing
    of it: needs HassRunnerMixin._on_request_state_removed to prune the tree-eligibility
    cache and the draft store's index."""
    st = report["runs"][0]["plugin_state"]
    assert st["prunes_params"], st
    assert st["params_ok_stale"] == 0 and st["store_stale"] == 0, st
