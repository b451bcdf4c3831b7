"""Repository-level pytest setup.

The `triton_kernels/` folder installs as `vllm_hass.kernels`. Collecting its
tests in importlib mode registers the folder as a top-level `triton_kernels`
module, the name of OpenAI's package that vLLM probes for (gpt-oss MoE); left
there, vLLM would try to import `triton_kernels.matmul_ogs` from it. Drop those
entries once the test modules hold what they imported.
"""

import os
import sys
from pathlib import Path

# Without a GPU the Triton kernels run in Triton's interpreter. It must be chosen
# before any module defines a @triton.jit function, and the plugin imports the
# kernels as soon as vLLM loads it, so it is set here, first. (vLLM itself still
# reports no usable Triton on CPU: HAS_TRITON stays False.)
try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:
    pass

_KERNELS = (Path(__file__).resolve().parent / "triton_kernels").as_posix()


def pytest_collection_finish(session):
    for name, mod in list(sys.modules.items()):
        if name == "triton_kernels" or name.startswith("triton_kernels."):
            if (getattr(mod, "__file__", "") or "").startswith(_KERNELS):
                del sys.modules[name]
