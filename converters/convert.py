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
import re
import shutil
import tempfile
from pathlib import Path

import torch

from vllm_hass.errors import UserError
from vllm_hass.head import HeadConfig

from .layout import (FORMAT_VERSION, PLUGIN_ARCH, Checkpoint, _load_file, check_values,
                     check_weights, load_checkpoint)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEFAULT_SPEC_TOKENS = 3
MAX_SPEC_TOKENS = 127  # config.MAX_TREE_TOKENS - 1, what parse_spec accepts (config imports us)


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
    try:
        if out.parent.is_dir():
            _clean_stale(out)  # first: it may put back the OUT a killed --force run moved aside
    except OSError as e:
        raise UserError(f"--out {out}: cannot clean up after an earlier run ({e.strerror})") from None
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
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        # the PID in the name tells a later run whether this one is still writing
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    except OSError as e:  # e.g. a parent that is a file, a read-only directory
        why = "a parent is a file" if isinstance(e, (FileExistsError, NotADirectoryError)) else e.strerror
        raise UserError(f"--out {out}: cannot write there ({why})") from None
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    try:
        (tmp / MARKER).touch()  # safetensors writes via its own temporary file: mark the dir ours
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        (tmp / "hass.json").write_text(json.dumps(spec, indent=2) + "\n")
        # mkdtemp makes a private directory (and safetensors a private file); the result
        # should carry the permissions any directory the user creates would have
        umask = os.umask(0)
        os.umask(umask)
        (tmp / MARKER).unlink()
        tmp.chmod(0o777 & ~umask)
        for f in tmp.iterdir():
            f.chmod(0o666 & ~umask)
        if out.exists():
            # a kill between these two renames leaves no OUT and the previous one in `old`;
            # the next run puts it back (_clean_stale)
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not out.exists():
            old.rename(out)  # the second rename failed: the previous OUT stays
        raise
    return out


MARKER = ".vllm-hass-convert"
WRITTEN = {"model.safetensors", "config.json", "hass.json"}  # a temporary OUT after MARKER goes


def _pid_alive(pid: int) -> bool:
    try:  # this process counts as alive: another thread of it may be writing
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's live process
        return True
    return True


def _clean_stale(out: Path) -> None:
    """Leftovers of converters killed while writing OUT (SIGKILL runs no cleanup): a
    `.OUT.tmp-PID-*` holding MARKER or only files write_plugin_checkpoint writes, and `.OUT.old-PID`,
    the previous OUT a --force run had moved aside (put back when no OUT replaced it).
    Only names of exactly that form whose PID is not running are touched."""
    pat = re.compile(rf"\.{re.escape(out.name)}\.(?:tmp-(\d+)-[a-z0-9_]+|old-(\d+))")
    for p in sorted(out.parent.iterdir()):
        m = pat.fullmatch(p.name)
        if not m or p.is_symlink() or not p.is_dir() or _pid_alive(int(m[1] or m[2])):
            continue
        names = {f.name for f in p.iterdir()} if m[1] else set()
        if m[2] and not out.exists() and not out.is_symlink():
            p.rename(out)
        elif m[2] or MARKER in names or names <= WRITTEN:
            shutil.rmtree(p)


def convert(src: str | os.PathLike, target: str | os.PathLike, out: str | os.PathLike, *,
            dtype: str | None = None, force: bool = False, rope_from: str | None = None,
            num_speculative_tokens: int = DEFAULT_SPEC_TOKENS,
            drop_shared_if_identical: bool = True) -> tuple[Path, list[str]]:
    """Returns (OUT, notes). Raises UserError with every mismatch against the target."""
    if not 1 <= num_speculative_tokens <= MAX_SPEC_TOKENS:  # else hass.json is refused at serve
        raise UserError(f"--num-speculative-tokens must be between 1 and {MAX_SPEC_TOKENS}, "
                        f"got {num_speculative_tokens}")
    ckpt: Checkpoint = load_checkpoint(src)
    head = ckpt.head_config
    check_weights(ckpt.weights, head, str(ckpt.path))
    check_values(ckpt.weights, head, str(ckpt.path))
    _check_tied(ckpt)
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
        notes += _drop_identical_shared(weights, Path(target), tcfg)
    kind = "hass" if head.fc_bias or head.embed_norm or head.input_layernorm else "eagle"
    src_dtype = next(iter(weights.values())).dtype
    if DTYPES[dtype] != src_dtype:
        notes.append(f"dtype {str(src_dtype).removeprefix('torch.')} -> {dtype}")
    path = write_plugin_checkpoint(out, head, weights, kind=kind, dtype=dtype, target=tcfg,
                                   source=str(Path(src).absolute()), force=force,
                                   num_speculative_tokens=num_speculative_tokens)
    return path, notes


def _check_tied(ckpt: Checkpoint) -> None:
    """A head config saying tie_word_embeddings with its own, different embed_tokens and
    lm_head contradicts itself. (One of the two alone is EAGLE's usual layout: EAGLE
    copies the target's config and never ties the head's lm_head to its embedding.)"""
    w = ckpt.weights
    if ckpt.config.get("tie_word_embeddings") and "embed_tokens.weight" in w and \
            "lm_head.weight" in w and not torch.equal(w["embed_tokens.weight"], w["lm_head.weight"]):
        raise UserError(f"{ckpt.path}/config.json: 'tie_word_embeddings' is true but lm_head.weight "
                        "differs from embed_tokens.weight (expected false, or identical weights)")


def _drop_identical_shared(weights: dict[str, torch.Tensor], target: Path,
                           tcfg: dict | None = None) -> list[str]:
    """A head that carries an exact copy of the target's embedding/lm_head gains
    nothing from a second copy; one that differs keeps its own."""
    names = [n for n in ("embed_tokens.weight", "lm_head.weight") if n in weights]
    if not names or not target.is_dir():
        return []
    target_weights = _target_tensors(target, {"model.embed_tokens.weight", "lm_head.weight"})
    tied = bool((tcfg or {}).get("tie_word_embeddings"))
    if (tied or "lm_head.weight" not in target_weights) and "model.embed_tokens.weight" in target_weights:
        # A tied target serves its embedding as lm_head, whatever lm_head.weight its files
        # hold; comparing with that file entry would drop a head lm_head the target never uses.
        target_weights["lm_head.weight"] = target_weights["model.embed_tokens.weight"]
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
        try:
            with safe_open(str(f), "pt") as fh:
                for k in wanted & set(fh.keys()):
                    found[k] = fh.get_tensor(k)
        except Exception as e:  # a corrupt target file: one line, not a traceback
            raise UserError(f"--target {f}: cannot read ({' '.join(str(e).split())})") from None
    if not files:
        for f in sorted(target.glob("pytorch_model*.bin")):
            sd = _load_file(f)  # weights_only, refuses a pickle that is not plain tensors
            found.update({k: v for k, v in sd.items() if k in wanted})
    return found
