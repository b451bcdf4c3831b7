"""Helpers shared by the tests (plain functions; fixtures live in conftest.py)."""

import gc

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
