"""Harmonized context alignment: train step j on exactly what decoding shows step j.

At decode time, after a context ending at position c, the head runs
    step 1 at c      on the target's feature f_c, attending to K/V made from target
                     features at positions <= c;
    step 2 at c+1    on its own step-1 output, attending to those K/V at <= c and to
                     its own K/V at c+1 (made from the step-1 output);
    step j at c+j-1  on its step-(j-1) output, attending to target-feature K/V at <= c,
                     step-2 K/V at c+1, ..., step-j K/V at c+j-1.
EAGLE trains every position as step 1 (target features everywhere), so from step 2
on the head sees a context it never trained on.

Here every position i of the sequence is trained at once as step j with context
end c = i - (j - 1). Let h_k be the hidden input of step k at every position:
h_1 = the target's features, h_k[p] = out_{k-1}[p - 1]. Step k's output at p
depends only on the scenario with context end p - k + 1, so the previous steps'
full-sequence outputs are exactly the decode-time values this step needs. Step j
recomputes K/V from all of h_1..h_j, concatenates them along the key axis, and
lets query i see
    block 1 (from h_1):          keys p <= c
    block k (from h_k), k >= 2:  key p == c + k - 1
Positions with c < 0 have no such decode scenario; the trainer drops them from
the loss (they still attend to themselves, so nothing is NaN).
"""

from __future__ import annotations

import torch

from vllm_hass.head import HassHead


def hca_mask(length: int, step: int, device=None) -> torch.Tensor:
    """bool [1, 1, L, step*L]: which keys (blocks h_1..h_step) query i of step `step` sees."""
    i = torch.arange(length, device=device)[:, None]
    p = torch.arange(length, device=device)[None, :]
    c = i - (step - 1)
    blocks = [p <= c] + [p == c + k - 1 for k in range(2, step + 1)]
    return torch.cat(blocks, dim=1)[None, None]


def step_forward(head: HassHead, embeds: torch.Tensor, hiddens: list[torch.Tensor],
                 position_ids: torch.Tensor) -> torch.Tensor:
    """Output of step j = len(hiddens) at every position.

    embeds [B,L,H]: embeddings of the token each position consumes (the next token);
    hiddens: h_1..h_j, each [B,L,H]. The K/V of earlier steps are recomputed with the
    current weights, so their gradient reaches fc and the K/V projections, as in HASS.
    """
    j, L = len(hiddens), embeds.shape[1]
    xs = [head.fuse(embeds, h) for h in hiddens]
    qkv = [head.qkv(x, position_ids) for x in xs]
    k = torch.cat([t[1] for t in qkv], dim=2)
    v = torch.cat([t[2] for t in qkv], dim=2)
    return head.finish(xs[-1], qkv[-1][0], k, v, hca_mask(L, j, embeds.device))


def next_hidden(first: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """h_{k+1}[p] = out_k[p-1]; position 0 has no scenario, any finite filler will do."""
    return torch.cat((first[:, :1], out[:, :-1]), dim=1)
