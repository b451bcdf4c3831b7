"""A whole `vllm-hass bench` run on CPU over the tiny fixtures (about a minute).

Bigram target + a noisy identity head: acceptance sits strictly between 0 and 1,
and the head ignores position and context, so stock vLLM, the plugin (chain and
tree) and the oracle must agree on tau (they draft and verify the same tokens).
"""

from __future__ import annotations

import json
import math

import pytest

from vllm_hass.cli import main

pytestmark = pytest.mark.engine

MAX_TOKENS, NUM_PROMPTS, BATCH_SIZES = 24, 3, [1, 4]
K, TREE = 3, {"depth": 3, "top_k": 3, "total_tokens": 8}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from vllm_hass.bench.tiny import write_tiny

    root = tmp_path_factory.mktemp("bench")
    target, head, spec = write_tiny(root / "models", bigram=True, head="identity", scale=20, noise=0.2,
                                    tree=TREE)
    data = root / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in
                            ["The quick brown fox", "def add(a, b):", "Once upon a time", "for i in range"]))
    out = root / "out"
    rc = main(["bench", "--target", str(target), "--spec", str(spec), "--dataset", str(data),
               "--batch-sizes", ",".join(map(str, BATCH_SIZES)), "--temperature", "0,1", "--out", str(out),
               "--num-prompts", str(NUM_PROMPTS), "--max-tokens", str(MAX_TOKENS), "--chain-k", str(K)])
    assert rc == 0
    return out, json.loads((out / "results.json").read_text())


def rows(res, config, **where):
    return [r for r in res["runs"] if r["config"] == config and all(r[k] == v for k, v in where.items())]


def test_outputs_written(results):
    out, res = results
    for name in ("results.md", "results.json", "tau.png", "acceptance.png", "throughput.png"):
        assert (out / name).stat().st_size > 0
    assert (out / "stock-head" / "config.json").exists()
    md = (out / "results.md").read_text()
    for c in ("nospec", "eagle", "hass-chain", "hass-tree", f"oracle-chain-k{K}", "oracle-tree-3-3-8"):
        assert f"| {c} |" in md


def test_numbers_are_consistent(results):
    _, res = results
    ran = {c["name"] for c in res["configs"] if c["status"] == "ok"}
    assert {"nospec", "eagle", "hass-chain", "hass-tree"} <= ran
    for r in res["runs"]:
        bs = r["batch_size"]
        assert r["num_requests"] == math.ceil(NUM_PROMPTS / bs) * bs
        assert r["output_tokens"] == r["num_requests"] * MAX_TOKENS  # ignore_eos
        assert r["tokens_per_s"] == pytest.approx(r["output_tokens"] / r["elapsed_s"])
        assert r["requests_per_s"] == pytest.approx(r["num_requests"] / r["elapsed_s"])
        base = rows(res, "nospec", batch_size=bs, temperature=r["temperature"])[0]
        assert r["speedup"] == pytest.approx(r["tokens_per_s"] / base["tokens_per_s"])
        if r["config"] == "nospec":
            assert r["tau"] is None and r["drafts"] == 0
            continue
        if r["config"] == "hass-auto":  # shapes vary per step: only the counters' own identities
            if r["drafts"]:
                assert r["tau"] == pytest.approx(r["accepted"] / r["drafts"] + 1)
                assert sum(r["acceptance_per_pos"]) == pytest.approx(r["tau"] - 1)
            continue
        levels = TREE["depth"] if r["config"] == "hass-tree" else K
        assert r["drafts"] > 0
        if r["config"] != "hass-tree":
            assert r["draft_tokens"] == K * r["drafts"]
        assert r["tau"] == pytest.approx(r["accepted"] / r["drafts"] + 1)
        acc = r["acceptance_per_pos"]
        assert len(acc) == levels and all(a >= b for a, b in zip(acc, acc[1:]))
        assert sum(acc) == pytest.approx(r["tau"] - 1)
        assert "counters disagree" not in r["notes"]
        if r["temperature"] == 0:
            assert 1 < r["tau"] < levels + 1  # the noisy head is right sometimes, not always
            assert r["match_nospec"] == 1.0  # greedy speculation is lossless


def test_stock_eagle_and_hass_chain_match_the_oracle(results):
    _, res = results
    oracle = next(o for o in res["oracle"] if o["config"] == f"oracle-chain-k{K}")
    assert oracle["match_nospec"] == 1.0
    for config in ("eagle", "hass-chain"):
        r = rows(res, config, batch_size=1, temperature=0.0)[0]
        assert r["oracle_tau"] == oracle["tau"]
        assert abs(r["tau"] - oracle["tau"]) <= 0.02 * oracle["tau"], (config, r["tau"], oracle["tau"])
        assert r["acceptance_per_pos"] == pytest.approx(oracle["per_depth"], abs=0.03)


def test_hass_tree_matches_the_oracle(results):
    _, res = results
    oracle = next(o for o in res["oracle"] if o["config"] == "oracle-tree-3-3-8")
    r = rows(res, "hass-tree", batch_size=1, temperature=0.0)[0]
    assert "counters disagree" not in r["notes"]
    assert abs(r["tau"] - oracle["tau"]) <= 0.02 * oracle["tau"], (r["tau"], oracle["tau"])
    assert r["match_nospec"] == 1.0


def test_rounds_alternate_and_take_the_median(results):
    """The default two rounds: each configuration ran twice (jobs r1, r2 side by side), and a
    run's time is the median of its rounds."""
    out, res = results
    assert res["meta"]["rounds"] == 2
    for c in ("nospec", "hass-chain", "hass-tree"):
        assert (out / "jobs" / f"{c}.result.json").exists() and (out / "jobs" / f"{c}.r2.result.json").exists()
    for r in res["runs"]:
        times = r["elapsed_rounds"]
        assert len(times) == 2 and r["elapsed_s"] == sum(times) / 2


def test_auto_reports_the_shapes_it_chose(results):
    """hass-auto is a configuration like the others, lossless at T = 0, and its row names the
    shapes the chooser used (from the runner's VLLM_HASS_AUTO_STATS file)."""
    out, res = results
    auto = [r for r in res["runs"] if r["config"] == "hass-auto"]
    assert auto and all("auto shapes: " in r["notes"] for r in auto)
    assert all(r["match_nospec"] == 1.0 for r in auto if r["temperature"] == 0)
    assert (out / "jobs" / "hass-auto.r1.auto.json").exists()
