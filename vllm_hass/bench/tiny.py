"""A tiny target + head + spec on disk, for the bench's tests and a first CPU run.

`head="identity"` against a bigram target drafts the target's greedy token every
time (tau = k + 1). `context` < 1 scales the target's o_proj/down_proj down from a
random Llama (1.0) towards a bigram (0.0): its next token then mostly, but not
always, follows the current one, so an identity head is often but not always right.
`sharp` scales q_proj/k_proj (target and random head): random init attends almost
uniformly, which hides wrong positions and masks; sharp attention does not. `noise` mixes a random matrix into the head's fc so that it is
only sometimes right, which gives acceptance strictly between 0 and 1 and lets a
tree beat a chain. `head="random"` is a head that knows nothing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from vllm_hass import fixtures
from vllm_hass.converters.convert import write_plugin_checkpoint


def noisy_identity_state(cfg, scale: float, noise: float, seed: int = 0) -> dict[str, torch.Tensor]:
    sd = fixtures.identity_head_state(cfg, scale=scale, seed=seed)
    H = cfg.hidden_size
    g = torch.Generator().manual_seed(seed + 1)
    sd["fc.weight"][:, :H] += scale * noise * torch.randn(H, H, generator=g) / H**0.5
    return sd


def _scale(sd: dict, suffixes: tuple[str, ...], factor: float) -> dict:
    return {k: (v * factor).contiguous() if k.endswith(suffixes) else v for k, v in sd.items()}


def write_tiny(
    out: str | os.PathLike,
    *,
    bigram: bool = True,
    context: float = 1.0,
    sharp: float = 1.0,
    head: str = "identity",
    scale: float = 2e4,
    noise: float = 0.0,
    k: int = 3,
    tree: dict | None = None,
    seed: int = 0,
    **shape,
) -> tuple[Path, Path, Path]:
    """Writes OUT/target, OUT/head (plugin format, float32) and OUT/head/hass.json.

    Returns (target_dir, head_dir, spec_path).
    """
    out = Path(out)
    target = fixtures.make_target(out / "target", bigram=bigram, seed=seed, context=context,
                                  sharp=sharp, **shape)
    tcfg = fixtures.target_config(target)
    cfg = fixtures.head_config_for(tcfg)
    if head == "identity":
        weights = noisy_identity_state(cfg, scale, noise, seed)
    elif head == "random":
        weights = _scale(fixtures.random_head_state(cfg, seed), fixtures.QK, sharp)
    else:
        raise ValueError(f"head: expected 'identity' or 'random', got {head!r}")
    head_dir = write_plugin_checkpoint(
        out / "head", cfg, weights, target=tcfg, dtype="float32", force=True,
        num_speculative_tokens=k,
    )
    spec = head_dir / "hass.json"
    if tree:  # with a tree the plugin derives num_speculative_tokens itself
        spec.write_text(json.dumps({"method": "hass", "model": ".", "tree": tree}, indent=2) + "\n")
    return target, head_dir, spec


