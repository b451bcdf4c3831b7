"""`vllm-hass bench auto-model`: the calibrated head's tau, its fit, and the chooser's
pick on roofline costs (no engine)."""

import json
import subprocess
import sys

import pytest

from vllm_hass.auto_tree import Shape
from vllm_hass.bench.auto_model import CalibratedTaus, choose, fit_a, tree_tau
from vllm_hass.bench.speedup_model import GPUS, SHAPES


def test_chain_tau_is_the_geometric_sum():
    a = 0.7
    for depth in range(1, 7):
        assert tree_tau(a, depth, 1, depth + 1) == pytest.approx(1 + sum(a ** d for d in range(1, depth + 1)))


def test_tree_tau_hand_computed():
    a = 0.5  # children: 0.5, 0.25, 0.125
    # depth 1, top_k 3, keep 2: 0.5 + 0.25
    assert tree_tau(a, 1, 3, 3) == pytest.approx(1.75)
    # depth 2, top_k 2: level 1 {.5, .25}; level 2 {.25, .125, .125, .0625}; best 4 of all six
    assert tree_tau(a, 2, 2, 5) == pytest.approx(1 + 0.5 + 0.25 + 0.25 + 0.125)
    assert tree_tau(a, 0, 1, 1) == 1.0


def test_tau_grows_with_the_tree_and_fit_inverts_it():
    a = fit_a(5.08)
    assert tree_tau(a, 6, 10, 60) == pytest.approx(5.08, abs=1e-6)
    t = CalibratedTaus(a)
    assert t.tau(Shape(6, 10, 60)) > t.tau(Shape(4, 10, 60)) > t.tau(Shape(4, 1, 5)) > 1
    from vllm_hass.errors import UserError

    with pytest.raises(UserError, match="--tau 7.5: expected between 1 and 7"):
        fit_a(7.5)


def test_choice_follows_costs_and_acceptance():
    """A good head at batch 1 drafts a large tree; the pick is the best rate (never below
    no speculation); a head that is never right drafts nothing; large batches draft
    smaller trees than batch 1."""
    shape, gpu = SHAPES["llama3-8b"], GPUS["h100"]
    good = CalibratedTaus(fit_a(5.08))
    one = choose(shape, gpu, 1, 1024, 0, 0.0, good)
    assert one["shape"] != "none" and one["speedup"] >= one["fixed_6_10_60"] > 2
    big = choose(shape, gpu, 64, 1024, 0, 0.0, good)
    assert int(big["shape"].split("/")[2]) < int(one["shape"].split("/")[2])
    assert big["speedup"] >= max(1.0, big["fixed_6_10_60"], big["best_chain_speedup"])
    bad = CalibratedTaus(1e-4)
    none = choose(shape, gpu, 64, 1024, 0, 0.0, bad)
    assert none["shape"] == "none" and none["speedup"] == pytest.approx(1.0) and none["fixed_6_10_60"] < 1
    slow = choose(shape, gpu, 64, 1024, 0, 0.002, bad)  # synchronous steps pay the host time
    assert slow["shape"] == "none" and slow["speedup"] < 1


def test_cli_writes_the_table(tmp_path):
    out = subprocess.run([sys.executable, "-m", "vllm_hass.cli", "bench", "auto-model", "--batch-sizes",
                          "1,64", "--draft-vocab", "0", "--out", str(tmp_path)],
                         capture_output=True, text=True, check=True).stdout
    rows = json.loads((tmp_path / "auto_model.json").read_text())["rows"]
    assert [r["batch_size"] for r in rows] == [1, 64]
    assert f"| 1 | 128256 | {rows[0]['step_ms_no_spec']:.2f} | {rows[0]['shape']} |" in out
    bad = subprocess.run([sys.executable, "-m", "vllm_hass.cli", "bench", "auto-model", "--host-ms", "-1"],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "--host-ms -1.0: expected a number >= 0" in bad.stderr
