"""Reading draft-head checkpoints as the HASS and EAGLE-1/2 repos save them, and
the plugin's own format.

Source layouts handled:
- weights in `pytorch_model.bin` or `model.safetensors`, single file or sharded
  (`*.index.json` with a `weight_map`);
- names as EAGLE's `cnets.py` saves them (`fc.*`, `layers.0.*`, optional
  `embed_tokens.weight`), optionally under a `model.`/`ea_layer.`/`module.` prefix;
- optional norms under the names the HASS/EAGLE forks and vLLM speculators use;
- a LlamaConfig `config.json`, with or without EAGLE's `bias` key.

Everything is read-only: nothing under the source directory is ever written.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vllm_hass.errors import UserError
from vllm_hass.head import OPTIONAL_WEIGHTS, HeadConfig
from vllm_hass.vocab import TENSORS as VOCAB_TENSORS
from vllm_hass.vocab import check_tensors, stored_size

PLUGIN_ARCH = "EagleHassLlamaForCausalLM"
FORMAT_VERSION = 1

# Required weights of the single decoder layer, relative to "layers.0.".
LAYER_WEIGHTS = (
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
    "post_attention_layernorm.weight",
)
REQUIRED = ("fc.weight",) + tuple("layers.0." + w for w in LAYER_WEIGHTS)
SHARED = ("embed_tokens.weight", "lm_head.weight")

# Other names for the optional norms -> the plugin's name.
ALIASES = {
    "embed_layernorm.weight": "embed_norm.weight",
    "embedding_layernorm.weight": "embed_norm.weight",
    "enorm.weight": "embed_norm.weight",
    "hnorm.weight": "hidden_norm.weight",
    "hidden_layernorm.weight": "layers.0.input_layernorm.weight",
    "lm_head_layernorm.weight": "lm_head_norm.weight",
    "pre_lm_head_layernorm.weight": "lm_head_norm.weight",
    "norm.weight": "lm_head_norm.weight",
}
PREFIXES = ("model.", "ea_layer.", "module.")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


@dataclass
class Checkpoint:
    path: Path
    config: dict
    weights: dict[str, torch.Tensor]
    layout: str  # "plugin" or "eagle"
    files: list[str] = field(default_factory=list)
    renamed: dict[str, str] = field(default_factory=dict)

    @property
    def head_config(self) -> HeadConfig:
        return head_config_from(self.config, self.weights, self.path)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError:  # a binary file: json.loads never sees it
        raise UserError(f"{path}: not a JSON text file (not UTF-8)") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def load_plain_pickle(path: Path, what: str = "weights"):
    """torch.load with weights_only=True: only tensors and plain containers are unpickled,
    never code. Anything else is one line (torch's own text is a paragraph that advises
    weights_only=False; its protocol warning would break the line too)."""
    import pickle
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        why = " ".join(ln.strip() for ln in str(e).splitlines()[1:] if ln.strip() and not ln.startswith(
            ("Please file", "Check the documentation")))
        raise UserError(f"{path}: refused: the pickle holds objects other than tensors ({why}); "
                        f"unpickling it could run code, so the {what} are not loaded") from None
    except Exception as e:  # corrupt or truncated file
        raise UserError(f"{path}: cannot load {what} ({type(e).__name__}: {' '.join(str(e).split())})") from None


def _load_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix != ".safetensors":
        sd = load_plain_pickle(path)
    else:
        from safetensors.torch import load_file

        try:
            sd = load_file(str(path))
        except Exception as e:  # corrupt or truncated weight file
            raise UserError(f"{path}: cannot load weights ({type(e).__name__}: {' '.join(str(e).split())})") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"{path}: expected a dict of tensors (a state dict), got {type(sd).__name__}")
    return sd


def weight_files(src: Path) -> list[Path]:
    for name in INDEX_FILES:
        index = src / name
        if index.exists():
            wm = _read_json(index).get("weight_map")
            if not isinstance(wm, dict) or not wm:
                raise UserError(f"{index}: field 'weight_map' must be a non-empty object")
            for f in wm.values():  # shards live in SRC: never read a file outside it
                if not isinstance(f, str) or not f or os.path.isabs(f) or ".." in Path(f).parts:
                    raise UserError(f"{index}: weight_map names shard {f!r}; expected a file name "
                                    f"inside {src}")
            files = [src / f for f in sorted(set(wm.values()))]
            for f in files:
                if not f.exists():
                    raise UserError(f"{index}: shard '{f.name}' listed in weight_map does not exist")
            return files
    for name in WEIGHT_FILES:
        if (src / name).exists():
            return [src / name]
    raise UserError(
        f"{src}: no weights found (expected one of {', '.join(WEIGHT_FILES + INDEX_FILES)})"
    )


def load_checkpoint(src: str | os.PathLike) -> Checkpoint:
    src = Path(src)
    if not src.exists():
        raise UserError(f"{src}: no such directory")
    if not src.is_dir():
        raise UserError(f"{src}: expected a checkpoint directory, got a file")
    if not (src / "config.json").exists():
        raise UserError(f"{src}: missing config.json")
    config = _read_json(src / "config.json")
    files = weight_files(src)
    raw: dict[str, torch.Tensor] = {}
    for f in files:
        raw.update(_load_file(f))
    layout = "plugin" if PLUGIN_ARCH in (config.get("architectures") or []) else "eagle"
    weights, renamed = canonical_names(raw, src)
    return Checkpoint(src, config, weights, layout, [f.name for f in files], renamed)


def canonical_names(raw: dict[str, torch.Tensor], src: Path):
    """Strip a common wrapper prefix and map norm aliases to the plugin's names."""
    keys = list(raw)
    for prefix in PREFIXES:
        if keys and all(k.startswith(prefix) or k in SHARED for k in keys) and any(
            k.startswith(prefix) for k in keys
        ):
            raw = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in raw.items()}
            break
    out: dict[str, torch.Tensor] = {}
    renamed: dict[str, str] = {}
    for k, v in raw.items():
        name = ALIASES.get(k, k)
        if name != k:
            renamed[k] = name
        if name in out:
            raise UserError(f"{src}: weight '{name}' appears twice (as '{k}' too)")
        out[name] = v
    return out, renamed


def _get(config: dict, key: str, path: Path, default=None):
    v = config.get(key, default)
    if v is None:
        raise UserError(f"{path}/config.json: missing field '{key}'")
    return v


def _dim(config: dict, key: str, path: Path, default=None):
    """A size field: a positive integer (a string or 0 would fail later, as a traceback)."""
    v = _get(config, key, path, default)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise UserError(f"{path}/config.json: field '{key}' must be a positive integer, got {v!r}")
    return v


def head_config_from(config: dict, weights: dict[str, torch.Tensor], path: Path) -> HeadConfig:
    """Shapes from config.json, optional modules from which weights are present."""
    H = _dim(config, "hidden_size", path)
    nh = _dim(config, "num_attention_heads", path)
    for key in ("num_key_value_heads", "head_dim"):
        if config.get(key) is not None:
            _dim(config, key, path)
    rp = config.get("rope_parameters") or {}
    rope_scaling = config.get("rope_scaling")
    if rope_scaling is None and rp.get("rope_type", "default") != "default":
        rope_scaling = {k: v for k, v in rp.items() if k != "rope_theta"}
    cfg = HeadConfig(
        hidden_size=H,
        intermediate_size=_dim(config, "intermediate_size", path),
        num_attention_heads=nh,
        num_key_value_heads=config.get("num_key_value_heads") or nh,
        vocab_size=_dim(config, "vocab_size", path),
        head_dim=config.get("head_dim") or H // nh,
        rms_norm_eps=config.get("rms_norm_eps", 1e-5),
        rope_theta=config.get("rope_theta", rp.get("rope_theta", 10000.0)),
        rope_scaling=rope_scaling,
        max_position_embeddings=config.get("max_position_embeddings", 2048),
        hidden_act=config.get("hidden_act", "silu"),
        draft_vocab_size=stored_size(config),
    )
    for flag, name in OPTIONAL_WEIGHTS.items():
        setattr(cfg, flag, name in weights)
    return cfg


def expected_shapes(cfg: HeadConfig) -> dict[str, tuple[int, ...]]:
    H, I, D = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    shapes = {
        "fc.weight": (H, 2 * H),
        "layers.0.self_attn.q_proj.weight": (nh * D, H),
        "layers.0.self_attn.k_proj.weight": (nkv * D, H),
        "layers.0.self_attn.v_proj.weight": (nkv * D, H),
        "layers.0.self_attn.o_proj.weight": (H, nh * D),
        "layers.0.mlp.gate_proj.weight": (I, H),
        "layers.0.mlp.up_proj.weight": (I, H),
        "layers.0.mlp.down_proj.weight": (H, I),
        "layers.0.post_attention_layernorm.weight": (H,),
        "embed_tokens.weight": (cfg.vocab_size, H),
        "lm_head.weight": (cfg.vocab_size, H),
    }
    for name in OPTIONAL_WEIGHTS.values():
        shapes[name] = (H,)
    return shapes


def check_values(weights: dict[str, torch.Tensor], cfg: HeadConfig, where: str) -> None:
    """The head's weights are floating point and finite: convert would cast int weights
    silently, and a NaN/Inf weight makes every draft garbage (or NaN probabilities)."""
    for name in sorted(set(weights) & set(expected_shapes(cfg))):
        t = weights[name]
        if not t.is_floating_point():
            raise UserError(f"{where}: weight '{name}' has dtype {str(t.dtype).removeprefix('torch.')}, "
                            "expected a floating-point dtype (float32, float16 or bfloat16)")
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise UserError(f"{where}: weight '{name}' has {bad} NaN/Inf values, expected finite values")


def check_weights(weights: dict[str, torch.Tensor], cfg: HeadConfig, where: str) -> None:
    """Strict: every weight known, present when required, and of the right shape; the
    draft vocabulary's d2t/t2d (draft_vocab.safetensors) as config.json declares it."""
    shapes = expected_shapes(cfg)
    check_tensors(weights, cfg.draft_vocab_size, cfg.vocab_size, where)
    unknown = sorted(k for k in weights if k not in shapes and k not in VOCAB_TENSORS)
    if unknown:
        raise UserError(
            f"{where}: unexpected weight '{unknown[0]}'"
            + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else "")
            + "; an EAGLE-1/HASS head has fc.*, layers.0.*, optional embed_tokens/lm_head and "
            "norms, and d2t/t2d in draft_vocab.safetensors"
        )
    for name in REQUIRED:
        if name not in weights:
            raise UserError(f"{where}: missing weight '{name}'")
    for name, t in weights.items():
        if name not in VOCAB_TENSORS and tuple(t.shape) != shapes[name]:
            raise UserError(
                f"{where}: weight '{name}' has shape {list(t.shape)}, expected {list(shapes[name])}"
            )
