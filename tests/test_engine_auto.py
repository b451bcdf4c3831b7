""""tree": "auto" inside vLLM, unforced: the chooser's own decisions, its log line and its
stats file (tests/test_engine_tree.py runs the losslessness tests with forced shape
schedules; tests/test_auto_tree.py the model and the chooser without an engine)."""

import json
import logging

import pytest
from vllm import SamplingParams

from helpers import free_llm, make_llm, prompts, spec_metrics, token_ids

pytestmark = pytest.mark.engine

GREEDY = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)


def auto_spec(head, tree="auto"):
    return {"method": "hass", "model": str(head), "tree": tree}


def run(target, spec, ps, stats=None, **kw):
    """Greedy outputs, spec metrics and (with `stats`) the stats file, read while the
    engine is alive, once its idle flush (~0.5 s after the last step) has written it."""
    import time

    llm = make_llm(target, spec, **kw)
    out = token_ids(llm.generate(ps, GREEDY, use_tqdm=False))
    m = spec_metrics(llm) if spec else None
    if stats is not None:
        time.sleep(1.5)
        stats = json.loads(stats.read_text())
        stats["metrics"] = auto_metrics(llm)
    free_llm(llm)
    return out, m, stats


def auto_metrics(llm) -> dict:
    """The vllm:hass_auto_* counters from prometheus' default registry (what /metrics
    serves): {"shape_steps": {shape: n}, "head_off_steps": n, "explore_steps": n}."""
    from vllm.v1.metrics.reader import Counter

    out = {"shape_steps": {}}
    for c in llm.get_metrics():
        if isinstance(c, Counter) and c.name == "vllm:hass_auto_tree_steps":
            out["shape_steps"][c.labels["shape"]] = c.value
        elif isinstance(c, Counter) and c.name.startswith("vllm:hass_auto_"):
            out[c.name[len("vllm:hass_auto_"):]] = c.value
    return out


def test_auto_drafts_chains_for_a_perfect_head(bigram_target, identity_head, tmp_path,
                                               monkeypatch, caplog):
    """The identity head is always right: once one explored tree has shown it, the chooser
    drafts in nearly every step, chains (a tree accepts no more and costs more), logs each
    change and the stats file shows it. How deep depends on this machine's measured
    costs. Output identical to no speculation."""
    stats = tmp_path / "stats.json"
    monkeypatch.setenv("VLLM_HASS_AUTO_STATS", str(stats))
    caplog.set_level(logging.INFO, logger="vllm_hass")
    ps = prompts(8)
    want, _, _ = run(bigram_target, None, ps)
    got, m, data = run(bigram_target, auto_spec(identity_head), ps, stats)
    assert got == want
    assert m["num_accepted_tokens"] > 0.8 * m["num_drafts"] > 0  # tau > 1.8
    assert data["bound"] == "6/10/60" and data["explore_steps"] >= 1
    assert data["acceptance"]["chain"] == [1.0] * 6
    steps = data["shape_steps"]
    assert sum(steps.values()) == data["steps"]
    assert data["metrics"] == {"shape_steps": steps, "head_off_steps": data["head_off_steps"],
                               "explore_steps": data["explore_steps"]}  # also on /metrics
    assert steps.get("none", 0) < 0.3 * data["steps"], steps
    assert all(k == "none" or k.split("/")[1] == "1" for k in steps), steps
    lines = [r.getMessage() for r in caplog.records if "auto tree ->" in r.getMessage()]
    assert lines[0] == "vllm-hass: auto tree -> no drafts (batch 8)", lines  # nothing measured yet
    assert "top_k=1 total_tokens=" in lines[-1] and lines[-1].endswith(")"), lines


def test_auto_stops_the_head_when_drafts_never_pay(random_target, random_head, tmp_path,
                                                   monkeypatch, caplog):
    """A random head on a random target: its drafts are never accepted, so after exploring
    the chooser drafts nothing and then stops the head (no first pass either); output
    identical to no speculation."""
    stats = tmp_path / "stats.json"
    monkeypatch.setenv("VLLM_HASS_AUTO_STATS", str(stats))
    caplog.set_level(logging.INFO, logger="vllm_hass")
    ps = prompts(4, seed=3)
    want, _, _ = run(random_target, None, ps)
    got, m, data = run(random_target, auto_spec(random_head), ps, stats)
    assert got == want
    assert data["current"] == "none" and not data["head_on"], data
    assert data["head_off_steps"] > 0 and data["shape_steps"]["none"] > 0.8 * data["steps"]
    assert data["metrics"]["head_off_steps"] == data["head_off_steps"]
    assert any("no drafts, head off" in r.getMessage() for r in caplog.records)
    assert m["num_drafts"] < 0.2 * data["steps"] * len(ps)


def test_auto_bounds_size_vllm_and_the_drafts(bigram_target, identity_head):
    """With bounds, vLLM's speculative-token count comes from them and no step drafts
    beyond them (the bound 3/2/6 has the deepest chain 3)."""
    llm = make_llm(bigram_target, auto_spec(identity_head, {"auto": True, "max_depth": 3,
                                                           "max_top_k": 2, "max_total_tokens": 6}))
    assert llm.llm_engine.vllm_config.speculative_config.num_speculative_tokens == 5
    out = token_ids(llm.generate(prompts(4), GREEDY, use_tqdm=False))
    m = spec_metrics(llm)
    free_llm(llm)
    assert all(len(o) == 64 for o in out)
    per = m["num_accepted_tokens_per_pos"]
    assert per[0] > 0 and sum(per[3:]) == 0  # never deeper than 3


def test_steps_without_drafts_run_as_without_speculation(bigram_target, identity_head, monkeypatch):
    """vLLM 0.32/0.33 build spec-decode metadata every step once speculation is configured.
    A step in which no request has drafts (prefills; here every step: the head forced off)
    must not run the plugin's tree layout or tree sampler (vLLM's own sampler serves it,
    as without speculation); with drafts they run. Outputs identical to no speculation."""
    from collections import Counter

    import vllm_hass.sampler as sampler_mod
    import vllm_hass.step as step_mod

    calls = Counter()
    for mod, name in ((step_mod, "verify_layout"), (sampler_mod, "tree_sample")):
        def counted(*a, _f=getattr(mod, name), _n=name, **kw):
            calls[_n] += 1
            return _f(*a, **kw)
        monkeypatch.setattr(mod, name, counted)
    ps = prompts(4)
    want, _, _ = run(bigram_target, None, ps)
    monkeypatch.setenv("VLLM_HASS_AUTO_SCHEDULE", "off")
    got, m, _ = run(bigram_target, auto_spec(identity_head), ps)
    assert got == want and m["num_drafts"] == 0
    assert calls == Counter(), calls
    monkeypatch.setenv("VLLM_HASS_AUTO_SCHEDULE", "3/1/4,off")  # drafts every other step
    got, m, _ = run(bigram_target, auto_spec(identity_head), ps)
    assert got == want and m["num_drafts"] > 0
    # one layout and one tree sampling per step that verified drafts, no more
    assert 0 < calls["verify_layout"] == calls["tree_sample"] <= m["num_drafts"], (calls, m)
