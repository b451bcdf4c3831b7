"""The Triton kernels inside a real engine, before any GPU sees them: on CPU, with
VLLM_HASS_TREE_KERNEL=triton, the tree rows of the target's and the draft's attention
and the KV compaction run the Triton kernels themselves (under TRITON_INTERPRET=1,
set by the repository's conftest) on vLLM's paged CPU cache, through strided views of
its layout. Forced drafts make most steps accept paths that must be compacted."""

import pytest
from vllm import SamplingParams

from drafthooks import ForcedDrafts
from helpers import free_llm, make_llm, prompts, spec_metrics, token_ids

pytestmark = pytest.mark.engine

TREE = {"depth": 4, "top_k": 3, "total_tokens": 10}


def test_tree_serving_with_the_triton_kernels(sharp_target, attentive_head, monkeypatch):
    import os

    from vllm_hass import attention
    from vllm_hass.kernels import kv_compact as kv_mod

    assert os.environ.get("TRITON_INTERPRET") == "1"
    ps = prompts(4, length=(3, 40), seed=11)
    base_llm = make_llm(sharp_target)
    full = token_ids(base_llm.generate(ps, SamplingParams(temperature=0, max_tokens=40,
                                                          ignore_eos=True), use_tqdm=False))
    free_llm(base_llm)

    calls = {"tree_attention": 0, "kv_compact": 0}

    def counted(name, fn):
        def wrapper(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return wrapper

    monkeypatch.setenv(attention.TREE_KERNEL_ENV, "triton")
    monkeypatch.setattr(attention, "tree_attention", counted("tree_attention", attention.tree_attention))
    monkeypatch.setattr(kv_mod, "kv_compact", counted("kv_compact", kv_mod.kv_compact))
    hook = ForcedDrafts({tuple(p["prompt_token_ids"]): p["prompt_token_ids"] + f
                         for p, f in zip(ps, full)}, [0.9, 0.8, 0.7, 0.6], width=2, vocab=475)
    hook.install(monkeypatch)
    llm = make_llm(sharp_target, {"method": "hass", "model": str(attentive_head), "tree": TREE})
    got = token_ids(llm.generate(ps, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
                                 use_tqdm=False))
    m = spec_metrics(llm)
    free_llm(llm)
    assert got == [f[:24] for f in full]
    assert m["num_accepted_tokens_per_pos"][:4] == hook.per_depth()
    assert calls["tree_attention"] > 0 and calls["kv_compact"] > 0, calls
