"""The draft's training objectives, each a masked mean over positions.

EAGLE:  1.0 * SmoothL1(draft feature, target feature) + 0.1 * soft cross-entropy vs q
HASS adds Top-K distillation (harmonized objective distillation):
        -sum_{x in topK(q)} q(x) log p(x)
which spends the draft's capacity on the tokens the target is likely to accept.
q is the target's next-token distribution, p the draft's.

With a draft vocabulary D (train fit --draft-vocab), p is a softmax over D only
(the head's logits are the D rows of the lm_head) and q keeps its full-vocabulary
normalisation. The target's mass outside D is handled by renormalising q over D
and weighting each position by its in-vocabulary mass m = q(D):
    m * CE(q|D / m, p)  =  -sum_{x in D} q(x) log p(x)
    TopK:                  -sum_{x in topK(q), x in D} q(x) log p(x)
i.e. the same sums with the outside tokens left out (`in_vocab`, `to_draft`), so
soft_ce and topk_loss serve unchanged. Why this and not EAGLE-3's hard mask
(skip positions whose target argmax is outside D): over D the CE is minimised at
p = q|D / m (the target conditioned on D), and a draft limited to D is accepted
with probability at most sum_{x in D} min(p, q) <= m, so m is exactly what a
position can still earn; the hard mask is the 0/1 version of that weight, and
throws away positions where the argmax is outside but most of the mass is inside
(T > 0, tree siblings). Positions with m ~ 0 contribute ~0 and need no mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_mean(per_pos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # clamp: a batch with no assistant token gives 0, not NaN (EAGLE adds 1e-5 instead)
    return (per_pos * mask).sum() / mask.sum().clamp_min(1.0)


def feature_loss(out: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return masked_mean(F.smooth_l1_loss(out, target, reduction="none").mean(-1), mask)


def soft_ce(logp: torch.Tensor, q: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """-sum_x q(x) log p(x) over the whole vocabulary."""
    return masked_mean(-(q * logp).sum(-1), mask)


def topk_loss(logp: torch.Tensor, ids: torch.Tensor, q: torch.Tensor,
              mask: torch.Tensor) -> torch.Tensor:
    """-sum over the K given tokens of q(x) log p(x). ids/q [..., K]: the target's top-K
    tokens and their (unrenormalized) probabilities, e.g. from `top_k(q_full, K)`."""
    return masked_mean(-(q * logp.gather(-1, ids)).sum(-1), mask)


def top_k(q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    p, i = q.topk(k, dim=-1)
    return i, p


def in_vocab(q: torch.Tensor, draft_ids: torch.Tensor) -> torch.Tensor:
    """q [..., V] -> [..., Vd]: the target's probabilities of the draft tokens, NOT
    renormalised (their sum is the in-vocabulary mass m; see the module doc)."""
    return q[..., draft_ids]


def to_draft(ids: torch.Tensor, p: torch.Tensor, index: torch.Tensor):
    """Target ids [..., K] and their probabilities -> (draft ids [..., K], probabilities
    with every token outside the vocabulary set to 0, so it drops out of topk_loss).
    index [V]: the draft id of each target id, -1 outside."""
    d = index[ids]
    return d.clamp_min(0), p * (d >= 0)
