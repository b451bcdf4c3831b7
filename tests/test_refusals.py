"""Every startup refusal of tree mode, with its exact one-line message, and which
sampling options keep a request off the tree path (`proposer.tree_eligible`)."""

from types import SimpleNamespace

import pytest
import transformers
from vllm import SamplingParams
from vllm.config import CompilationConfig, CUDAGraphMode
from vllm.sampling_params import StructuredOutputsParams

from vllm_hass.config import HassSpec, check_parallel
from vllm_hass.errors import UserError
from vllm_hass.proposer import tree_eligible
from vllm_hass.runner import check_tree_support
from vllm_hass.vllm_patches import _tree_friendly_cudagraphs

SLIDING = "HASS trees: sliding-window attention is not supported (use chain mode)"


def vllm_config(hf=None, *, mrope=False, async_scheduling=False, kv_transfer=None, pp=1):
    """What check_tree_support reads of a VllmConfig (a real transformers config inside)."""
    hf = hf if hf is not None else transformers.LlamaConfig(num_hidden_layers=2)
    return SimpleNamespace(
        model_config=SimpleNamespace(hf_text_config=hf, uses_mrope=mrope),
        scheduler_config=SimpleNamespace(async_scheduling=async_scheduling),
        kv_transfer_config=kv_transfer,
        parallel_config=SimpleNamespace(pipeline_parallel_size=pp))


def refusal(fn, *args) -> str:
    with pytest.raises(UserError) as e:
        fn(*args)
    msg = str(e.value)
    assert "\n" not in msg and isinstance(e.value, ValueError)
    return msg


# --- check_tree_support -------------------------------------------------------------

def test_supported_configs_pass():
    check_tree_support(vllm_config())  # Llama: no sliding_window, no layer_types
    # Qwen2 without its sliding window: layer_types all "full_attention"
    hf = transformers.Qwen2Config(use_sliding_window=False, num_hidden_layers=3)
    assert hf.layer_types == ["full_attention"] * 3
    check_tree_support(vllm_config(hf))


def test_sliding_window_refused():
    hf = transformers.MistralConfig(sliding_window=4096, num_hidden_layers=2)
    assert refusal(check_tree_support, vllm_config(hf)) == SLIDING


def test_sliding_layers_refused():
    hf = transformers.Qwen2Config(use_sliding_window=True, sliding_window=64,
                                  max_window_layers=1, num_hidden_layers=2)
    assert "sliding_attention" in hf.layer_types
    assert refusal(check_tree_support, vllm_config(hf)) == SLIDING


@pytest.mark.parametrize("kind", ["sliding_attention", "chunked_attention", "linear_attention"])
def test_non_full_layer_types_refused_without_sliding_window(kind):
    hf = transformers.Qwen2Config(use_sliding_window=False, num_hidden_layers=3)
    hf.layer_types = ["full_attention", kind, "full_attention"]
    assert hf.sliding_window is None  # only layer_types says it
    assert refusal(check_tree_support, vllm_config(hf)) == SLIDING


def test_mrope_refused():
    assert (refusal(check_tree_support, vllm_config(mrope=True))
            == "HASS trees: M-RoPE models are not supported (use chain mode)")


def test_async_scheduling_refused():
    assert (refusal(check_tree_support, vllm_config(async_scheduling=True))
            == "HASS trees need synchronous scheduling: pass --no-async-scheduling")


def test_kv_connector_refused():
    from vllm.config import KVTransferConfig

    kv = KVTransferConfig(kv_connector="SharedStorageConnector", kv_role="kv_both")
    assert (refusal(check_tree_support, vllm_config(kv_transfer=kv))
            == "HASS trees: KV connectors are not supported (KV is compacted in place)")


def test_pipeline_parallel_refused():
    assert (refusal(check_tree_support, vllm_config(pp=2))
            == "HASS trees: pipeline parallelism is not supported")


# --- CUDA graphs ----------------------------------------------------------------------

FULL_GRAPHS = ("HASS trees: full CUDA graphs cannot run tree verification; "
               "use -cc.cudagraph_mode=PIECEWISE (or leave it unset)")


def engine_args(mode):
    return SimpleNamespace(compilation_config=CompilationConfig(cudagraph_mode=mode))


@pytest.mark.parametrize("mode", [m for m in CUDAGraphMode if m.has_full_cudagraphs()])
def test_full_cudagraphs_refused(on_gpu, mode):
    ea = engine_args(mode)
    assert refusal(_tree_friendly_cudagraphs, ea) == FULL_GRAPHS
    assert ea.compilation_config.cudagraph_mode == mode


def test_unset_cudagraph_mode_becomes_piecewise(on_gpu):
    ea = engine_args(None)
    _tree_friendly_cudagraphs(ea)
    assert ea.compilation_config.cudagraph_mode == CUDAGraphMode.PIECEWISE


@pytest.mark.parametrize("mode", [CUDAGraphMode.PIECEWISE, CUDAGraphMode.NONE])
def test_user_choice_without_full_graphs_kept(on_gpu, mode):
    ea = engine_args(mode)
    _tree_friendly_cudagraphs(ea)
    assert ea.compilation_config.cudagraph_mode == mode


def test_cpu_leaves_compilation_config_alone():
    from vllm.platforms import current_platform

    assert current_platform.is_cpu()
    for mode in (None, CUDAGraphMode.FULL):
        ea = engine_args(mode)
        _tree_friendly_cudagraphs(ea)
        assert ea.compilation_config.cudagraph_mode == mode


# --- draft tensor parallel ------------------------------------------------------------

def spec(**passthrough):
    return HassSpec(model="/heads/x", num_speculative_tokens=3, passthrough=passthrough,
                    source="hass.json")


@pytest.mark.parametrize("dtp,tp", [(1, 2), (2, 1), (4, 2)])
def test_draft_tp_other_than_target_refused(dtp, tp):
    assert refusal(check_parallel, spec(draft_tensor_parallel_size=dtp), tp) == (
        f"hass.json: 'draft_tensor_parallel_size' must equal the target's "
        f"tensor_parallel_size ({tp}) for a HASS head, got {dtp} "
        "(leave it out: the head is sharded like the target)")


@pytest.mark.parametrize("tp", [1, 2])
def test_draft_tp_equal_or_absent_accepted(tp):
    check_parallel(spec(draft_tensor_parallel_size=tp), tp)
    check_parallel(spec(), tp)


# --- tree_eligible ------------------------------------------------------------------------

NOT_ELIGIBLE = {
    "presence_penalty": dict(presence_penalty=0.5),
    "presence_penalty_negative": dict(presence_penalty=-0.5),
    "frequency_penalty": dict(frequency_penalty=0.3),
    "repetition_penalty": dict(repetition_penalty=1.2),
    "repetition_penalty_below_1": dict(repetition_penalty=0.9),
    "min_p": dict(min_p=0.05),
    "logit_bias": dict(logit_bias={5: 2.0}),
    "allowed_token_ids": dict(allowed_token_ids=[3, 4, 5]),
    "bad_words": dict(bad_words=["foo"]),
    "structured_outputs": dict(structured_outputs=StructuredOutputsParams(regex="[ab]+")),
    "structured_outputs_choice": dict(structured_outputs=StructuredOutputsParams(choice=["x", "y"])),
    "min_tokens": dict(min_tokens=4),
    "min_tokens_with_neutral_rest": dict(min_tokens=1, temperature=0.7, top_p=0.9),
}

ELIGIBLE = {
    "defaults": dict(),
    "neutral_penalties": dict(presence_penalty=0.0, frequency_penalty=0.0, repetition_penalty=1.0),
    "neutral_min_p": dict(min_p=0.0),
    "empty_logit_bias": dict(logit_bias={}),
    "empty_allowed_token_ids": dict(allowed_token_ids=[]),  # vLLM builds no mask for []
    "empty_bad_words": dict(bad_words=[]),
    "min_tokens_0": dict(min_tokens=0),
    "greedy": dict(temperature=0.0),
    "temperature": dict(temperature=1.3),
    "top_k": dict(top_k=5),
    "top_p": dict(top_p=0.8),
    "seed": dict(seed=123),
    "logprobs": dict(logprobs=5),
    "max_tokens": dict(max_tokens=7),
    "stop": dict(stop=["\n\n"], stop_token_ids=[2]),
    "everything_neutral_at_once": dict(temperature=0.7, top_k=20, top_p=0.95, seed=1, logprobs=2,
                                       max_tokens=64, stop=["."], ignore_eos=True),
}


@pytest.mark.parametrize("name", NOT_ELIGIBLE)
def test_history_dependent_options_are_not_eligible(name):
    sp = SamplingParams(**NOT_ELIGIBLE[name])
    assert tree_eligible(sp) is False


@pytest.mark.parametrize("name", ELIGIBLE)
def test_logits_only_options_are_eligible(name):
    sp = SamplingParams(**ELIGIBLE[name])
    assert tree_eligible(sp) is True


def test_no_params_is_not_eligible():
    assert tree_eligible(None) is False


def test_logits_processors_option():
    """vLLM >= 0.21's SamplingParams has no per-request `logits_processors` (custom logits
    processors are engine-level there), so `_MASKED_PARAMS` lists a name that cannot be set."""
    assert not hasattr(SamplingParams(), "logits_processors")


def test_thinking_token_budget_is_not_eligible():
    """`thinking_token_budget` forces the end-of-thinking token once a request has thought
    for that many tokens: it depends on the tokens before a position, and vLLM applies
    it to draft rows in its rejection sampler (`thinking_budget_state_holder`). The tree
    sampler applies only temperature/top-k/top-p to tree rows, so such requests must
    decode without drafts."""
    assert tree_eligible(SamplingParams(thinking_token_budget=16)) is False


# --- refusals added with the GPU-grade step's checks -----------------------------------

def _cfg(**kw):
    """vllm_config() plus the fields the newer checks read."""
    base = vllm_config(kw.pop("hf", None))
    base.cache_config = SimpleNamespace(cache_dtype=kw.pop("cache_dtype", "auto"))
    base.parallel_config = SimpleNamespace(pipeline_parallel_size=1,
                                           decode_context_parallel_size=kw.pop("dcp", 1),
                                           enable_dbo=kw.pop("dbo", False), ubatch_size=1)
    assert not kw
    return base


CHAIN = SimpleNamespace(top_k=1, depth=3, total_tokens=4)
TREE = SimpleNamespace(top_k=3, depth=4, total_tokens=10)


@pytest.mark.parametrize("hf_kw, message", [
    (dict(attn_logit_softcapping=50.0), "logit soft-capping (attn_logit_softcapping)"),
    (dict(alibi=True), "ALiBi (alibi)"),
    (dict(position_embedding_type="alibi"), "ALiBi (position_embedding_type)"),
    (dict(attention_sinks=True), "attention sinks"),
])
def test_attention_variants_the_tree_kernel_ignores_are_refused(hf_kw, message):
    hf = transformers.LlamaConfig(num_hidden_layers=2)
    for k, v in hf_kw.items():
        setattr(hf, k, v)
    msg = refusal(check_tree_support, _cfg(hf=hf), TREE)
    assert msg.startswith("HASS trees: ") and message in msg and msg.endswith("(use chain mode)")
    check_tree_support(_cfg(hf=hf), CHAIN)  # a chain uses vLLM's own kernels


def test_fp8_kv_cache_refused_for_trees():
    assert refusal(check_tree_support, _cfg(cache_dtype="fp8"), TREE) == (
        "HASS trees: kv_cache_dtype 'fp8' is not supported (the tree kernel and KV compaction "
        "read the cache in the model dtype): use --kv-cache-dtype auto or chain mode")
    check_tree_support(_cfg(cache_dtype="fp8"), CHAIN)
    check_tree_support(_cfg(), TREE)


def test_chains_are_not_refused_for_sliding_window():
    hf = transformers.MistralConfig(sliding_window=4096, num_hidden_layers=2)
    check_tree_support(_cfg(hf=hf), CHAIN)
    assert refusal(check_tree_support, _cfg(hf=hf), TREE) == SLIDING


@pytest.mark.parametrize("kw, start", [
    (dict(dcp=2), "HASS: decode context parallelism"),
    (dict(dbo=True), "HASS: micro-batching"),
])
def test_parallel_modes_refused(kw, start):
    for tree in (CHAIN, TREE):
        assert refusal(check_tree_support, _cfg(**kw), tree).startswith(start)


def test_attention_backends_without_tree_masks_are_refused():
    from vllm_hass.attention import TreeCPUAttentionBackend
    from vllm_hass.runner import check_tree_backends

    class FlashInfer:  # a backend the plugin has not wrapped
        @staticmethod
        def get_name():
            return "FLASHINFER"

    ours = [[SimpleNamespace(backend=TreeCPUAttentionBackend)]]
    check_tree_backends(ours, TREE)
    mixed = [*ours, [SimpleNamespace(backend=FlashInfer)]]
    assert refusal(check_tree_backends, mixed, TREE) == (
        "HASS trees: attention backend FLASHINFER cannot apply tree masks (verification would be "
        "lossy); use --attention-backend FLASH_ATTN or TRITON_ATTN on CUDA, or chain mode "
        "(num_speculative_tokens, no tree)")
    check_tree_backends(mixed, CHAIN)  # chains need no mask


def test_model_runner_v2_refused(monkeypatch):
    from vllm_hass.vllm_patches import _refuse_v2_runner

    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    assert refusal(_refuse_v2_runner) == (
        "HASS: VLLM_USE_V2_MODEL_RUNNER=1 selects Model Runner V2, which does not run the "
        "plugin's step (trees would be dropped): unset it")
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "0")
    _refuse_v2_runner()


@pytest.mark.engine
def test_tree_larger_than_max_model_len_refused(bigram_target, identity_head):
    """A tree that needs more draft slots than max_model_len leaves would start an engine
    that never drafts: refused at start-up in one line."""
    from vllm import LLM

    spec = {"method": "hass", "model": str(identity_head),
            "tree": {"depth": 6, "top_k": 10, "total_tokens": 60}}
    with pytest.raises(UserError) as e:
        LLM(model=str(bigram_target), speculative_config=spec, max_model_len=48, enforce_eager=True,
            dtype="float32")
    msg = str(e.value)
    assert "\n" not in msg and "59 draft slots" in msg and "max_model_len 48" in msg
