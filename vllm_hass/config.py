"""The `hass.json` speculative config: parsing and validation, before any engine starts.

    {"method": "hass", "model": DIR, "num_speculative_tokens": 3}              # chain
    {"method": "hass", "model": DIR,
     "tree": {"depth": 6, "top_k": 10, "total_tokens": 60}}                    # EAGLE-2 tree
    {"method": "hass", "model": DIR, "tree": "auto"}                           # chosen per step
    {"method": "hass", "model": DIR,
     "tree": {"auto": true, "max_depth": 6, "max_top_k": 10, "max_total_tokens": 60}}

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
# "tree": "auto" (vllm_hass/auto_tree.py): the bounds of the shapes chosen per step, and
# their defaults (the paper's tree: the largest shape the runner's buffers are sized for)
AUTO_KEYS = ("auto", "max_depth", "max_top_k", "max_total_tokens")
AUTO_DEFAULTS = {"max_depth": 6, "max_top_k": 10, "max_total_tokens": 60}
# The tree sampler emits at most this many tokens per step; vLLM's rejection
# sampler shares the bound (MAX_SPEC_LEN).
MAX_TREE_TOKENS = 128


@dataclass(frozen=True)
class TreeConfig:
    """A fixed tree, or with `auto` the bounds (largest depth, top_k, total_tokens) of the
    shapes "tree": "auto" chooses from each step: every buffer, vLLM's speculative-token
    count and KV lookahead are sized for the bound."""

    depth: int
    top_k: int
    total_tokens: int
    auto: bool = False

    @property
    def max_drafts(self) -> int:
        """Tree nodes below the root: what vLLM schedules as speculative tokens."""
        return self.total_tokens - 1

    @property
    def scratch_nodes(self) -> int:
        """Draft-KV entries written while expanding (top_k per expansion step)."""
        return self.top_k * (self.depth - 1)

    def to_dict(self) -> dict[str, int]:
        d = {"depth": self.depth, "top_k": self.top_k, "total_tokens": self.total_tokens}
        if self.auto:
            d["auto"] = True
        return d


def max_tree_tokens(depth: int, top_k: int) -> int:
    """1 + the nodes depth levels of top_k can draft (top_k at depth 1, top_k**2 below)."""
    return 1 + top_k + (depth - 1) * top_k * top_k


def auto_bounds(depth: int, top_k: int, total: int) -> TreeConfig:
    """The largest auto shape within the bounds: a bound no shape can reach is lowered to
    what the others allow (depth <= total - 1; total <= what depth and top_k can draft)."""
    depth = min(depth, total - 1)
    return TreeConfig(depth, top_k, min(total, max_tree_tokens(depth, top_k)), auto=True)


@dataclass(frozen=True)
class HassSpec:
    model: str
    num_speculative_tokens: int
    tree: TreeConfig | None = None
    passthrough: dict[str, Any] = field(default_factory=dict)
    source: str = "speculative config"
    # Rows of the draft vocabulary the head drafts from (a prefix of the one stored with
    # the head, most frequent first); 0 = the target's full vocabulary.
    draft_vocab_size: int = 0

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
    except UnicodeDecodeError:  # a binary file would otherwise end in a traceback
        raise UserError(f"{path}: not a JSON text file (not UTF-8)") from None
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


def parse_auto_tree(where: str, tree: dict) -> TreeConfig:
    """`"tree": "auto"` or `{"auto": true, "max_depth": D, "max_top_k": K,
    "max_total_tokens": T}` (each bound optional, AUTO_DEFAULTS)."""
    for key in tree:
        if key not in AUTO_KEYS:
            raise UserError(f"{where}: unknown key 'tree.{key}' with 'tree.auto' (expected "
                            f"{', '.join(AUTO_KEYS)})")
    if tree["auto"] is not True:
        raise UserError(f"{where}: 'tree.auto' must be true (or leave it out for a fixed tree), "
                        f"got {tree['auto']!r}")
    b = {k: tree.get(k, v) for k, v in AUTO_DEFAULTS.items()}
    depth = _int(where, "tree.max_depth", b["max_depth"])
    top_k = _int(where, "tree.max_top_k", b["max_top_k"])
    total = _int(where, "tree.max_total_tokens", b["max_total_tokens"], minimum=2)
    if total > MAX_TREE_TOKENS:
        raise UserError(f"{where}: 'tree.max_total_tokens' must be <= {MAX_TREE_TOKENS}, got {total}")
    return auto_bounds(depth, top_k, total)


def parse_tree(where: str, tree: Any) -> TreeConfig:
    if tree == "auto":
        tree = {"auto": True}
    if isinstance(tree, dict) and "auto" in tree:
        return parse_auto_tree(where, tree)
    if not isinstance(tree, dict):
        raise UserError(f"{where}: 'tree' must be an object with {', '.join(TREE_KEYS)} (or \"auto\"), "
                        f"got {tree!r}")
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
    # A node at depth d needs its d - 1 ancestors in the tree: deeper levels can never be
    # kept, and each would still cost top_k scratch slots (depth 10**6 asked vLLM for
    # millions of speculative tokens).
    if depth > total - 1:
        raise UserError(f"{where}: 'tree.depth' must be <= total_tokens - 1 = {total - 1}, got {depth}")
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
    allowed = {"method", "model", "num_speculative_tokens", "tree", "draft_vocab_size", *PASSTHROUGH}
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
    head_cfg = check_model_dir(where, model_path)

    tree = parse_tree(where, data["tree"]) if "tree" in data else None
    if tree is None:
        if "num_speculative_tokens" not in data:
            raise UserError(f"{where}: 'num_speculative_tokens' is required without a 'tree'")
        k = _int(where, "num_speculative_tokens", data["num_speculative_tokens"])
        # a chain of k is the tree depth k, top_k 1: k + 1 tokens per step, the same bound
        if k > MAX_TREE_TOKENS - 1:
            raise UserError(f"{where}: 'num_speculative_tokens' must be <= {MAX_TREE_TOKENS - 1}, got {k}")
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
    top_k = tree.top_k if tree is not None else 1
    # auto's default max_top_k (not a user's) is lowered to a smaller vocabulary
    default_k = tree is not None and tree.auto and not (
        isinstance(data["tree"], dict) and "max_top_k" in data["tree"])
    vocab = resolve_draft_vocab(where, data.get("draft_vocab_size"), head_cfg, model_path,
                                1 if default_k else top_k)
    rows = vocab or head_cfg.get("vocab_size")
    if default_k and isinstance(rows, int) and top_k > rows:
        tree = auto_bounds(tree.depth, rows, tree.total_tokens)
        top_k, k = tree.top_k, max(tree.max_drafts, tree.scratch_nodes)
    if isinstance(rows, int) and top_k > rows:  # torch.topk would fail inside the engine
        name = "tree.max_top_k" if tree is not None and tree.auto else "tree.top_k"
        raise UserError(f"{where}: '{name}' must be <= the head's vocabulary ({rows}), got {top_k}")
    mml = passthrough.get("max_model_len")
    if mml is not None and k + 1 >= mml:  # the drafter needs last position + 1 + k < max_model_len
        raise UserError(f"{where}: 'max_model_len' must be > {k + 1} (the drafts need {k + 1} "
                        f"positions after the prompt), got {mml}")
    return HassSpec(str(model_path.absolute()), k, tree, passthrough, where, vocab)


def resolve_draft_vocab(where: str, value: Any, head_cfg: dict, head_dir: Path, top_k: int) -> int:
    """hass.json's `draft_vocab_size` against the head: absent -> the stored vocabulary
    whole (or the full one when the head has none), 0 -> the full vocabulary, n -> the n
    most frequent tokens of the stored one."""
    from vllm_hass.vocab import stored_size

    stored = stored_size(head_cfg)
    if value is None:
        return stored
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UserError(f"{where}: 'draft_vocab_size' must be an integer >= 0 (0 = full vocabulary), "
                        f"got {value!r}")
    if value == 0:
        return 0
    if stored == 0:
        raise UserError(f"{where}: 'draft_vocab_size' is {value} but {head_dir} has no draft vocabulary "
                        f"(build one with `vllm-hass vocab`, or use 0 for the full vocabulary)")
    if value > stored:
        raise UserError(f"{where}: 'draft_vocab_size' must be <= {stored} (the vocabulary stored with "
                        f"{head_dir}) or 0, got {value}")
    if value < top_k:
        raise UserError(f"{where}: 'draft_vocab_size' must be >= the tree's top_k ({top_k}) or 0, "
                        f"got {value}")
    return value


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
    except UnicodeDecodeError:
        raise UserError(f"{cfg_path}: not a JSON text file (not UTF-8)") from None
    if not isinstance(cfg, dict):  # cfg.get below would raise AttributeError
        raise UserError(f"{cfg_path}: expected a JSON object, got {type(cfg).__name__}")
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
