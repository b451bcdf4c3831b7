"""The draft's training objectives, each a masked mean over positions.

EAGLE:  1.0 * SmoothL1(draft feature, target feature) + 0.1 * soft cross-entropy vs q
HASS adds Top-K distillation (harmonized objective distillation):
        -sum_{x in topK(q)} q(x) log p(x)
which spends the draft's capacity on the tokens the target is likely to accept.
q is the target's next-token distribution, p the draft's.
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
