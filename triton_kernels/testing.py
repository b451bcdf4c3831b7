"""Test support for the kernels: what the Triton interpreter cannot show."""

from __future__ import annotations

import os
import subprocess
import sys


def run_uninterpreted(module: str, function: str, timeout: int = 300) -> None:
    """Call vllm_hass.kernels.<module>.<function>() in a fresh process with TRITON_INTERPRET=0
    (the interpreter never lowers a kernel, so real compilation needs its own process);
    raises AssertionError with the end of its stderr if it fails."""
    code = f"from vllm_hass.kernels.{module} import {function}; {function}()"
    env = dict(os.environ, TRITON_INTERPRET="0")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
