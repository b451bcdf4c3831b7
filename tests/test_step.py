"""The step's pieces without an engine: the verification layout (vllm_hass.step.
verify_layout), the draft's first-pass inputs, KV compaction pairs and the seeded rows'
counter-based uniforms. Each is compared with a direct per-request computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vllm_hass.kernels.tree_attention import pack_tree_mask, tree_ancestor_mask
from vllm_hass.sampler import Accepted, compaction_pairs, hashed_uniforms
from vllm_hass.step import (DraftStore, Staging, ancestor_masks, first_pass_inputs,
                            first_pass_layout, verify_layout)

# one stored tree (BFS, 1-based parents): root -> 1, 2; 1 -> 3, 4; 2 -> 5; 3 -> 6
TREE_TOK = [11, 12, 13, 14, 15, 16]
TREE_PAR = [0, 0, 1, 1, 2, 3]
TREE_DEP = [1, 1, 2, 2, 2, 3]


def _layout(drafts: list[list[int]], computed, store=None, roots=None):
    B = len(drafts)
    k = np.array([len(d) for d in drafts])
    n = 1 + k
    qsl = np.concatenate([[0], np.cumsum(n)])
    roots = roots or [100 + b for b in range(B)]
    ids = np.concatenate([[roots[b], *drafts[b]] for b in range(B)]).astype(np.int64)
    positions = torch.from_numpy(np.concatenate(
        [computed[b] + np.arange(n[b]) for b in range(B)]).astype(np.int64))
    store = store or DraftStore(8, 16)
    block_table = torch.arange(B * 4, dtype=torch.int32).view(B, 4)
    step = verify_layout(num_reqs=B, qsl=qsl, computed=np.asarray(computed), num_drafts=k,
                         input_ids=ids, store=store, req_ids=[f"r{b}" for b in range(B)],
                         block_table=block_table, positions=positions,
                         staging=Staging(4096, "cpu"))
    return step, positions, qsl


def test_verify_layout_recovers_trees_positions_and_masks():
    store = DraftStore(8, 16)
    store["r0"] = (TREE_TOK, TREE_PAR, TREE_DEP)
    store["r1"] = ([7, 8, 9], [0, 1, 2], [1, 2, 3])  # a chain
    store["r2"] = (TREE_TOK, TREE_PAR, TREE_DEP)
    # r0: the whole tree; r1: its chain; r2: vLLM truncated it to 4 drafts (a prefix of
    # the BFS order is a tree); r3: stale drafts (not the stored tree): root only
    drafts = [TREE_TOK, [7, 8, 9], TREE_TOK[:4], [5, 5]]
    computed = [40, 50, 60, 70]
    step, positions, qsl = _layout(drafts, computed, store)
    t = step.trees
    assert t.n.tolist() == [7, 4, 5, 1]
    assert t.tokens[0].tolist() == [100, *TREE_TOK]
    assert t.parents[0].tolist() == [-1, *TREE_PAR]
    assert t.depths[2, :5].tolist() == [0, 1, 1, 2, 2] and t.parents[2, 5:].tolist() == [-1, -1]
    assert t.tokens[3].tolist() == [103] + [-1] * 6  # stale: no drafts verified
    assert step.verify.tolist() == [True, True, True, True] and step.max_depth == 3
    # logits rows: 1 + k rows per request in order; padding repeats the last live row
    assert t.rows[0].tolist() == list(range(7))
    assert t.rows[3].tolist() == [7 + 4 + 5] * 7
    # RoPE positions of the drafts = root + depth (the stale request keeps vLLM's)
    assert positions[qsl[0]: qsl[1]].tolist() == [40, 41, 41, 42, 42, 42, 43]
    assert positions[qsl[1]: qsl[2]].tolist() == [50, 51, 52, 53]
    assert positions[qsl[3]: qsl[4]].tolist() == [70, 71, 72]
    # tree attention only for the branching requests, masks = ancestors-or-self
    a = step.attn
    assert a.q_row_start.tolist() == [0, 11] and a.tree_lens.tolist() == [7, 5]
    assert a.prefix_lens.tolist() == [40, 60] and not a.all_rows
    assert (a.max_query_len, a.max_prefix_len) == (7, 60)
    want = [pack_tree_mask(tree_ancestor_mask(t.parents[b, : int(t.n[b])])) for b in (0, 2)]
    assert torch.equal(a.tree_mask, torch.cat(want))
    # live-slot index of the T > 0 sampler
    assert step.live_rows.tolist() == [*range(7), *range(7, 11), *range(11, 16), 16]
    assert step.row_req.tolist() == [0] * 7 + [1] * 4 + [2] * 5 + [3]


@pytest.mark.parametrize("seed", range(5))
def test_ancestor_masks_match_the_kernels_builder(seed):
    g = torch.Generator().manual_seed(seed)
    B, N = 6, 40  # more than 32 slots: two words per row
    parents = torch.full((B, N), -1)
    for j in range(1, N):
        parents[:, j] = torch.randint(0, j, (B,), generator=g)
    n = torch.randint(1, N + 1, (B,), generator=g)
    got = ancestor_masks(parents.numpy(), n.numpy())
    want = torch.cat([pack_tree_mask(tree_ancestor_mask(parents[b, : int(n[b])]), n_words=2)
                      for b in range(B)])
    assert np.array_equal(got, want.numpy())


def _first_pass_reference(drafts, computed, acc, trees, qsl, ids, partial, next_prompt):
    """The pre-issue-13 per-request loop (what the head must read), with the padding of
    verified requests to min(depth, drafts) + 1 rows."""
    rows, toks, pos, last = [], [], [], []
    for b, d in enumerate(drafts):
        start = qsl[b]
        if d:
            L = int(acc.length[b])
            path = acc.path[b, :L].tolist()
            F = min(DEPTH, len(d)) + 1
            slots = [0, *path] + [0] * (F - 1 - L)
            nxt = [int(trees.tokens[b, s]) for s in path] + [int(acc.bonus[b])] * (F - L)
            p = [computed[b] + j for j in range(F)]
            last.append(len(rows) + L)
        else:
            n = qsl[b + 1] - start
            slots = list(range(n))
            tail = next_prompt[b] if partial[b] else int(acc.bonus[b])
            nxt = [int(x) for x in ids[start + 1: start + n]] + [tail]
            p = [computed[b] + j for j in range(n)]
            last.append(len(rows) + n - 1)
        rows += [start + s for s in slots]
        toks += nxt
        pos += p
    return rows, toks, pos, last


DEPTH = 3


def test_first_pass_inputs_match_the_per_request_loop():
    store = DraftStore(8, 16)
    store["r0"] = (TREE_TOK, TREE_PAR, TREE_DEP)
    store["r2"] = (TREE_TOK, TREE_PAR, TREE_DEP)
    # r0 a tree with its path accepted to depth 2, r1 a prefill chunk that ends the
    # prompt, r2 a tree with nothing accepted, r3 a chunk that does not end the prompt
    drafts = [TREE_TOK, [], TREE_TOK, []]
    computed = [40, 0, 60, 8]
    B = 4
    n_sched = [7, 5, 7, 3]
    qsl = np.concatenate([[0], np.cumsum(n_sched)])
    ids = np.arange(1000, 1000 + qsl[-1]).astype(np.int64)
    ids[qsl[0] + 1: qsl[0] + 7] = TREE_TOK
    ids[qsl[2] + 1: qsl[2] + 7] = TREE_TOK
    step = verify_layout(num_reqs=B, qsl=qsl, computed=np.array(computed),
                         num_drafts=np.array([6, 0, 6, 0]), input_ids=ids, store=store,
                         req_ids=["r0", "r1", "r2", "r3"],
                         block_table=torch.zeros(B, 4, dtype=torch.int32),
                         positions=torch.zeros(qsl[-1], dtype=torch.int64),
                         staging=Staging(4096, "cpu"))
    acc = Accepted(path=torch.tensor([[2, 5, -1], [-1, -1, -1], [-1, -1, -1], [-1, -1, -1]]),
                   length=torch.tensor([2, 0, 0, 0]), bonus=torch.tensor([900, 901, 902, 903]),
                   has_tree=torch.tensor([True, False, True, False]))
    token_ids = np.zeros((B, 64), dtype=np.int64)
    token_ids[3, computed[3] + n_sched[3]] = 777  # r3's next prompt token
    partial = np.array([False, False, False, True])
    fp = first_pass_layout(num_reqs=B, qsl=qsl, computed=np.array(computed), verify=step.verify,
                           depth=DEPTH, input_ids=ids, token_ids=token_ids, partial=partial,
                           params_ok=np.array([True, True, False, True]), room=10,
                           max_model_len=1024, staging=Staging(4096, "cpu"))
    tok, hidden_rows, last, base = first_pass_inputs(fp, step, acc)
    rows, toks, pos, want_last = _first_pass_reference(
        drafts, computed, acc, step.trees, qsl, ids, partial, {3: 777})
    assert hidden_rows.tolist() == rows
    assert tok.tolist() == toks
    assert fp.positions.tolist() == pos
    assert last.tolist() == want_last
    assert base.tolist() == [pos[i] for i in want_last]
    # a partial chunk and a request whose options forbid trees get no tree
    assert fp.eligible.tolist() == [0, 1]
    assert fp.seq_lens.tolist() == [40 + 4, 0 + 5, 60 + 4, 8 + 3]


def test_compaction_pairs_are_fixed_shape_with_root_no_ops():
    acc = Accepted(path=torch.tensor([[1, 4, 6], [2, -1, -1], [-1, -1, -1]]),
                   length=torch.tensor([3, 1, 0]), bonus=torch.zeros(3, dtype=torch.long),
                   has_tree=torch.tensor([True, True, False]))
    root = torch.tensor([10, 20, 30])
    src, dst = compaction_pairs(acc, root)
    # request 0: slot 1 is in place (depth 1), 4 -> depth 2, 6 -> depth 3
    assert src.tolist() == [[10, 14, 16], [22, 20, 20], [30, 30, 30]]
    assert dst.tolist() == [[10, 12, 13], [21, 20, 20], [30, 30, 30]]


def test_hashed_uniforms_are_a_function_of_seed_counter_and_column():
    seeds = torch.tensor([1, 1, 2, 2**40 + 1])
    counter = torch.tensor([5, 6, 5, 5])
    u = hashed_uniforms(seeds, counter, 64)
    assert torch.equal(u, hashed_uniforms(seeds, counter, 64))  # deterministic
    assert u.dtype == torch.float64 and bool((u >= 0).all()) and bool((u < 1).all())
    assert not torch.equal(u[0], u[1]) and not torch.equal(u[0], u[2]) and not torch.equal(u[2], u[3])
    assert torch.equal(hashed_uniforms(seeds[:1], counter[:1], 64)[0], u[0])  # batch-independent
    # roughly uniform: 20,000 values, Kolmogorov-Smirnov distance well under 1%
    big = hashed_uniforms(torch.arange(200), torch.zeros(200, dtype=torch.long), 100).flatten()
    srt = big.sort().values
    ks = (srt - torch.arange(srt.numel(), dtype=torch.float64) / srt.numel()).abs().max()
    assert ks < 0.012, float(ks)
