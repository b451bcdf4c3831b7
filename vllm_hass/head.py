"""The HASS / EAGLE-1 draft head in plain torch.

This is the reference definition that the trainer, the pure-torch EAGLE-2
oracle and the tests share. Serving inside vLLM uses `vllm_hass.draft_model`,
built from vLLM layers, over the same weights and the same names.

Layout (weight names are the plugin's on-disk format):
    x   = fc(cat(embed_norm?(embed(tok)), hidden_norm?(h_target)))     fc.weight [H,2H], fc.bias?
    x   = x + o_proj(attn(input_layernorm?(x)))                          layers.0.self_attn.*
    out = x + mlp(post_attention_layernorm(x))                           layers.0.mlp.*
    logits = lm_head(lm_head_norm?(out))                                 lm_head shared with the target
`out` is also the feature fed back as the next step's hidden input.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# Optional modules and the weight each one owns.
OPTIONAL_WEIGHTS = {
    "fc_bias": "fc.bias",
    "embed_norm": "embed_norm.weight",
    "hidden_norm": "hidden_norm.weight",
    "input_layernorm": "layers.0.input_layernorm.weight",
    "lm_head_norm": "lm_head_norm.weight",
}

LLAMA_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "max_position_embeddings",
    "vocab_size",
    "hidden_act",
)


@dataclasses.dataclass
class HeadConfig:
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    hidden_act: str = "silu"
    fc_bias: bool = False
    embed_norm: bool = False
    hidden_norm: bool = False
    input_layernorm: bool = False
    lm_head_norm: bool = False
    # Size of the reduced draft vocabulary stored with the head (vocab.py); 0 = none. Only
    # the weight checks read it: HassHead.logits uses whatever lm_head rows it is given.
    draft_vocab_size: int = 0

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "HeadConfig":
        """From a plugin config.json (LlamaConfig keys + a `hass` section)."""
        kw = {k: d[k] for k in LLAMA_KEYS if d.get(k) is not None}
        # transformers >= 5 moves rope_theta into rope_parameters
        rp = d.get("rope_parameters") or {}
        if "rope_theta" not in kw and "rope_theta" in rp:
            kw["rope_theta"] = rp["rope_theta"]
        if "rope_scaling" not in kw and rp.get("rope_type", "default") != "default":
            kw["rope_scaling"] = {k: v for k, v in rp.items() if k != "rope_theta"}
        flags = d.get("hass", {})
        for name in OPTIONAL_WEIGHTS:
            if name in flags:
                kw[name] = bool(flags[name])
        from vllm_hass.vocab import stored_size

        return cls(**kw, draft_vocab_size=stored_size(d))

    def llama_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in LLAMA_KEYS if getattr(self, k) is not None}

    def flags(self) -> dict[str, bool]:
        return {name: getattr(self, name) for name in OPTIONAL_WEIGHTS}

    def llama_config(self):
        from transformers import LlamaConfig

        return LlamaConfig(num_hidden_layers=1, **self.llama_dict())


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Rotary(nn.Module):
    """RoPE with the target's settings (llama3 / linear / dynamic scaling via transformers)."""

    def __init__(self, cfg: HeadConfig):
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        self.impl = LlamaRotaryEmbedding(cfg.llama_config())

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor):
        cos, sin = self.impl(x, position_ids)  # [B, T, D]
        return cos.unsqueeze(1), sin.unsqueeze(1)


class Attention(nn.Module):
    def __init__(self, cfg: HeadConfig):
        super().__init__()
        d, nh, nkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim, self.num_heads, self.num_kv_heads = d, nh, nkv
        self.q_proj = nn.Linear(cfg.hidden_size, nh * d, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, nkv * d, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, nkv * d, bias=False)
        self.o_proj = nn.Linear(nh * d, cfg.hidden_size, bias=False)

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x [B,T,H] -> q [B,nh,T,D], k, v [B,nkv,T,D] with RoPE applied."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        return q, k, v

    def attend(self, q, k, v, mask: torch.Tensor | None) -> torch.Tensor:
        """q [B,nh,T,D], k/v [B,nkv,S,D], mask bool [B or 1, 1, T, S] (True = attend)."""
        rep = self.num_heads // self.num_kv_heads
        if rep > 1:
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        # at least float32 for the softmax; float64 stays float64 (exactness tests)
        acc = torch.promote_types(q.dtype, torch.float32)
        scores = (q.to(acc) @ k.to(acc).transpose(-1, -2)) / math.sqrt(self.head_dim)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        probs = scores.softmax(-1)
        out = (probs @ v.to(acc)).to(q.dtype)
        B, _, T, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: HeadConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: HeadConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.input_layernorm = (
            RMSNorm(cfg.hidden_size, cfg.rms_norm_eps) if cfg.input_layernorm else nn.Identity()
        )


class HassHead(nn.Module):
    def __init__(self, cfg: HeadConfig):
        super().__init__()
        self.config = cfg
        H, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.fc = nn.Linear(2 * H, H, bias=cfg.fc_bias)
        self.layers = nn.ModuleList([DecoderLayer(cfg)])
        self.embed_norm = RMSNorm(H, eps) if cfg.embed_norm else None
        self.hidden_norm = RMSNorm(H, eps) if cfg.hidden_norm else None
        self.lm_head_norm = RMSNorm(H, eps) if cfg.lm_head_norm else None
        self.rotary = Rotary(cfg)

    # Pieces, so the trainer can run harmonized context alignment with its own K/V.
    def fuse(self, embeds: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        if self.embed_norm is not None:
            embeds = self.embed_norm(embeds)
        if self.hidden_norm is not None:
            hidden = self.hidden_norm(hidden)
        return self.fc(torch.cat((embeds, hidden.to(embeds.dtype)), dim=-1))

    def qkv(self, x: torch.Tensor, position_ids: torch.Tensor):
        layer = self.layers[0]
        cos, sin = self.rotary(x, position_ids)
        return layer.self_attn.project(layer.input_layernorm(x), cos.to(x.dtype), sin.to(x.dtype))

    def finish(self, x: torch.Tensor, q, k, v, mask) -> torch.Tensor:
        layer = self.layers[0]
        x = x + layer.self_attn.attend(q, k, v, mask)
        return x + layer.mlp(layer.post_attention_layernorm(x))

    def forward(
        self,
        embeds: torch.Tensor,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        mask: torch.Tensor | None = None,
        past_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        """embeds/hidden [B,T,H], position_ids [B,T].

        past_kv: (k, v) [B,nkv,S0,D] already rotated. mask: bool [B,1,T,S0+T]; None means
        causal with the T new tokens after the S0 cached ones.
        Returns (out [B,T,H], (k_new, v_new) [B,nkv,T,D]) — the caller owns the cache.
        """
        x = self.fuse(embeds, hidden)
        q, k, v = self.qkv(x, position_ids)
        k_all, v_all = k, v
        if past_kv is not None:
            k_all = torch.cat((past_kv[0], k), dim=2)
            v_all = torch.cat((past_kv[1], v), dim=2)
        if mask is None:
            T, S = x.shape[1], k_all.shape[2]
            mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(S - T)[None, None]
        return self.finish(x, q, k_all, v_all, mask), (k, v)

    def logits(self, out: torch.Tensor, lm_head_weight: torch.Tensor) -> torch.Tensor:
        if self.lm_head_norm is not None:
            out = self.lm_head_norm(out)
        return out @ lm_head_weight.t().to(out.dtype)

    # Weights in the plugin format ------------------------------------------------
    def head_state_dict(self) -> dict[str, torch.Tensor]:
        """State dict under the plugin's names (no rotary buffers)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("rotary.")}

    def load_head_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        missing, unexpected = self.load_state_dict(sd, strict=False)
        missing = [m for m in missing if not m.startswith("rotary.")]
        unexpected = [u for u in unexpected if u not in ("embed_tokens.weight", "lm_head.weight")]
        if missing or unexpected:
            raise ValueError(f"head weights do not match: missing {missing}, unexpected {unexpected}")
