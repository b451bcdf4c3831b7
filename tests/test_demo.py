"""The README's first command, minus the SmolLM2 download: `vllm-hass demo --tiny`."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.engine


def test_demo_tiny_serves_and_reports_tau():
    exe = str(Path(sys.executable).parent / "vllm-hass")
    r = subprocess.run([exe, "demo", "--tiny", "--tree", "4,3,10", "--max-tokens", "41"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "$ vllm serve " in r.stdout and "--speculative-config" in r.stdout
    tau = float(re.search(r"tau = accepted/steps \+ 1 = ([0-9.]+)", r.stdout).group(1))
    # identity head on the bigram target: every step accepts the whole depth-4 path
    assert tau == 5.0
    assert "accepted at depth 1..4 (fraction of steps): 1.00, 1.00, 1.00, 1.00" in r.stdout
    # the same request without speculation, side by side: same output, both speeds shown
    assert "$ vllm serve " in r.stdout.split("the same request without speculation:")[1]
    m = re.search(r"speedup = ([0-9.]+)x \(tau 5.00\); output identical to no speculation", r.stdout)
    assert m and float(m.group(1)) > 0, r.stdout[-2000:]
    assert re.search(r"no speculation: 41 tokens in [0-9.]+ s", r.stdout)


def test_demo_tiny_defaults_to_auto_and_shows_its_shapes():
    """The demo's default tree is "auto": it prints the shapes auto chose for the timed
    request (from the /metrics counters) beside τ and the no-speculation run."""
    exe = str(Path(sys.executable).parent / "vllm-hass")
    r = subprocess.run([exe, "demo", "--tiny", "--max-tokens", "48"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert '"tree": "auto"' in r.stdout
    m = re.search(r"auto chose \(engine steps per shape\): (.+)", r.stdout)
    assert m, r.stdout[-2000:]
    steps = {k: int(v) for k, v in re.findall(r"(none|\d+/\d+/\d+) ×(\d+)", m.group(1))}
    verify = int(re.search(r"verify steps (\d+)", r.stdout).group(1))
    drafted = sum(v for k, v in steps.items() if k != "none")
    # every drafted step but possibly the last is verified by the next (an exploring step
    # is verified too, and counted as the shape the other requests got: here none)
    assert 0 < drafted <= verify + 1 and verify <= sum(steps.values()), (steps, verify)
    assert "output identical to no speculation" in r.stdout
