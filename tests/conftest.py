"""Shared fixtures: tiny local models and vLLM engines on CPU.

The environment below makes CPU engines fast and deterministic; it must be set
before vLLM is imported, which is why it lives at the top of conftest.
"""

import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

# The repo's triton_kernels/ folder installs as vllm_hass.kernels; with the repo
# root on sys.path it would also shadow OpenAI's `triton_kernels`, which vLLM
# probes for. Tests import the installed package only.
_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _ROOT]

from vllm_hass import fixtures  # noqa: E402

from helpers import CONFIDENT, write_head  # noqa: E402


@pytest.fixture
def on_gpu(monkeypatch):
    """The platform claims not to be the CPU (for the CUDA-only config paths)."""
    from vllm.platforms import current_platform

    monkeypatch.setattr(current_platform, "is_cpu", lambda: False)


@pytest.fixture(scope="session")
def bigram_target(tmp_path_factory):
    return fixtures.make_target(tmp_path_factory.mktemp("bigram") / "target", bigram=True)


@pytest.fixture(scope="session")
def random_target(tmp_path_factory):
    return fixtures.make_target(tmp_path_factory.mktemp("random") / "target", seed=1)


@pytest.fixture(scope="session")
def identity_head(tmp_path_factory, bigram_target):
    return write_head(tmp_path_factory.mktemp("identity") / "head", bigram_target,
                      lambda hc: fixtures.identity_head_state(hc, scale=CONFIDENT))


@pytest.fixture(scope="session")
def biased_head(tmp_path_factory, bigram_target):
    return write_head(tmp_path_factory.mktemp("biased") / "head", bigram_target,
                      lambda hc: fixtures.identity_head_state(hc, scale=1.0, fc_bias=10.0),
                      fc_bias=True)


@pytest.fixture(scope="session")
def random_head(tmp_path_factory, random_target):
    return write_head(tmp_path_factory.mktemp("randhead") / "head", random_target,
                      lambda hc: fixtures.random_head_state(hc, seed=3), fc_bias=True)




# Sharp attention (so positions and masks are observable) and heads whose drafts depend on
# their own attention, positions, hidden-state inputs and optional modules.
FULL_HEAD = dict(fc_bias=True, embed_norm=True, hidden_norm=True, input_layernorm=True,
                 lm_head_norm=True)


@pytest.fixture(scope="session")
def sharp_target(tmp_path_factory):
    return fixtures.make_target(tmp_path_factory.mktemp("sharp") / "target", seed=1, context=0.3,
                                sharp=8.0)


@pytest.fixture(scope="session")
def attentive_head(tmp_path_factory, sharp_target):
    return write_head(tmp_path_factory.mktemp("attentive") / "head", sharp_target,
                      lambda hc: fixtures.attentive_head_state(hc, seed=2))


@pytest.fixture(scope="session")
def attentive_full_head(tmp_path_factory, sharp_target):
    """fc.bias and all four optional norms, with non-trivial weights."""
    return write_head(tmp_path_factory.mktemp("attentive_full") / "head", sharp_target,
                      lambda hc: fixtures.attentive_head_state(hc, seed=3), **FULL_HEAD)


@pytest.fixture(scope="session")
def small_vocab(tmp_path_factory):
    """A 6-token target and a random head: exact output laws are cheap to compute."""
    d = tmp_path_factory.mktemp("small")
    target = fixtures.make_target(d / "target", seed=7, vocab_size=6, with_tokenizer=False)
    head = write_head(d / "head", target, lambda hc: fixtures.random_head_state(hc, seed=8))
    return target, head
