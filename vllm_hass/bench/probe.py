"""A vLLM worker extension that reports the plugin's per-request state, for leak checks.

`vllm serve ... --worker-extension-cls vllm_hass.bench.probe.HassStateProbe` with
`VLLM_SERVER_DEV_MODE=1` lets a client `POST /collective_rpc {"method": "hass_state"}`
and read, from outside the server process, which request ids vLLM's runner and the
plugin still hold. That is how the load test checks that aborts and preemptions leave
nothing behind without a test-only hook in the runner. Imports nothing heavy: vLLM
loads this class in every worker.
"""

from __future__ import annotations


class HassStateProbe:
    """Mixed into vLLM's Worker by `--worker-extension-cls`; `self` is the worker."""

    def hass_state(self) -> dict:
        """Request ids held by vLLM's runner (`requests`, `batch`) and by the plugin
        (`store`: the last drafted trees, `params_ok`: the tree-eligibility cache)."""
        r = self.model_runner  # type: ignore[attr-defined]
        store = getattr(r, "_hass_store", None)
        params = getattr(r, "_hass_params_ok", None)
        return {
            "requests": sorted(r.requests),
            "batch": [x for x in r.input_batch.req_ids if x is not None],
            "store": None if store is None else sorted(store.index),
            "params_ok": None if params is None else sorted(params),
            "max_num_reqs": int(r.max_num_reqs),
            "prunes_params": "_on_request_state_removed" in _mixin_dict(r),
        }


def _mixin_dict(runner) -> dict:
    """The plugin mixin's own attributes (empty when the runner is vLLM's own)."""
    for cls in type(runner).__mro__:
        if cls.__name__ == "HassRunnerMixin":
            return dict(vars(cls))
    return {}
