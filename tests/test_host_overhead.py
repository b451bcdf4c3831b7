"""Deterministic counts of the step's host side (vllm_hass.bench.host_overhead): device->
host syncs per engine step, none in per-layer code, and the harness runs without vLLM.
Timings are the bench's business (docs/host-overhead.md), not this test's."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from vllm_hass.bench import host_overhead as h

SMALL = dict(h.TINY, layers=4)


@pytest.fixture(autouse=True)
def _cuda_path(monkeypatch, request):
    if request.node.name == "test_stand_ins_leave_the_real_kernels_outside":
        yield
        return
    monkeypatch.setenv("VLLM_HASS_TREE_KERNEL", "triton")  # the CUDA path's compaction
    with h.kernel_stand_ins():  # restored after the test: later tests run the real kernels
        yield


@pytest.mark.parametrize("sampling", ["greedy", "T>0"])
@pytest.mark.parametrize("B", [1, 8])
def test_one_sync_per_step_independent_of_batch_and_layers(B, sampling):
    for shape in (SMALL, dict(SMALL, layers=12)):
        steps = h.run_steps(B, shape, sampling, 4)
        # from the second verify step on (the first builds the compaction kernel's
        # per-layer pointer table once): only the drafts' copy to the host
        for s in steps[2:]:
            assert s.syncs == 1, (B, sampling, shape["layers"], s.syncs)
        assert steps[-1].events == ["cpu"]


def test_the_per_layer_attention_wrapper_never_syncs_and_its_ops_are_fixed():
    steps_a = h.run_steps(2, SMALL, "greedy", 3)
    steps_b = h.run_steps(2, dict(SMALL, layers=8), "greedy", 3)
    # 4 more layers add the same number of ops whatever the batch holds
    assert steps_b[2].syncs == steps_a[2].syncs == 1
    per_layer = (steps_b[2].ops - steps_a[2].ops) / 4
    assert per_layer == int(per_layer) and 0 < per_layer <= 4, per_layer


def test_harness_runs_without_vllm(tmp_path):
    code = (
        "import sys; sys.modules['vllm'] = None\n"  # any `import vllm...` now fails
        "from vllm_hass.bench import host_overhead as h\n"
        "import os; os.environ['VLLM_HASS_TREE_KERNEL'] = 'triton'\n"
        "with h.kernel_stand_ins():\n"
        "    s = h.run_steps(2, dict(h.TINY, layers=2), 'T>0', 3)\n"
        "print(s[2].syncs)\n"
        "assert not [m for m in sys.modules if m.startswith('vllm.')]\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ), timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "1"


def test_bad_batch_sizes_get_a_one_line_error(capsys):
    from vllm_hass.cli import main

    with pytest.raises(SystemExit):
        main(["bench", "host-overhead", "--batch-sizes", "0"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--batch-sizes" in err and "invalid <lambda>" not in err, err


def test_stand_ins_are_restored():
    """The harness must not leave no-op kernels behind (a later engine test in the same
    process would serve garbage)."""
    from vllm_hass.kernels import kv_compact, tree_attention

    inside = tree_attention._tree_attn_fwd  # the autouse fixture's stand-in
    with h.kernel_stand_ins():
        pass
    assert tree_attention._tree_attn_fwd is inside  # nested use restores the outer state
    assert isinstance(inside, h._NoLaunch) and isinstance(kv_compact._kv_compact_kernel, h._NoLaunch)


def test_stand_ins_leave_the_real_kernels_outside():
    from vllm_hass.kernels import tree_attention

    real = tree_attention._tree_attn_fwd
    assert not isinstance(real, h._NoLaunch)  # nothing leaked from the tests above
    with h.kernel_stand_ins():
        assert isinstance(tree_attention._tree_attn_fwd, h._NoLaunch)
    assert tree_attention._tree_attn_fwd is real
