"""The pure-torch EAGLE-2 oracle: acceptance bookkeeping, masks, losslessness."""

from __future__ import annotations

import random

import pytest
import torch

from vllm_hass.bench.oracle import (
    Drafter, Oracle, Target, TreeShape, accept, greedy, oracle_tau, tree_mask,
)
from vllm_hass.bench.tiny import write_tiny
from vllm_hass.errors import UserError

PROMPTS = [[5, 6, 7, 8], [100, 200, 30], [42], [300, 12, 12, 9, 77]]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny matmuls gain nothing from threads, and on a shared CPU OpenMP spin-waits
    # make them many times slower.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def perfect(tmp_path_factory):
    """Bigram target + identity head: the head drafts the target's greedy token."""
    target, head, _ = write_tiny(tmp_path_factory.mktemp("perfect"), bigram=True, head="identity", scale=2e4)
    return target, head


@pytest.fixture(scope="module")
def noisy(tmp_path_factory):
    """Bigram target + an identity head with a noisy fc: right often, not always."""
    target, head, _ = write_tiny(tmp_path_factory.mktemp("noisy"), bigram=True, head="identity",
                                 scale=20, noise=0.3)
    return target, head


@pytest.fixture(scope="module")
def random_pair(tmp_path_factory):
    target, head, _ = write_tiny(tmp_path_factory.mktemp("random"), bigram=False, head="random", seed=3,
                                 sharp=10.0)
    return Oracle.load(target, head, dtype=torch.float64)


@pytest.fixture(scope="module")
def context_pair(tmp_path_factory):
    """A target whose next token mostly follows the current one, and an identity head:
    drafts are accepted and rejected, so both branches of the update run."""
    target, head, _ = write_tiny(tmp_path_factory.mktemp("context"), bigram=False, context=0.2,
                                 head="identity", seed=1, sharp=10.0)
    return Oracle.load(target, head, dtype=torch.float64)


def ancestors_or_self(i: int, parents: list[int]) -> set[int]:
    out = set()
    while i >= 0:
        out.add(i)
        i = parents[i]
    return out


def test_tree_mask_is_ancestors_only():
    rng = random.Random(0)
    for _ in range(20):
        n = rng.randint(1, 40)
        parents = [-1] + [rng.randrange(0, i) for i in range(1, n)]
        mask = tree_mask(parents)
        for i in range(n):
            assert {j for j in range(n) if mask[i, j]} == ancestors_or_self(i, parents)
    # Explicitly: three siblings under the root never see each other.
    m = tree_mask([-1, 0, 0, 0])
    assert not m[1, 2] and not m[2, 1] and not m[3, 1] and m[3, 0]


def test_tree_mask_rejects_parent_after_child():
    with pytest.raises(ValueError):
        tree_mask([-1, 2, 0])


def test_accept_follows_target_argmax():
    # root(0) -> 1:'a', 2:'b'; 1 -> 3:'c'; target argmax per node: root->'b', 2->'z'
    from vllm_hass.bench.oracle import DraftTree

    tree = DraftTree(tokens=[9, 10, 11, 12], parents=[-1, 0, 0, 1], depths=[0, 1, 1, 2], scores=[0] * 4)
    assert accept(tree, [11, 12, 99, 0]) == [0, 2]
    assert accept(tree, [10, 12, 99, 0]) == [0, 1, 3]
    assert accept(tree, [55, 12, 99, 0]) == [0]


@pytest.mark.parametrize("tree,k,expect", [
    (dict(depth=4, top_k=3, total_tokens=12), None, 5.0),
    (dict(depth=6, top_k=10, total_tokens=60), None, 7.0),
    (None, 3, 4.0),
])
def test_perfect_head_tau(perfect, tree, k, expect):
    r = oracle_tau(*perfect, PROMPTS[:2], 24, tree=tree, k=k)
    assert r.tau == expect
    assert r.per_depth == [1.0] * int(expect - 1)
    assert all(len(t) == 24 for t in r.tokens)


@pytest.mark.parametrize("shape", [TreeShape(4, 4, 16), TreeShape(3, 2, 6), TreeShape.chain(3)])
def test_lossless_random_target_random_head(random_pair, shape):
    for prompt in PROMPTS:
        out, _ = random_pair.generate(prompt, 32, shape)
        assert out == greedy(random_pair.model, prompt, 32)


@pytest.mark.parametrize("shape", [TreeShape(4, 4, 16), TreeShape.chain(4)])
def test_lossless_with_accepted_and_rejected_drafts(context_pair, shape):
    accepted = []
    for prompt in PROMPTS:
        out, acc = context_pair.generate(prompt, 40, shape)
        assert out == greedy(context_pair.model, prompt, 40)
        accepted += acc
    assert 0 < sum(accepted) < shape.depth * len(accepted)


@torch.no_grad()
def test_tree_nodes_match_their_own_path(random_pair):
    """Every drafted score and every verify logit equals a plain causal run over the
    node's own path: no node is influenced by a sibling, positions follow depth.
    (Both attentions take their softmax in float32, hence the tolerances.)"""
    o = random_pair
    prompt = [7, 3, 250, 19, 4]
    target = Target(o.model)
    feats, logits = target.forward(prompt, list(range(len(prompt))))
    seq = prompt + [int(logits[-1].argmax())]
    drafter = Drafter(o.head, o.embed, o.lm_head)
    tree = drafter.draft(seq, feats, TreeShape(3, 3, 22))  # keeps every candidate
    assert max(tree.depths) == 3 and len(tree.tokens) == 22

    h, tree_logits = target.forward(tree.tokens, [len(seq) - 1 + d for d in tree.depths], tree_mask(tree.parents))
    for i in range(1, len(tree.tokens)):
        path = sorted(ancestors_or_self(i, tree.parents))[1:]
        toks = [tree.tokens[j] for j in path]
        # Target: the whole sequence + path in one causal forward.
        full = o.model(torch.tensor([seq + toks])).logits[0, -1]
        torch.testing.assert_close(tree_logits[i], full, rtol=1e-5, atol=1e-6)
        # Head: fresh cache, true features for the prefix, then its own outputs along the path.
        ref = Drafter(o.head, o.embed, o.lm_head)
        out = ref.extend(seq, feats)
        score = 0.0
        for n, tok in enumerate(toks):
            score += float(ref.logprobs(out)[tok])
            o_new, k, v = ref._run([tok], out[None], [len(seq) - 1 + n], past=(ref.k, ref.v))
            ref.k, ref.v, out = torch.cat((ref.k, k), 2), torch.cat((ref.v, v), 2), o_new[-1]
        assert abs(score - tree.scores[i]) < 1e-5


def test_tree_beats_chain_on_an_imperfect_head(noisy):
    chain = oracle_tau(*noisy, PROMPTS, 40, k=4)
    tree = oracle_tau(*noisy, PROMPTS, 40, tree=dict(depth=4, top_k=4, total_tokens=24))
    assert chain.tau < 5.0  # the head is imperfect...
    assert tree.tau > chain.tau  # ...and the tree recovers some of its misses
    assert chain.tokens == tree.tokens  # both greedy: same output


def test_tree_shape_validation():
    with pytest.raises(UserError, match="total_tokens"):
        TreeShape(2, 2, 8)  # 2 + 4 drafted candidates at most
    with pytest.raises(UserError, match="depth"):
        TreeShape(0, 2, 2)
    with pytest.raises(UserError, match="exactly one"):
        oracle_tau("t", "h", [[1]], 4, tree=dict(depth=2, top_k=2, total_tokens=3), k=2)
    with pytest.raises(UserError, match="unknown field"):
        TreeShape.from_dict({"depth": 2, "top_k": 2, "total_tokens": 3, "width": 1})


@torch.no_grad()
def test_state_after_tree_steps_equals_a_fresh_prefill(context_pair):
    """After accepted tree steps, the kept target KV and the features handed to the head
    are exactly those of a plain forward over the sequence (only the accepted path survives)."""
    from vllm_hass.bench.oracle import Session

    o = context_pair
    s = Session(o, [11, 400, 3])
    accepted = [s.step(TreeShape(4, 4, 16)) for _ in range(6)]
    assert sum(accepted) > 0
    fresh = Target(o.model)
    feats, _ = fresh.forward(s.seq[:-1], list(range(len(s.seq) - 1)))
    torch.testing.assert_close(s.feats, feats, rtol=1e-5, atol=1e-6)
    for mine, ref in zip(s.target.cache.layers, fresh.cache.layers):
        torch.testing.assert_close(mine.keys, ref.keys, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(mine.values, ref.values, rtol=1e-5, atol=1e-6)
