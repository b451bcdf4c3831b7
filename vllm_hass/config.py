"""The `hass.json` speculative config: parsing and validation, before any engine starts.

    {"method": "hass", "model": DIR, "num_speculative_tokens": 3}              # chain
    {"method": "hass", "model": DIR,
     "tree": {"depth": 6, "top_k": 10, "total_tokens": 60}}                    # EAGLE-2 tree

It may be given as a dict, a JSON string or a path to a `.json` file; a
relative `model` in a file is resolved against the file's directory. Every
error is one line naming the field and the expected value.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vllm_hass.errors import UserError

METHOD = "hass"
# vLLM SpeculativeConfig fields that make sense for a HASS head and are passed through.
PASSTHROUGH = {
    "draft_tensor_parallel_size": int,
    "max_model_len": int,
    "revision": str,
    "code_revision": str,
    "quantization": str,
    "enforce_eager": bool,
}
TREE_KEYS = ("depth", "top_k", "total_tokens")
# The tree sampler emits at most this many tokens per step; vLLM's rejection
# sampler shares the bound (MAX_SPEC_LEN).
MAX_TREE_TOKENS = 128


@dataclass(frozen=True)
class TreeConfig:
    depth: int
    top_k: int
    total_tokens: int

    @property
    def max_drafts(self) -> int:
        """Tree nodes below the root: what vLLM schedules as speculative tokens."""
        return self.total_tokens - 1

    @property
    def scratch_nodes(self) -> int:
        """Draft-KV entries written while expanding (top_k per expansion step)."""
        return self.top_k * (self.depth - 1)

    def to_dict(self) -> dict[str, int]:
        return {"depth": self.depth, "top_k": self.top_k, "total_tokens": self.total_tokens}


@dataclass(frozen=True)
class HassSpec:
    model: str
    num_speculative_tokens: int
    tree: TreeConfig | None = None
    passthrough: dict[str, Any] = field(default_factory=dict)
    source: str = "speculative config"

    @property
    def draft_tree(self) -> TreeConfig:
        """What the proposer grows: a chain of k is the tree depth=k, top_k=1."""
        if self.tree is not None:
            return self.tree
        k = self.num_speculative_tokens
        return TreeConfig(depth=k, top_k=1, total_tokens=k + 1)

    def vllm_kwargs(self) -> dict[str, Any]:
        """What vLLM's SpeculativeConfig receives (method stays "hass": see vllm_patches)."""
        return {
            "method": METHOD,
            "model": self.model,
            "num_speculative_tokens": self.num_speculative_tokens,
            **self.passthrough,
        }


def load_raw(value: Any) -> tuple[dict, Path | None, str]:
    """dict | JSON string | path -> (dict, base dir for relative paths, where)."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if isinstance(value, dict):
        return dict(value), None, "speculative config"
    if not isinstance(value, str):
        raise UserError(
            f"speculative config: expected a JSON object, a JSON string or a path to a .json "
            f"file, got {type(value).__name__}"
        )
    text = value.strip()
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"speculative config: malformed JSON at column {e.colno}: {e.msg}") from None
        return data, None, "speculative config"
    path = Path(text).expanduser()
    if not path.exists():
        raise UserError(f"speculative config: '{text}' is neither JSON nor an existing file")
    if path.is_dir():
        raise UserError(f"speculative config: '{text}' is a directory, expected a .json file")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data, path.absolute().parent, str(path)


def load_spec_dict(value: Any) -> dict:
    """Any accepted form -> a dict whose relative `model` is resolved against its file."""
    data, base, _ = load_raw(value)
    model = data.get("model")
    if base is not None and isinstance(model, str) and not Path(model).expanduser().is_absolute():
        data["model"] = str((base / model).absolute())
    return data


def _int(where: str, key: str, v: Any, minimum: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise UserError(f"{where}: '{key}' must be an integer >= {minimum}, got {v!r}")
    if v < minimum:
        raise UserError(f"{where}: '{key}' must be an integer >= {minimum}, got {v}")
    return v


def parse_tree(where: str, tree: Any) -> TreeConfig:
    if not isinstance(tree, dict):
        raise UserError(f"{where}: 'tree' must be an object with {', '.join(TREE_KEYS)}, got {tree!r}")
    for key in tree:
        if key not in TREE_KEYS:
            raise UserError(f"{where}: unknown key 'tree.{key}' (expected {', '.join(TREE_KEYS)})")
    missing = [k for k in TREE_KEYS if k not in tree]
    if missing:
        raise UserError(f"{where}: 'tree.{missing[0]}' is required")
    depth = _int(where, "tree.depth", tree["depth"])
    top_k = _int(where, "tree.top_k", tree["top_k"])
    total = _int(where, "tree.total_tokens", tree["total_tokens"], minimum=2)
    if total > MAX_TREE_TOKENS:
        raise UserError(f"{where}: 'tree.total_tokens' must be <= {MAX_TREE_TOKENS}, got {total}")
    # Nodes drafted in total: top_k at depth 1, top_k*top_k candidates at each deeper level.
    drafted = top_k + (depth - 1) * top_k * top_k
    if total - 1 > drafted:
        raise UserError(
            f"{where}: 'tree.total_tokens' {total} exceeds 1 + the {drafted} nodes that depth "
            f"{depth} and top_k {top_k} can draft"
        )
    return TreeConfig(depth, top_k, total)


def parse_spec(value: Any) -> HassSpec:
    """Validate a HASS speculative config. Raises UserError (one line) on bad input."""
    data, base, where = load_raw(value)
    if data.get("method") != METHOD:
        raise UserError(f"{where}: 'method' must be \"{METHOD}\", got {data.get('method')!r}")
    allowed = {"method", "model", "num_speculative_tokens", "tree", *PASSTHROUGH}
    for key in data:
        if key not in allowed:
            raise UserError(
                f"{where}: unknown key '{key}' (method \"hass\" accepts: {', '.join(sorted(allowed))})"
            )
    if "model" not in data:
        raise UserError(f"{where}: 'model' is required (a directory made by `vllm-hass convert`)")
    model = data["model"]
    if not isinstance(model, str) or not model:
        raise UserError(f"{where}: 'model' must be a directory path string, got {model!r}")
    model_path = Path(model).expanduser()
    if not model_path.is_absolute() and base is not None:
        model_path = base / model_path
    check_model_dir(where, model_path)

    tree = parse_tree(where, data["tree"]) if "tree" in data else None
    if tree is None:
        if "num_speculative_tokens" not in data:
            raise UserError(f"{where}: 'num_speculative_tokens' is required without a 'tree'")
        k = _int(where, "num_speculative_tokens", data["num_speculative_tokens"])
    else:
        # vLLM reserves this many KV slots and schedules up to this many drafts per
        # step: enough for the tree's nodes and for the draft's expansion scratch.
        k = max(tree.max_drafts, tree.scratch_nodes)
        if "num_speculative_tokens" in data:
            given = _int(where, "num_speculative_tokens", data["num_speculative_tokens"])
            if given != tree.max_drafts:
                raise UserError(
                    f"{where}: 'num_speculative_tokens' is total_tokens - 1 = {tree.max_drafts} with "
                    f"a tree, got {given} (leave it out)"
                )
    passthrough = {}
    for key, typ in PASSTHROUGH.items():
        if key in data:
            v = data[key]
            if typ is int:
                v = _int(where, key, v)
            elif not isinstance(v, typ):
                raise UserError(f"{where}: '{key}' must be a {typ.__name__}, got {v!r}")
            passthrough[key] = v
    return HassSpec(str(model_path.absolute()), k, tree, passthrough, where)


def check_model_dir(where: str, path: Path) -> dict:
    """The head directory exists and was made for the plugin; returns its config."""
    from vllm_hass.converters.layout import PLUGIN_ARCH

    if not path.exists():
        raise UserError(f"{where}: 'model' {path} does not exist")
    if not path.is_dir():
        raise UserError(f"{where}: 'model' {path} is not a directory")
    cfg_path = path / "config.json"
    if not cfg_path.exists():
        raise UserError(f"{where}: 'model' {path} has no config.json")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{cfg_path}: malformed JSON at line {e.lineno}: {e.msg}") from None
    archs = cfg.get("architectures") or []
    if PLUGIN_ARCH not in archs:
        raise UserError(
            f"{cfg_path}: 'architectures' is {archs}, expected [\"{PLUGIN_ARCH}\"]; "
            f"run `vllm-hass convert {path} --target TARGET --out OUT` first"
        )
    if "bias" in cfg:
        raise UserError(
            f"{cfg_path}: key 'bias' would be read by vLLM as attention bias; "
            "re-convert with `vllm-hass convert`"
        )
    return cfg


def check_parallel(spec: HassSpec, tensor_parallel_size: int) -> None:
    """The head runs on the target's tensor-parallel group, sharded like the target:
    vLLM V1 builds EAGLE-type drafters on that group and would silently ignore any
    other draft_tensor_parallel_size (0.32/0.33 accept 1 there and still shard)."""
    dtp = spec.passthrough.get("draft_tensor_parallel_size")
    if dtp is not None and dtp != tensor_parallel_size:
        raise UserError(
            f"{spec.source}: 'draft_tensor_parallel_size' must equal the target's "
            f"tensor_parallel_size ({tensor_parallel_size}) for a HASS head, got {dtp} "
            "(leave it out: the head is sharded like the target)"
        )


def check_against_target(spec: HassSpec, target_hf_config) -> None:
    """Dims of the head vs the target, and its weights vs its own config (no tensors loaded)."""
    from vllm_hass.converters.convert import mismatches
    from vllm_hass.converters.layout import check_weights, head_config_from

    from safetensors import safe_open

    head_dir = Path(spec.model)
    cfg = json.loads((head_dir / "config.json").read_text())
    target = target_hf_config.to_dict() if hasattr(target_hf_config, "to_dict") else dict(target_hf_config)
    target = target.get("text_config", target) if isinstance(target.get("text_config"), dict) else target
    shapes = {}
    files = sorted(head_dir.glob("*.safetensors"))
    if not files:
        raise UserError(f"{head_dir}: no .safetensors weights (convert the head with `vllm-hass convert`)")

    class _Meta:  # shape-only stand-in, so check_weights runs without reading tensors
        def __init__(self, shape):
            self.shape = shape

    for f in files:
        with safe_open(str(f), "pt") as fh:
            for k in fh.keys():
                shapes[k] = _Meta(tuple(fh.get_slice(k).get_shape()))
    head = head_config_from(cfg, shapes, head_dir)
    check_weights(shapes, head, str(head_dir))
    declared = cfg.get("hass") or {}
    for flag, present in head.flags().items():
        if bool(declared.get(flag, False)) != present:
            raise UserError(
                f"{head_dir}/config.json: hass.{flag} is {bool(declared.get(flag, False))} but the "
                f"weights {'have' if present else 'lack'} it; re-convert with `vllm-hass convert`"
            )
    problems = mismatches(head, target)
    if problems:
        raise UserError(f"{head_dir} does not fit the target model: " + "; ".join(problems))


def tree_config(vllm_config) -> TreeConfig | None:
    """The engine's HASS tree (chains are trees with top_k = 1), or None when the engine
    does not run method "hass" or runs a chain on CUDA (vLLM's own EAGLE path). It
    travels to the workers on the draft's hf_config (vllm_patches, section 2)."""
    spec = getattr(vllm_config, "speculative_config", None)
    if spec is None or spec.method != "hass" or spec.draft_model_config is None:
        return None
    tree = getattr(spec.draft_model_config.hf_config, "hass_tree", None)
    return TreeConfig(**tree) if tree else None
