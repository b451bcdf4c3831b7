"""Chain drafting through vLLM with method "hass": lossless, and the head is loaded right."""

import pytest
from vllm import SamplingParams

from helpers import free_llm, make_llm, prompts, spec_metrics, token_ids

pytestmark = pytest.mark.engine

GREEDY = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)


@pytest.fixture(scope="module")
def random_baseline(random_target):
    llm = make_llm(random_target)
    out = token_ids(llm.generate(prompts(12), GREEDY))
    free_llm(llm)
    return out


def test_greedy_output_identical_to_no_speculation(random_target, random_head, random_baseline):
    llm = make_llm(random_target, {"method": "hass", "model": str(random_head),
                                   "num_speculative_tokens": 3})
    got = token_ids(llm.generate(prompts(12), GREEDY))
    m = spec_metrics(llm)
    free_llm(llm)
    assert got == random_baseline
    assert m["num_drafts"] > 0 and m["num_draft_tokens"] == 3 * m["num_drafts"]


def test_identity_head_accepts_everything(bigram_target, identity_head):
    base = make_llm(bigram_target)  # one engine at a time: they share process-wide state
    want = token_ids(base.generate(prompts(8), GREEDY))
    free_llm(base)
    llm = make_llm(bigram_target, str(identity_head / "hass.json"))  # a path, as a user would
    got = token_ids(llm.generate(prompts(8), GREEDY))
    m = spec_metrics(llm)
    free_llm(llm)
    assert got == want
    assert m["num_drafts"] > 0
    assert m["num_accepted_tokens"] == m["num_draft_tokens"]
    assert m["num_accepted_tokens_per_pos"] == [m["num_drafts"]] * 3


def test_fc_bias_is_applied(bigram_target, biased_head):
    # Same identity head plus a large fc.bias: if the bias were dropped (stock vLLM),
    # acceptance would be 100% as above.
    llm = make_llm(bigram_target, {"method": "hass", "model": str(biased_head),
                                   "num_speculative_tokens": 3})
    llm.generate(prompts(8), GREEDY)
    m = spec_metrics(llm)
    free_llm(llm)
    assert m["num_draft_tokens"] > 0
    assert m["num_accepted_tokens"] < 0.1 * m["num_draft_tokens"]
