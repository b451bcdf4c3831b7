"""vllm-hass: serve HASS / EAGLE-1/2 draft heads in vLLM with EAGLE-2 dynamic draft trees."""

__version__ = "0.1.0"
