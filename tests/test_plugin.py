"""Plugin wiring: entry point, version gate, strict head checks, shared vs own tensors."""

import importlib.metadata as md
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from vllm import SamplingParams

from helpers import CONFIDENT, free_llm, make_llm, prompts, spec_metrics, write_head
from vllm_hass import fixtures
from vllm_hass.errors import UserError

GREEDY = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)


def test_entry_point_is_registered():
    eps = md.entry_points(group="vllm.general_plugins")
    assert any(ep.name == "hass" and ep.value == "vllm_hass.plugin:register" for ep in eps)


def test_unsupported_vllm_version_is_refused(monkeypatch):
    import vllm

    from vllm_hass import vllm_patches

    monkeypatch.setattr(vllm, "__version__", "0.40.1")
    with pytest.raises(RuntimeError) as e:
        vllm_patches.check_version()
    assert "supports vLLM 0.32.x and 0.33.x; found vLLM 0.40.1" in str(e.value)


def _engine_config(target, head):
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=str(target), speculative_config=str(head / "hass.json"),
                      enforce_eager=True, dtype="float32", max_model_len=256).create_engine_config()


@pytest.mark.parametrize("defect,message", [
    ("extra", "unexpected weight 'layers.0.mlp.extra.weight'"),
    ("missing", "missing weight 'layers.0.self_attn.o_proj.weight'"),
    ("shape", "weight 'layers.0.mlp.up_proj.weight' has shape"),
    ("flag", "hass.fc_bias is True but the weights lack it"),
])
def test_broken_head_dir_is_named_before_the_engine(bigram_target, identity_head, tmp_path,
                                                    defect, message):
    head = tmp_path / "head"
    shutil.copytree(identity_head, head)
    sd = load_file(str(head / "model.safetensors"))
    if defect == "extra":
        sd["layers.0.mlp.extra.weight"] = torch.zeros(3)
    elif defect == "missing":
        del sd["layers.0.self_attn.o_proj.weight"]
    elif defect == "shape":
        sd["layers.0.mlp.up_proj.weight"] = torch.zeros(7, 7)
    else:
        cfg = json.loads((head / "config.json").read_text())
        cfg["hass"]["fc_bias"] = True
        (head / "config.json").write_text(json.dumps(cfg))
    save_file(sd, str(head / "model.safetensors"))
    with pytest.raises(UserError) as e:
        _engine_config(bigram_target, head)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.engine
@pytest.mark.parametrize("which", ["embed_tokens", "lm_head"])
def test_own_tensors_are_loaded_when_they_differ(bigram_target, tmp_path, which):
    """A head carrying its own embed_tokens / lm_head: an exact copy of the target's
    is shared (100% acceptance, as the identity head alone); a different one is
    loaded and used (here: rows permuted, so the drafts go wrong)."""
    target_sd = load_file(str(bigram_target / "model.safetensors"))
    key = "model.embed_tokens.weight" if which == "embed_tokens" else "lm_head.weight"
    rates = {}
    for variant in ("copy", "permuted"):
        own = target_sd[key].clone()
        if variant == "permuted":
            own = own[torch.randperm(own.shape[0], generator=torch.Generator().manual_seed(0))]

        def state(hc, own=own):
            sd = fixtures.identity_head_state(hc, scale=CONFIDENT)
            sd[f"{which}.weight"] = own
            return sd

        head = write_head(tmp_path / variant, bigram_target, state)
        assert json.loads((head / "config.json").read_text())["hass"][f"has_{which}"]
        llm = make_llm(bigram_target, {"method": "hass", "model": str(head),
                                       "num_speculative_tokens": 3})
        llm.generate(prompts(4), GREEDY)
        m = spec_metrics(llm)
        free_llm(llm)
        rates[variant] = m["num_accepted_tokens"] / m["num_draft_tokens"]
    assert rates["copy"] == 1.0
    assert rates["permuted"] < 0.2
