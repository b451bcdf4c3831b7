"""Tree growth and acceptance logic (no vLLM): connectivity, greedy paths, and the
sampling rule's output distribution."""

import pytest
import torch

from vllm_hass.tree import VerifyTrees, accept_greedy, accept_sampled, children_table, grow


def random_expand(V, seed):
    g = torch.Generator().manual_seed(seed)

    def expand(step, tokens, src, mask):
        B, K = tokens.shape
        assert mask.shape == (B, K, step * K)
        # every frontier node sees itself, and exactly `step` scratch slots (one per level)
        assert mask[:, torch.arange(K), (step - 1) * K + torch.arange(K)].all()
        assert (mask.sum(-1) == step).all()
        return torch.log_softmax(torch.randn(B, K, V, generator=g) * 3, -1)

    return expand


@pytest.mark.parametrize("depth,top_k,total", [(1, 4, 4), (3, 3, 10), (6, 10, 60), (5, 2, 12)])
def test_grow_is_a_connected_bfs_tree(depth, top_k, total):
    B, V = 5, 50
    root = torch.log_softmax(torch.randn(B, V) * 3, -1)
    t = grow(root, random_expand(V, 0), top_k=top_k, depth=depth, total_tokens=total)
    M = min(total - 1, top_k + (depth - 1) * top_k * top_k)
    assert t.tokens.shape == (B, M)
    slots = torch.arange(1, M + 1)
    assert (t.parents < slots).all() and (t.parents >= 0).all()  # BFS: parent first
    par_depth = torch.where(t.parents == 0, 0, t.depths.gather(1, (t.parents - 1).clamp(min=0)))
    assert (t.depths == par_depth + 1).all()
    assert int(t.depths.max()) <= depth
    # siblings are distinct tokens
    for b in range(B):
        pairs = set()
        for tok, par in zip(t.tokens[b].tolist(), t.parents[b].tolist()):
            assert (tok, par) not in pairs
            pairs.add((tok, par))


def test_grow_keeps_the_best_scored_nodes():
    """A confident chain (p=0.9 each step) survives the rerank to full depth."""
    V, K = 20, 3

    def expand(step, tokens, src, mask):
        lp = torch.full((tokens.shape[0], K, V), -10.0)
        lp[:, :, 7] = torch.log(torch.tensor(0.9))
        return lp

    root = torch.full((2, V), -10.0)
    root[:, 3] = torch.log(torch.tensor(0.9))
    t = grow(root, expand, top_k=K, depth=5, total_tokens=8)
    top_path = [(tok, d) for tok, d in zip(t.tokens[0].tolist(), t.depths[0].tolist())
                if tok in (3, 7)]
    assert (3, 1) in top_path and all((7, d) in top_path for d in range(2, 6))


def chain_tree(tokens):
    n = len(tokens)
    return VerifyTrees(
        tokens=torch.tensor([tokens]), parents=torch.tensor([[-1] + list(range(n - 1))]),
        depths=torch.arange(n)[None], n=torch.tensor([n]), rows=torch.arange(n)[None])


def test_greedy_longest_path_in_a_tree():
    # root(0) -> a(1) -> c(3) -> d(4); root -> b(2) -> e(5)
    tokens = torch.tensor([[9, 11, 12, 13, 14, 15]])
    parents = torch.tensor([[-1, 0, 0, 1, 3, 2]])
    depths = torch.tensor([[0, 1, 1, 2, 3, 2]])
    trees = VerifyTrees(tokens, parents, depths, torch.tensor([6]), torch.arange(6)[None])
    # target argmax at each slot: root->12 (b), b->15 (e), e->99
    argmax = torch.tensor([[12, 13, 15, 14, 0, 99]])
    path, bonus = accept_greedy(trees, argmax)
    assert path[0].tolist()[:2] == [2, 5] and bonus.item() == 99
    argmax = torch.tensor([[11, 13, 0, 14, 42, 0]])  # a, c, d all right
    path, bonus = accept_greedy(trees, argmax)
    assert path[0].tolist() == [1, 3, 4] and bonus.item() == 42
    argmax = torch.tensor([[5, 0, 0, 0, 0, 0]])  # nothing right: bonus from the root
    path, bonus = accept_greedy(trees, argmax)
    assert (path[0] == -1).all() and bonus.item() == 5


def test_children_table_orders_siblings_by_slot():
    parents = torch.tensor([[-1, 0, 0, 1, 2, 1, -1]])
    t = children_table(parents, torch.tensor([6]), 3)
    assert t[0, 0].tolist() == [1, 2, -1] and t[0, 1].tolist() == [3, 5, -1]
    assert t[0, 2].tolist() == [4, -1, -1] and (t[0, 3:] == -1).all()


def test_sampled_acceptance_matches_the_target_distribution():
    """First token ~ p_root, and second token | first = child c ~ p_c, over 200k draws.
    Total variation bound 0.01 (sampling error at this n is ~0.002)."""
    torch.manual_seed(0)
    V, R = 6, 200_000
    # root -> children tokens 2, 0, 4 (slots 1,2,3); slot1 (token 2) -> children 1, 5 (slots 4,5)
    tokens = torch.tensor([7 % V, 2, 0, 4, 1, 5])
    parents = torch.tensor([-1, 0, 0, 0, 1, 1])
    depths = torch.tensor([0, 1, 1, 1, 2, 2])
    probs = torch.softmax(torch.randn(6, V) * 1.5, -1)
    trees = VerifyTrees(tokens.expand(R, 6), parents.expand(R, 6), depths.expand(R, 6),
                        torch.full((R,), 6), torch.arange(6).expand(R, 6))
    gen = torch.Generator().manual_seed(1)
    path, bonus = accept_sampled(
        trees, probs.expand(R, 6, V), lambda level: torch.rand(R, 3, generator=gen),
        lambda p, level: torch.multinomial(p, 1, generator=gen).squeeze(1), max_children=3)
    first = torch.where(path[:, 0] >= 0, tokens[path[:, 0].clamp(min=0)], bonus)
    freq = torch.bincount(first, minlength=V).float() / R
    assert 0.5 * (freq - probs[0]).abs().sum() < 0.01
    took_slot1 = path[:, 0] == 1
    second = torch.where(path[:, 1] >= 0, tokens[path[:, 1].clamp(min=0)], bonus)[took_slot1]
    freq2 = torch.bincount(second, minlength=V).float() / took_slot1.sum()
    assert 0.5 * (freq2 - probs[1]).abs().sum() < 0.01
    # and the tree did its job: most draws accept at least one draft
    assert (path[:, 0] >= 0).float().mean() > probs[0, [2, 0, 4]].sum() - 0.01
