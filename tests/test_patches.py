"""vllm_patches: the patch registry (each unit recorded, logged, refused twice), and what
create_speculative_config decides per platform and mode (async scheduling, CUDA graphs,
`hass_tree`) without starting an engine."""

import logging
from types import SimpleNamespace

import pytest
from vllm.config import CUDAGraphMode, ParallelConfig

from vllm_hass import vllm_patches
from vllm_hass.config import tree_config
from vllm_hass.errors import UserError
from vllm_hass.vllm_patches import Patch

ASYNC_OFF = "vllm-hass: trees need synchronous scheduling; async scheduling turned off"
ASYNC_REFUSED = ("HASS trees need synchronous scheduling: drop --async-scheduling "
                 "(async_scheduling=True)")
FULL_GRAPHS = ("HASS trees: full CUDA graphs cannot run tree verification; "
               "use -cc.cudagraph_mode=PIECEWISE (or leave it unset)")


@pytest.fixture
def registry(monkeypatch, caplog):
    """An empty PATCHES list and vLLM's backend overrides restored afterwards."""
    from vllm.v1.attention.backends import registry as reg

    monkeypatch.setattr(vllm_patches, "PATCHES", [])
    monkeypatch.setattr(reg, "_ATTN_OVERRIDES", dict(reg._ATTN_OVERRIDES))
    caplog.set_level(logging.DEBUG, logger="vllm_hass")
    return caplog


def _logged(caplog, name, target):
    return [r for r in caplog.records
            if r.name == "vllm_hass" and r.getMessage() == f"vllm-hass patch {name}: {target}"]


# --- the registry ---------------------------------------------------------------------

def test_patch_sets_records_logs_and_refuses_twice(registry):
    class Target:
        def f(self):
            return "vllm"

        @staticmethod
        def g():
            return "vllm"

    target = f"{__name__}.{Target.__qualname__}.f"
    new = vllm_patches.patch(Target, "f", lambda self: "hass", name="test.f", why="because")
    assert Target().f() == "hass" and Target.f is new
    assert vllm_patches.PATCHES == [Patch("test.f", target, "because")]
    assert len(_logged(registry, "test.f", target)) == 1

    with pytest.raises(RuntimeError) as e:
        vllm_patches.patch(Target, "f", lambda self: "again", name="test.f", why="because")
    assert str(e.value) == (f"vllm-hass patch 'test.f': {target} is already patched "
                            "(by 'test.f'); a patch is applied once per process")
    assert Target().f() == "hass" and len(vllm_patches.PATCHES) == 1

    # a staticmethod is marked through its function; a class through itself
    vllm_patches.patch(Target, "g", staticmethod(lambda: "hass"), name="test.g", why="w")
    assert Target.g() == "hass"
    with pytest.raises(RuntimeError, match="'test.g'"):
        vllm_patches.patch(Target, "g", staticmethod(lambda: "x"), name="test.g", why="w")
    holder = SimpleNamespace(__name__="holder", Cls=Target)
    vllm_patches.patch(holder, "Cls", type("Sub", (Target,), {}), name="test.cls", why="w")
    with pytest.raises(RuntimeError, match="holder.Cls is already patched"):
        vllm_patches.refuse_repatch(holder, "Cls", "test.cls")
    assert [p.name for p in vllm_patches.PATCHES] == ["test.f", "test.g", "test.cls"]


def test_backend_registration_is_recorded_and_refused_twice(registry):
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    path = "tests.nowhere.FakeBackend"
    vllm_patches.register_backend(AttentionBackendEnum.CUSTOM, path, name="test.custom", why="w")
    assert AttentionBackendEnum.CUSTOM.get_path() == path
    target = f"vllm.v1.attention.backends.registry.AttentionBackendEnum.CUSTOM -> {path}"
    assert vllm_patches.PATCHES == [Patch("test.custom", target, "w")]
    assert len(_logged(registry, "test.custom", target)) == 1
    with pytest.raises(RuntimeError, match="'test.custom'.*already patched"):
        vllm_patches.register_backend(AttentionBackendEnum.CUSTOM, path, name="test.custom",
                                      why="w")
    assert len(vllm_patches.PATCHES) == 1


def test_plugin_load_lists_every_change():
    from vllm.plugins import load_general_plugins
    from vllm.v1.attention.backends.registry import AttentionBackendEnum
    from vllm.v1.worker import cpu_worker

    load_general_plugins()
    names = [p.name for p in vllm_patches.PATCHES]
    assert names == [
        "speculative_config.method_literal", "speculative_config.post_init",
        "speculative_config.use_eagle", "engine_args.create_speculative_config",
        "engine_args.add_cli_args", "vllm_config.v2_runner_gate",
        "worker.cpu_model_runner", "attention.cpu_attn",
    ]
    assert all(p.why for p in vllm_patches.PATCHES)
    assert cpu_worker.CPUModelRunner.__name__ == "HassCPUModelRunner"
    assert (AttentionBackendEnum.CPU_ATTN.get_path()
            == "vllm_hass.attention.TreeCPUAttentionBackend")
    vllm_patches.apply()  # idempotent: nothing applied (or refused) again
    assert [p.name for p in vllm_patches.PATCHES] == names
    with pytest.raises(RuntimeError, match="'worker.cpu_model_runner'"):
        vllm_patches._patch_runner()  # a unit applied again is refused
    with pytest.raises(RuntimeError, match="'attention.cpu_attn'"):
        vllm_patches._patch_attention_backend()
    assert cpu_worker.CPUModelRunner.__mro__[1].__name__ == "HassRunnerMixin"


def test_cuda_units(registry, monkeypatch):
    """On CUDA: FLASH_ATTN and TRITON_ATTN are registered and the GPU worker builds the
    plugin's runner only for engines with a `hass_tree`."""
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    gpu_worker = pytest.importorskip("vllm.v1.worker.gpu_worker")
    monkeypatch.setattr(current_platform, "is_cpu", lambda: False)
    monkeypatch.setattr(current_platform, "is_cuda", lambda: True)
    vllm_patches._patch_attention_backend()
    assert AttentionBackendEnum.FLASH_ATTN.get_path() == (
        "vllm_hass.attention_cuda.TreeFlashAttentionBackend")
    assert AttentionBackendEnum.TRITON_ATTN.get_path() == (
        "vllm_hass.attention_cuda.TreeTritonAttentionBackend")

    monkeypatch.setattr(gpu_worker.Worker, "_make_model_runner", lambda self: "vllm's runner")
    vllm_patches._patch_runner()
    assert [p.name for p in vllm_patches.PATCHES] == [
        "attention.flash_attn", "attention.triton_attn", "worker.gpu_model_runner"]
    no_tree = SimpleNamespace(use_v2_model_runner=False,
                              vllm_config=SimpleNamespace(speculative_config=None))
    assert gpu_worker.Worker._make_model_runner(no_tree) == "vllm's runner"
    with pytest.raises(RuntimeError, match="'worker.gpu_model_runner'"):
        vllm_patches._patch_runner()


# --- create_speculative_config ---------------------------------------------------------

TREE = {"depth": 3, "top_k": 2, "total_tokens": 5}


@pytest.fixture(scope="module")
def target_config(bigram_target):
    """The target's ModelConfig, built on the real (CPU) platform before `on_gpu`."""
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=str(bigram_target), dtype="float32",
                      max_model_len=256).create_model_config()


def speculative(target_config, head, *, tree=True, **engine_kw):
    from vllm.engine.arg_utils import EngineArgs

    spec = {"method": "hass", "model": str(head)}
    spec.update({"tree": TREE} if tree else {"num_speculative_tokens": 3})
    args = EngineArgs(model=target_config.model, speculative_config=spec, dtype="float32",
                      max_model_len=256, **engine_kw)
    cfg = args.create_speculative_config(target_config, ParallelConfig())
    return args, cfg


def test_tree_turns_unset_async_scheduling_off(target_config, identity_head, caplog):
    caplog.set_level(logging.INFO, logger="vllm_hass")
    args, _ = speculative(target_config, identity_head)
    assert args.async_scheduling is False
    ours = [r for r in caplog.records if r.name == "vllm_hass"]
    assert [(r.levelno, r.getMessage()) for r in ours] == [(logging.INFO, ASYNC_OFF)]


def test_tree_refuses_async_scheduling(target_config, identity_head):
    with pytest.raises(UserError) as e:
        speculative(target_config, identity_head, async_scheduling=True)
    assert str(e.value) == ASYNC_REFUSED


def test_tree_keeps_explicit_sync_scheduling(target_config, identity_head, caplog):
    caplog.set_level(logging.INFO, logger="vllm_hass")
    args, _ = speculative(target_config, identity_head, async_scheduling=False)
    assert args.async_scheduling is False and ASYNC_OFF not in caplog.text


@pytest.mark.parametrize("value", [None, True, False])
def test_chain_leaves_async_scheduling_alone(target_config, identity_head, value, caplog):
    caplog.set_level(logging.INFO, logger="vllm_hass")
    args, _ = speculative(target_config, identity_head, tree=False, async_scheduling=value)
    assert args.async_scheduling is value and ASYNC_OFF not in caplog.text


def test_engine_config_of_a_tree_is_synchronous(identity_head, bigram_target):
    """create_speculative_config runs before vLLM builds SchedulerConfig and resolves None."""
    from vllm.engine.arg_utils import EngineArgs

    cfg = EngineArgs(model=str(bigram_target), enforce_eager=True, dtype="float32",
                     max_model_len=256, speculative_config={
                         "method": "hass", "model": str(identity_head), "tree": TREE,
                     }).create_engine_config()
    assert cfg.scheduler_config.async_scheduling is False


def test_cpu_chain_keeps_the_plugin_path(target_config, identity_head):
    _, cfg = speculative(target_config, identity_head, tree=False)
    assert cfg.draft_model_config.hf_config.hass_tree == {"depth": 3, "top_k": 1,
                                                          "total_tokens": 4}
    assert tree_config(SimpleNamespace(speculative_config=cfg)).top_k == 1


@pytest.mark.parametrize("mode", [None, CUDAGraphMode.FULL, CUDAGraphMode.FULL_AND_PIECEWISE])
def test_cuda_chain_stays_on_vllms_path(target_config, identity_head, on_gpu, mode):
    args, cfg = speculative(target_config, identity_head, tree=False,
                            compilation_config={"cudagraph_mode": mode})
    assert not hasattr(cfg.draft_model_config.hf_config, "hass_tree")
    assert tree_config(SimpleNamespace(speculative_config=cfg)) is None
    assert args.compilation_config.cudagraph_mode == mode


def test_cuda_tree_gets_piecewise_graphs(target_config, identity_head, on_gpu):
    args, cfg = speculative(target_config, identity_head)
    assert args.compilation_config.cudagraph_mode == CUDAGraphMode.PIECEWISE
    assert cfg.draft_model_config.hf_config.hass_tree == TREE
    assert tree_config(SimpleNamespace(speculative_config=cfg)).top_k == 2
    with pytest.raises(UserError) as e:
        speculative(target_config, identity_head, compilation_config={"cudagraph_mode": "FULL"})
    assert str(e.value) == FULL_GRAPHS


def test_plugin_log_lines_go_through_vllms_logger(monkeypatch):
    """`vllm serve` configures only the "vllm" logger: the plugin's INFO lines (async
    scheduling turned off, trees configured) must reach its handlers."""
    import logging

    from vllm_hass import plugin

    got = []

    class Keep(logging.Handler):
        def emit(self, record):
            got.append(record.getMessage())

    ours = logging.getLogger("vllm_hass")
    monkeypatch.setattr(ours, "handlers", [])
    monkeypatch.setattr(ours, "level", logging.NOTSET)
    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # no application logging setup
    monkeypatch.setattr(logging.getLogger("vllm"), "handlers", [Keep()])
    plugin._log_through_vllm()
    plugin._log_through_vllm()  # idempotent: one forwarder
    ours.info("vllm-hass: a line")
    assert got == ["vllm-hass: a line"]
