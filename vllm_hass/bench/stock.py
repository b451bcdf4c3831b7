"""A copy of a head that stock vLLM's `method: "eagle"` loads, and what it loses.

Stock vLLM reads an EAGLE-1 head as a one-layer LlamaConfig with
architectures ["LlamaForCausalLM"]. Its fc has no bias and it has none of the
optional norms (layer 0's input_layernorm is replaced by identity), and it
misreads EAGLE's config key `"bias": true` as attention bias. So the copy drops
those weights and keys, and the bench says which ones: a HASS head that uses
them is then measured by stock vLLM as a different (worse) head.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from vllm_hass.head import OPTIONAL_WEIGHTS


def stock_copy(head_dir: str | os.PathLike, out: str | os.PathLike) -> tuple[Path, list[str]]:
    """Write OUT (config.json + model.safetensors); returns (OUT, dropped weight names)."""
    from safetensors.torch import save_file

    from vllm_hass.converters.layout import load_checkpoint

    ckpt = load_checkpoint(head_dir)
    dropped = sorted(w for w in OPTIONAL_WEIGHTS.values() if w in ckpt.weights)
    weights = {k: v.contiguous() for k, v in ckpt.weights.items() if k not in dropped}
    cfg = {k: v for k, v in ckpt.config.items() if k not in ("hass", "bias")}
    cfg.update(architectures=["LlamaForCausalLM"], model_type="llama", num_hidden_layers=1)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return out, dropped
