"""Optional dependencies: which extra installs each, checked before a command runs.

A missing optional module is one line naming the extra, e.g.

    vllm-hass bench: error: needs matplotlib (not installed): pip install 'vllm-hass[bench]'

never a ModuleNotFoundError traceback. `check(args)` looks the command's modules
up with importlib.util.find_spec (nothing is imported) before any work starts;
`missing_extra(exc)` turns a ModuleNotFoundError raised later anyway into the
same line (cli.main catches it).
"""

from __future__ import annotations

import importlib.util
import os

from vllm_hass.errors import UserError

VLLM = "'vllm-hass[gpu]' (or 'vllm-hass[cpu]' without a GPU)"

# top-level module -> what installs it
PROVIDER = {
    "vllm": VLLM,
    "torch": VLLM,  # both bring torch
    "transformers": "'vllm-hass[train]'",  # vLLM brings it too
    "gguf": "'vllm-hass[train]'",
    "accelerate": "'vllm-hass[train]'",
    "matplotlib": "'vllm-hass[bench]'",
}


class MissingExtra(UserError):
    def __init__(self, modules: list[str], why: str = ""):
        self.modules = modules
        installs = list(dict.fromkeys(PROVIDER[m] for m in modules))
        super().__init__(f"needs {', '.join(modules)} (not installed{why}): "
                         f"pip install {' and '.join(installs)}")


def present(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require(*modules: str, why: str = "") -> None:
    missing = [m for m in modules if not present(m)]
    if missing:
        raise MissingExtra(missing, why)


def needs(args) -> tuple[list[str], str]:
    """The optional modules `args`' command needs, and why (shown after "not installed")."""
    cmd = getattr(args, "command", None)
    if cmd in ("convert", "inspect"):
        return ["torch"], ""
    if cmd == "vocab":
        from vllm_hass.vocab_cli import is_dataset

        data = getattr(args, "data", "") or ""
        if is_dataset(data) and not os.path.isdir(data):
            return ["vllm", "torch", "transformers"], "; they generate the target's outputs"
        return ["torch"], ""
    if cmd == "demo":
        mods = ["vllm", "torch", "transformers"]
        if not getattr(args, "tiny", False) and not getattr(args, "target", None):
            return mods + ["gguf", "accelerate"], "; they convert SmolLM2 from its GGUF file"
        return mods, ""
    if cmd == "train":
        sub = getattr(args, "train_command", None)
        if sub == "fetch" and getattr(args, "smollm2", False):
            return ["torch", "transformers", "gguf", "accelerate"], ""
        if sub in ("data", "eval"):
            return ["torch", "transformers"], ""
        return ["torch"], ""
    if cmd == "bench":
        sub = getattr(args, "bench_command", None)
        if sub == "speedup-model":
            return ["torch"], ""
        if sub == "compare":
            return [], ""
        if sub == "load":  # vLLM brings aiohttp and psutil too
            return ["vllm"], ""
        configs = [c for c in (getattr(args, "configs", "") or "").split(",") if c]
        mods = ["torch", "transformers", "matplotlib"]
        if any(c != "oracle" for c in configs):
            mods.insert(0, "vllm")
        return mods, ""
    return [], ""


def check(args) -> None:
    mods, why = needs(args)
    require(*mods, why=why)


def missing_extra(exc: ModuleNotFoundError) -> MissingExtra | None:
    """The one-line error for an optional module that failed to import, else None."""
    top = (getattr(exc, "name", None) or "").split(".")[0]
    return MissingExtra([top]) if top in PROVIDER else None
