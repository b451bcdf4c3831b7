"""vLLM general plugin entry point (`vllm.general_plugins: hass`).

vLLM calls `register()` in every process it starts (API server, engine core,
workers) before any config is built, so method "hass" and the draft
architecture exist everywhere without a fork or a manual import.
"""

from __future__ import annotations

ARCH = "EagleHassLlamaForCausalLM"


def register() -> None:
    from vllm import ModelRegistry

    from vllm_hass import vllm_patches

    vllm_patches.apply()  # raises on an unsupported vLLM version
    if ARCH not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCH, "vllm_hass.draft_model:EagleHassLlamaForCausalLM")
