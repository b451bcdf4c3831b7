"""vLLM general plugin entry point (`vllm.general_plugins: hass`).

vLLM calls `register()` in every process it starts (API server, engine core,
workers) before any config is built, so method "hass" and the draft
architecture exist everywhere without a fork or a manual import.
"""

from __future__ import annotations

ARCH = "EagleHassLlamaForCausalLM"


class _ToVllmLog:
    """Forwards the plugin's records to vLLM's logger (configured lazily by vLLM, so its
    handlers are looked up at each record), unless the application set up logging on
    the root logger, where the records propagate anyway."""

    level = 0

    def handle(self, record) -> None:
        import logging

        if not logging.getLogger().handlers:
            logging.getLogger("vllm").handle(record)


def _log_through_vllm() -> None:
    """The plugin's INFO lines (trees configured, async scheduling turned off, each patch
    applied) appear in vLLM's log, formatted like vLLM's own."""
    import logging

    ours = logging.getLogger("vllm_hass")
    if any(isinstance(h, _ToVllmLog) for h in ours.handlers):
        return
    if ours.level == logging.NOTSET:
        ours.setLevel(logging.INFO)
    ours.addHandler(_ToVllmLog())


def register() -> None:
    from vllm import ModelRegistry

    from vllm_hass import vllm_patches

    _log_through_vllm()

    vllm_patches.apply()  # raises on an unsupported vLLM version
    if ARCH not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCH, "vllm_hass.draft_model:EagleHassLlamaForCausalLM")
