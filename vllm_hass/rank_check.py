"""Tensor parallelism: every rank must make the same tree choices, and a check that they do.

Under tensor parallelism each rank runs the whole step (vLLM V1: the same
scheduler output goes to every worker; only rank 0's sampled tokens and
drafts go back to the scheduler, but every rank keeps its own copy of the
trees, the accepted paths and the KV compaction). If two ranks chose
differently, their halves of the next forward would attend over different
masks and positions and the all-reduced activations would be garbage, with no
error. Why they do not:

- Every decision reads logits that are identical on all ranks: vLLM's
  `LogitsProcessor` all-gathers the vocabulary shards (`use_all_gather()` is
  true on CUDA and CPU), and the hidden states feeding it come out of
  all-reduces that leave the same bits on every rank (NCCL ring/tree, vLLM's
  custom all-reduce and the CPU communicator reduce each element once and
  distribute it). This is the guarantee vLLM's own sampler relies on at TP > 1.
- Every decision is a deterministic function of those logits: top-k, the
  EAGLE-2 rerank (a stable sort: ties keep storage order), greedy acceptance
  (argmax, then the deepest matching node) and the tree layout are
  pure tensor code with no atomics and no data-dependent reduction order.
- Random draws at T > 0 come from the same generators in the same order:
  seeded requests carry their own `torch.Generator` (same seed on every rank,
  from the same SamplingParams); unseeded rows use the global generator, which
  vLLM seeds identically on every worker (`seed`, default 0) and which every
  rank advances by the same calls because every rank runs the same code path.

The check: with `VLLM_HASS_CHECK_RANKS=1` in the environment (workers inherit
it), every step all-gathers a checksum of the verified trees, the accepted
paths and bonus tokens, and the newly drafted trees, and raises naming the
step and what differs. It costs one small collective and a device sync per
step: a debugging aid, off by default.
"""

from __future__ import annotations

import logging
import os

import torch

logger = logging.getLogger("vllm_hass")

ENV = "VLLM_HASS_CHECK_RANKS"
_MIX = 0x9E3779B1  # odd multiplier: position-dependent weights, overflow wraps deterministically


def enabled() -> bool:
    return os.environ.get(ENV, "") not in ("", "0")


def checksum(t: torch.Tensor | None) -> torch.Tensor:
    """int64 digest of an integer tensor's shape and values (order-sensitive)."""
    if t is None:
        return torch.tensor(-1, dtype=torch.int64)
    x = t.detach().flatten().to("cpu", torch.int64)
    w = torch.arange(1, x.numel() + 1, dtype=torch.int64) * _MIX
    return (x + 3).mul(w).sum() + x.numel() * 1_000_003 + t.dim()


class RankChecker:
    """Compares per-step digests across the tensor-parallel group."""

    def __init__(self):
        self.step = 0
        self._announced = False

    def __call__(self, **parts: torch.Tensor | None) -> None:
        from vllm.distributed import get_tp_group

        group = get_tp_group()
        self.step += 1
        if group.world_size == 1:
            return
        if not self._announced:
            logger.warning("vllm-hass: checking tree agreement across %d tensor-parallel ranks "
                           "every step (%s=1), rank %d", group.world_size, ENV, group.rank_in_group)
            self._announced = True
        names = list(parts)
        mine = torch.stack([checksum(parts[n]) for n in names]).unsqueeze(0)
        every = group.all_gather(mine.to(group.device), dim=0).cpu()  # [world, len(names)]
        differ = (every != every[0]).any(0)
        if bool(differ.any()):
            bad = [n for n, d in zip(names, differ.tolist()) if d]
            raise RuntimeError(
                f"vllm-hass: tensor-parallel ranks disagree at step {self.step} on {', '.join(bad)} "
                f"(digests per rank: {every[:, differ].tolist()}); see vllm_hass/rank_check.py"
            )
