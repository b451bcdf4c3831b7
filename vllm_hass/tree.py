"""EAGLE-2 dynamic draft trees: growing them, and accepting from them losslessly.

Pure tensor code, batched over requests (no Python loop per request), shared by
the vLLM proposer/sampler. A verification tree has slot 0 = the root (the last
accepted token, whose target KV is not yet computed) and slots 1..M = drafted
tokens in BFS order (every parent slot is smaller than its child's), so any
prefix of the slots is itself a tree: vLLM may truncate the drafts it schedules.

Growth (EAGLE-2): the root's top_k children form the first frontier; each of
the depth-1 expansion steps runs the head on the frontier, scores every child
of every frontier node by cumulative log-prob, and keeps the global top_k as the
next frontier. All drafted nodes are then reranked by score and the best
total_tokens-1 kept. A child's score never exceeds its parent's, and a stable
sort puts a parent (stored earlier) before an equal-scored child, so the kept
set is always a connected subtree.

Acceptance: greedy = the longest root-to-node path whose every token equals the
target argmax at its parent, plus the target's token after it. Sampling =
recursive rejection over siblings with the rule that is exact for children
chosen deterministically (top-k): under the current residual target
distribution p, accept child x with probability p(x); on rejection set p(x)=0,
renormalise, try the next sibling; if all are rejected sample from the residual.
P(output x) = p(x) for every x, so the output distribution equals the target's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Trees:
    """A batch of drafted trees. Row b holds n[b] drafts; slots 1..n[b] in BFS order."""

    tokens: torch.Tensor  # [B, M] int64 drafted tokens (slot i+1 = column i)
    parents: torch.Tensor  # [B, M] int64 parent slot (0 = root)
    depths: torch.Tensor  # [B, M] int64 (1 = child of the root)
    # [B, M] int64: each node's rank by cumulative draft score (0 = best; EAGLE-2's rerank
    # order), read by "tree": "auto"'s acceptance statistics (vllm_hass/auto_tree.py)
    ranks: torch.Tensor | None = None

    def packed(self) -> torch.Tensor:
        """[3, B, M]: tokens, parents, depths in one tensor (one copy to the host)."""
        return torch.stack([self.tokens, self.parents, self.depths])


Expand = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def grow(root_logp: torch.Tensor, expand: Expand, *, top_k: int, depth: int,
         total_tokens: int) -> Trees:
    """EAGLE-2 growth for B requests at once.

    root_logp [B, V]: the draft's log-probs for the root's children.
    expand(step, tokens [B,K], src [B,K], scratch_mask [B,K,step*K]) -> log-probs [B,K,V]
      runs the head on the frontier of `step` (1-based). `src[b, j]` says whose
      output is frontier node j's hidden input: the root's (-1) at step 1, else
      the index of its parent in the previous step's frontier. Frontier node j
      of step s writes its draft KV to scratch slot (s-1)*K + j; `scratch_mask`
      marks the scratch slots it may attend to (its ancestors and itself).
    """
    B = root_logp.shape[0]
    K = min(top_k, root_logp.shape[-1])
    dev = root_logp.device
    score, tok = root_logp.topk(K, dim=-1)
    toks, scores, parents, levels = [tok], [score], [torch.full_like(tok, -1)], [1]
    front_id = torch.arange(K, device=dev).expand(B, K)
    src = torch.full((B, K), -1, dtype=torch.long, device=dev)
    W = K * max(depth - 1, 1)
    anc = torch.zeros(B, K, W, dtype=torch.bool, device=dev)
    ar = torch.arange(K, device=dev)
    anc[:, ar, ar] = True
    stored = K
    for step in range(1, depth):
        logp = expand(step, tok, src, anc[:, :, : step * K])
        child_score, child_tok = logp.topk(K, dim=-1)  # [B, K, K]
        cand = (score.unsqueeze(-1) + child_score).flatten(1)
        toks.append(child_tok.flatten(1))
        scores.append(cand)
        parents.append(front_id.repeat_interleave(K, dim=1))
        levels.append(step + 1)
        if step == depth - 1:
            break
        score, pick = cand.topk(K, dim=-1)
        src = pick // K
        tok = child_tok.flatten(1).gather(1, pick)
        front_id = stored + pick
        anc = anc.gather(1, src.unsqueeze(-1).expand(B, K, W)).clone()
        anc[:, ar, step * K + ar] = True
        stored += K * K

    tok_all = torch.cat(toks, 1)
    score_all = torch.cat(scores, 1)
    parent_all = torch.cat(parents, 1)
    level_all = torch.cat([torch.full_like(t, lv) for t, lv in zip(toks, levels)], 1)
    M = min(total_tokens - 1, tok_all.shape[1])
    keep = torch.sort(score_all, dim=1, descending=True, stable=True).indices[:, :M]
    keep, ranks = torch.sort(keep, dim=1)  # storage order is level order: BFS
    slot_of = torch.full_like(tok_all, -1)
    slot_of.scatter_(1, keep, torch.arange(1, M + 1, device=dev).expand(B, M))
    par = parent_all.gather(1, keep)
    # connected by construction (module docstring); tests/test_tree.py checks it
    tree_par = torch.where(par < 0, 0, slot_of.gather(1, par.clamp(min=0)))
    return Trees(tok_all.gather(1, keep), tree_par, level_all.gather(1, keep), ranks)


@dataclass
class VerifyTrees:
    """Trees as verified: slot 0 = root. Padded to N = 1 + max drafts."""

    tokens: torch.Tensor  # [B, N] (root token in slot 0; padding -1)
    parents: torch.Tensor  # [B, N] (-1 for the root and padding)
    depths: torch.Tensor  # [B, N] (0 for the root)
    n: torch.Tensor  # [B] number of live slots (1 + drafts)
    rows: torch.Tensor  # [B, N] row of each slot in the logits (padding: row of the root)


def children_table(parents: torch.Tensor, n: torch.Tensor, max_children: int) -> torch.Tensor:
    """[B, N, C] child slots of each slot in slot order (-1 = none). Fixed shapes: entries
    that are not a child go to one trash cell."""
    B, N = parents.shape
    dev = parents.device
    live = torch.arange(N, device=dev) < n.unsqueeze(1)
    par = torch.where(live & (parents >= 0), parents, N)  # N = no parent
    # rank of each node among its siblings = number of earlier slots with the same parent
    same = (par.unsqueeze(2) == par.unsqueeze(1)) & (
        torch.arange(N, device=dev).unsqueeze(1) > torch.arange(N, device=dev).unsqueeze(0))
    rank = same.sum(-1)
    ok = (par < N) & (rank < max_children)
    cell = (torch.arange(B, device=dev).unsqueeze(1) * N + par.clamp(max=N - 1)) * max_children + rank
    trash = B * N * max_children
    table = torch.full((trash + 1,), -1, dtype=torch.long, device=dev)
    table.scatter_(0, torch.where(ok, cell, trash).flatten(),
                   torch.arange(N, device=dev).expand(B, N).flatten())
    return table[:trash].view(B, N, max_children)


def _walk_up(best: torch.Tensor, parents: torch.Tensor, max_depth: int) -> torch.Tensor:
    """[B, max_depth] path slots root-exclusive, top-down, -1 padded."""
    B = best.shape[0]
    up = torch.full((B, max_depth), -1, dtype=torch.long, device=best.device)
    cur = best.clone()
    for i in range(max_depth):
        up[:, i] = torch.where(cur > 0, cur, -1)
        cur = torch.where(cur > 0, parents.gather(1, cur.clamp(min=0).unsqueeze(1)).squeeze(1), cur)
    # reverse each row's live prefix so the path reads root -> leaf
    lens = (up >= 0).sum(1)
    idx = (lens.unsqueeze(1) - 1 - torch.arange(max_depth, device=best.device)).clamp(min=0)
    path = up.gather(1, idx)
    return torch.where(torch.arange(max_depth, device=best.device) < lens.unsqueeze(1), path, -1)


def accept_greedy(trees: VerifyTrees, argmax: torch.Tensor, max_depth: int | None = None):
    """argmax [B, N]: target argmax at each slot; max_depth: the deepest slot (a host
    bound; None reads it from the device). Returns (path [B, max(max_depth, 1)], bonus [B])."""
    B, N = trees.tokens.shape
    dev = argmax.device
    if max_depth is None:
        max_depth = int(trees.depths.max()) if N > 1 else 0
    live = torch.arange(N, device=dev) < trees.n.unsqueeze(1)
    par = trees.parents.clamp(min=0)
    correct = live & (trees.tokens == argmax.gather(1, par)) & (trees.tokens >= 0)
    correct[:, 0] = True
    ok = correct.clone()
    for _ in range(max_depth):
        ok = correct & ok.gather(1, par)
    # deepest ok slot (under greedy only one child per parent can match: a chain)
    best = torch.where(ok, trees.depths, -1).argmax(1)
    path = _walk_up(best, trees.parents, max(max_depth, 1))
    bonus = argmax.gather(1, best.unsqueeze(1)).squeeze(1)
    return path, bonus


def accept_sampled(trees: VerifyTrees, probs: torch.Tensor, uniform: Callable[[int], torch.Tensor],
                   sample: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], max_children: int,
                   slot_row: torch.Tensor | None = None, max_depth: int | None = None):
    """probs: the target's (processed) distribution at each slot, [B, N, V], or [R, V]
    rows with slot_row [B, N] giving each slot's row (-1 for padding).

    uniform(level) -> [B, max_children] U(0,1) draws, one per sibling tried at that
    level; sample(p [B,V], level [B]) -> [B] tokens ~ p (unnormalised weights) for rows
    that stopped at `level`. Each decision has its own draw, so a row's draws do not
    depend on the other rows. Fixed shapes, no device->host sync, siblings at once:
    sibling s is tried iff siblings 0..s-1 were rejected, and then, with the residual
    kept unnormalised, it is accepted iff u_s * mass_s < p(x_s), where mass_s = the
    node's mass minus its earlier siblings' (their tokens are out of the residual; a
    repeated token has nothing left). The first accepted sibling is exactly what trying
    them one by one gives. Returns (path [B, D], bonus [B])."""
    B, N = trees.tokens.shape
    if slot_row is None:  # [B, N, V]: every slot is a row
        slot_row = torch.arange(B * N, device=probs.device).view(B, N)
        probs = probs.reshape(B * N, -1)
    dev = probs.device
    C = max_children
    if max_depth is None:
        max_depth = int(trees.depths.max()) if N > 1 else 0
    kids = children_table(trees.parents, trees.n, C)
    cur = torch.zeros(B, dtype=torch.long, device=dev)
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    stop_level = torch.zeros(B, dtype=torch.long, device=dev)
    path = torch.full((B, max(max_depth, 1)), -1, dtype=torch.long, device=dev)
    b_idx = torch.arange(B, device=dev)
    earlier = torch.ones(C, C, dtype=torch.bool, device=dev).tril(-1)  # [s, j]: j < s
    residual = None
    for level in range(max_depth + 1):
        p = probs[slot_row[b_idx, cur].clamp(min=0)]  # [B, V] copy: residual at the current node
        c = kids[b_idx, cur]  # [B, C] child slots
        x = trees.tokens.gather(1, c.clamp(min=0))  # [B, C] their tokens
        ok = (c >= 0) & (x >= 0) & ~done.unsqueeze(1)
        x = x.clamp(min=0)
        same = (x.unsqueeze(2) == x.unsqueeze(1)) & ok.unsqueeze(1)  # [B, s, j]
        px = p.gather(1, x)
        pxd = torch.where(ok & ~(same & earlier).any(-1), px.double(), 0.0)
        mass = p.sum(-1, dtype=torch.float64).unsqueeze(1) - (pxd.cumsum(1) - pxd)
        accept = ok & (uniform(level).double() * mass < pxd)
        moved = accept.any(1)
        first = accept.to(torch.int8).argmax(1, keepdim=True)  # the first accepted sibling
        nxt = torch.where(moved, c.gather(1, first).squeeze(1), cur)
        stop = ~done & ~moved  # every sibling rejected (or a leaf): the bonus comes from here
        # out of the bonus residual: every tried (= every) sibling of a stopping row; all
        # writes to one token agree (a column is zeroed if any stopping sibling has it)
        gone = (same & (stop.unsqueeze(1) & ok).unsqueeze(1)).any(-1)
        p.scatter_(1, x, torch.where(gone, 0.0, px))
        residual = p if residual is None else torch.where(stop.unsqueeze(1), p, residual)
        stop_level = torch.where(stop, level, stop_level)
        done |= stop
        if level < path.shape[1]:
            path[:, level] = torch.where(moved, nxt, -1)
        cur = nxt
    return path, sample(residual, stop_level)
