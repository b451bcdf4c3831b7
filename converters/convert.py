"""Convert a HASS/EAGLE-1/2 head into a vLLM-ready plugin directory.

OUT gets `model.safetensors` (canonical names), a `config.json` naming the
plugin's architecture (and no EAGLE `bias` key, which vLLM would misread as
attention bias), and a ready `hass.json`. OUT is written to a temporary
sibling and renamed into place, so a failure never leaves a half-written
directory; an existing OUT is only replaced with `force=True`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from vllm_hass.errors import UserError
from vllm_hass.head import HeadConfig

from .layout import FORMAT_VERSION, PLUGIN_ARCH, Checkpoint, check_weights, load_checkpoint

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEFAULT_SPEC_TOKENS = 3


def target_config(target: str | os.PathLike) -> dict:
    path = Path(target)
    if not path.exists():
        raise UserError(f"--target {target}: no such directory")
    cfg_path = path / "config.json" if path.is_dir() else path
    if not cfg_path.exists():
        raise UserError(f"--target {target}: missing config.json")
    from .layout import _read_json

    cfg = _read_json(cfg_path)
    # Multimodal wrappers keep the language model's settings in text_config.
    return cfg.get("text_config", cfg)


def _rope(cfg: dict) -> tuple[float, dict | None]:
    rp = cfg.get("rope_parameters") or {}
    theta = cfg.get("rope_theta", rp.get("rope_theta", 10000.0))
    scaling = cfg.get("rope_scaling")
    if scaling is None and rp.get("rope_type", "default") != "default":
        scaling = {k: v for k, v in rp.items() if k != "rope_theta"}
    return float(theta), scaling


def mismatches(head: HeadConfig, target: dict) -> list[str]:
    """Every field where the head cannot serve the target, with both values."""
    t_nh = target.get("num_attention_heads")
    t = {
        "hidden_size": target.get("hidden_size"),
        "vocab_size": target.get("vocab_size"),
        "num_attention_heads": t_nh,
        "num_key_value_heads": target.get("num_key_value_heads") or t_nh,
        "head_dim": target.get("head_dim") or (target["hidden_size"] // t_nh if t_nh else None),
    }
    out = []
    for key, tv in t.items():
        hv = getattr(head, key)
        if tv is not None and hv != tv:
            out.append(f"{key}: head {hv}, target {tv}")
    t_theta, t_scaling = _rope(target)
    if float(head.rope_theta) != t_theta:
        out.append(f"rope_theta: head {head.rope_theta}, target {t_theta}")
    if (head.rope_scaling or None) != (t_scaling or None):
        out.append(f"rope_scaling: head {head.rope_scaling}, target {t_scaling}")
    return out


def plugin_config(head: HeadConfig, *, kind: str, dtype: str, target: dict | None,
                  has_embed: bool, has_lm_head: bool, source: str) -> dict:
    cfg = {
        "architectures": [PLUGIN_ARCH],
        "model_type": "llama",
        "num_hidden_layers": 1,
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
        **head.llama_dict(),
    }
    if target is not None:
        # EAGLE configs often say 2048 while the target serves longer contexts; the
        # draft shares the target's positions.
        cfg["max_position_embeddings"] = max(
            head.max_position_embeddings, target.get("max_position_embeddings") or 0
        )
        for key in ("bos_token_id", "eos_token_id"):
            if key in target:
                cfg[key] = target[key]
    cfg["hass"] = {
        "format": FORMAT_VERSION,
        "kind": kind,
        **head.flags(),
        "has_embed_tokens": has_embed,
        "has_lm_head": has_lm_head,
        "source": source,
    }
    return cfg


def write_plugin_checkpoint(
    out: str | os.PathLike,
    head: HeadConfig,
    weights: dict[str, torch.Tensor],
    *,
    kind: str = "hass",
    dtype: str = "bfloat16",
    target: dict | None = None,
    source: str = "",
    force: bool = False,
    num_speculative_tokens: int = DEFAULT_SPEC_TOKENS,
    tree: dict | None = None,
) -> Path:
    """Write OUT atomically: weights, config.json and hass.json (model: ".")."""
    from safetensors.torch import save_file

    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: expected one of {', '.join(DTYPES)}")
    out = Path(out).absolute()
    if out.exists() and not force:
        raise UserError(f"{out}: already exists (pass --force to replace it)")
    check_weights(weights, head, "weights")
    tensors = {k: v.detach().to(DTYPES[dtype]).contiguous() for k, v in sorted(weights.items())}
    cfg = plugin_config(head, kind=kind, dtype=dtype, target=target,
                        has_embed="embed_tokens.weight" in tensors,
                        has_lm_head="lm_head.weight" in tensors, source=source)
    spec = {"method": "hass", "model": "."}
    if tree:
        spec["tree"] = tree  # vLLM's token budget follows from the tree
    else:
        spec["num_speculative_tokens"] = num_speculative_tokens
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        (tmp / "hass.json").write_text(json.dumps(spec, indent=2) + "\n")
        # mkdtemp makes a private directory (and safetensors a private file); the result
        # should carry the permissions any directory the user creates would have
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)
        for f in tmp.iterdir():
            f.chmod(0o666 & ~umask)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def convert(src: str | os.PathLike, target: str | os.PathLike, out: str | os.PathLike, *,
            dtype: str | None = None, force: bool = False, rope_from: str | None = None,
            num_speculative_tokens: int = DEFAULT_SPEC_TOKENS,
            drop_shared_if_identical: bool = True) -> tuple[Path, list[str]]:
    """Returns (OUT, notes). Raises UserError with every mismatch against the target."""
    ckpt: Checkpoint = load_checkpoint(src)
    head = ckpt.head_config
    check_weights(ckpt.weights, head, str(ckpt.path))
    tcfg = target_config(target)
    notes = [f"{k} -> {v}" for k, v in ckpt.renamed.items()]
    if rope_from == "target":
        head.rope_theta, head.rope_scaling = _rope(tcfg)
    problems = mismatches(head, tcfg)
    if rope_from == "head":
        problems = [p for p in problems if not p.startswith("rope_")]
    if problems:
        hint = " (pass --rope-from head|target to choose)" if any(
            p.startswith("rope_") for p in problems) else ""
        raise UserError(f"{src} does not fit target {target}: " + "; ".join(problems) + hint)
    target_dtype = str(tcfg.get("torch_dtype") or tcfg.get("dtype") or "bfloat16")
    dtype = dtype or (target_dtype if target_dtype in DTYPES else "bfloat16")
    weights = dict(ckpt.weights)
    if drop_shared_if_identical:
        notes += _drop_identical_shared(weights, Path(target))
    kind = "hass" if head.fc_bias or head.embed_norm or head.input_layernorm else "eagle"
    src_dtype = next(iter(weights.values())).dtype
    if DTYPES[dtype] != src_dtype:
        notes.append(f"dtype {str(src_dtype).removeprefix('torch.')} -> {dtype}")
    path = write_plugin_checkpoint(out, head, weights, kind=kind, dtype=dtype, target=tcfg,
                                   source=str(Path(src).absolute()), force=force,
                                   num_speculative_tokens=num_speculative_tokens)
    return path, notes


def _drop_identical_shared(weights: dict[str, torch.Tensor], target: Path) -> list[str]:
    """A head that carries an exact copy of the target's embedding/lm_head gains
    nothing from a second copy; one that differs keeps its own."""
    names = [n for n in ("embed_tokens.weight", "lm_head.weight") if n in weights]
    if not names or not target.is_dir():
        return []
    target_weights = _target_tensors(target, {"model.embed_tokens.weight", "lm_head.weight"})
    if "lm_head.weight" not in target_weights and "model.embed_tokens.weight" in target_weights:
        target_weights["lm_head.weight"] = target_weights["model.embed_tokens.weight"]  # tied
    notes = []
    for name in names:
        t = target_weights.get("lm_head.weight" if name == "lm_head.weight" else "model.embed_tokens.weight")
        if t is not None and t.shape == weights[name].shape and torch.equal(
            t.to(weights[name].dtype), weights[name]
        ):
            del weights[name]
            notes.append(f"{name}: identical to the target's, shared at load time")
        else:
            notes.append(f"{name}: differs from the target's, kept")
    return notes


def _target_tensors(target: Path, wanted: set[str]) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    found: dict[str, torch.Tensor] = {}
    files = sorted(target.glob("*.safetensors"))
    for f in files:
        with safe_open(str(f), "pt") as fh:
            for k in wanted & set(fh.keys()):
                found[k] = fh.get_tensor(k)
    if not files:
        for f in sorted(target.glob("pytorch_model*.bin")):
            sd = torch.load(str(f), map_location="cpu", weights_only=True)
            found.update({k: v for k, v in sd.items() if k in wanted})
    return found
