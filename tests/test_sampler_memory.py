"""The tree sampler's working set at T > 0 is bounded: one [rows, V] float32 buffer
(rows = live tree slots of the batch), plus temporaries of ROW_CHUNK or B rows
(measured here: 30 MiB buffer, peak 48 MiB with ROW_CHUNK = 128 at V = 8,192).

Measured with torch's profiler (allocation and free events in time order) on CPU, at
B = 16 requests x 60 tree slots x V = 8,192, T = 0.8 with top-k and top-p. Before this
bound the path held a zero-filled [B, N, V] copy, the processed [R, V] logits, their
softmax and vLLM's full-size sort temporaries at once (about 4-6 x rows x V x 4 bytes);
at Llama-3 shapes (B = 64, 60 slots, V = 128,256) one rows x V float32 buffer is 1.97 GB.
"""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from vllm.v1.sample.sampler import Sampler

from vllm_hass import sampler as hass_sampler
from vllm_hass.tree import VerifyTrees

B, N, V, K = 16, 60, 8192, 10


def peak_bytes(fn) -> int:
    """Peak of live bytes allocated inside fn (CPU), from the profiler's memory events."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    live = peak = 0
    for e in events:
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def batch():
    g = torch.Generator().manual_seed(0)
    # a BFS tree per request: node i's parent drawn among the earlier nodes, <= K children
    parents = torch.full((B, N), -1, dtype=torch.long)
    depths = torch.zeros(B, N, dtype=torch.long)
    for b in range(B):
        kids = [0] * N
        for i in range(1, N):
            while True:
                p = int(torch.randint(0, i, (1,), generator=g))
                if kids[p] < K:
                    break
            kids[p] += 1
            parents[b, i], depths[b, i] = p, depths[b, p] + 1
    rows = torch.arange(B * N).view(B, N)
    logits = torch.randn(B * N, V, generator=g) * 3
    # each node drafts one of its parent's three likeliest tokens, so paths get accepted
    top3 = logits.topk(3, dim=-1).indices  # [B*N, 3]
    parent_row = rows.gather(1, parents.clamp(min=0))
    tokens = top3[parent_row, torch.arange(N) % 3]
    tokens[:, 0] = 0
    trees = VerifyTrees(tokens, parents, depths, torch.full((B,), N), rows)
    md = hass_sampler.sampling_metadata(
        torch.full((B,), 0.8), torch.full((B,), 50, dtype=torch.int32), torch.full((B,), 0.9),
        {0: torch.Generator().manual_seed(1)})

    class Runner:
        sampler = Sampler()

        class input_batch:
            sampling_metadata = md

    return Runner, logits, trees, int(depths.max())


def test_working_set_is_one_rows_by_vocab_buffer():
    runner, logits, trees, depth = batch()
    buffer = B * N * V * 4  # the [rows, V] float32 distribution
    # per chunk: the gathered rows, vLLM's top-k/top-p sort (values + int64 indices) and
    # softmax, ~18 bytes per element; per level: a few [B, V] rows
    small = (20 * hass_sampler.ROW_CHUNK + 64 * B) * V
    out = {}

    def step():
        out["o"], out["a"] = hass_sampler.tree_sample(runner, logits, trees, K, depth)

    peak = peak_bytes(step)
    print(f"peak {peak / 2**20:.1f} MiB for rows x V x 4 = {buffer / 2**20:.1f} MiB")
    assert buffer <= peak <= buffer + small, (peak, buffer, small)
    assert (out["a"].length > 0).any()  # drafts were accepted: the whole path ran


def test_memory_profiling_runs_the_largest_tree_step():
    """What the runner adds to vLLM's dummy sampler run (its memory profile) allocates the
    verify logits and the sampler's working set of a full batch of full trees."""
    from types import SimpleNamespace

    runner, _, _, _ = batch()
    tree = SimpleNamespace(total_tokens=60, top_k=10, depth=6)
    peak = peak_bytes(lambda: hass_sampler.dummy_tree_step(runner, B, tree, V, torch.float32, "cpu"))
    logits = probs = B * 60 * V * 4
    assert peak >= logits + probs, (peak, logits + probs)


@pytest.mark.engine
def test_runner_profiles_the_tree_step(bigram_target, identity_head):
    """The runner's _dummy_sampler_run (called by vLLM's memory profiling on CUDA; the
    CPU worker does not profile) runs the tree step on top of vLLM's own dummy run."""
    from helpers import free_llm, make_llm

    calls = []
    orig = hass_sampler.dummy_tree_step

    def spy(runner, num_reqs, tree, vocab, dtype, device):
        calls.append((num_reqs, tree.total_tokens, vocab, dtype))
        return orig(runner, num_reqs, tree, vocab, dtype, device)

    llm = make_llm(bigram_target, {"method": "hass", "model": str(identity_head),
                                   "tree": {"depth": 4, "top_k": 3, "total_tokens": 10}})
    try:
        runner = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner
        hass_sampler.dummy_tree_step = spy
        runner._dummy_sampler_run(torch.zeros(4, runner.model_config.get_hidden_size()))
    finally:
        hass_sampler.dummy_tree_step = orig
        free_llm(llm)
    assert calls == [(4, 10, runner.model_config.get_vocab_size(), torch.float32)]
