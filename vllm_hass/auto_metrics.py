"""`"tree": "auto"` on vLLM's /metrics: steps per chosen shape as Prometheus counters.

The chooser runs in the engine's worker (rank 0 of the TP group), /metrics is served by
the API server's process: the two share the auto stats file (auto_runtime.AutoRuntime
rewrites it atomically when the shape changes, every STATS_EVERY steps and once the
engine goes idle). `register` (called where hass.json is read, in the process that serves
/metrics, vllm_patches section 2) puts a collector on prometheus_client's default
registry that reads the file at each scrape:

    vllm:hass_auto_tree_steps_total{shape="4/4/16"}   engine steps drafted with that shape
                                                    ("none": no drafts; depth/top_k/total)
    vllm:hass_auto_head_off_steps_total             ... of which the head did not run at all
    vllm:hass_auto_explore_steps_total              ... of which one request explored

The "vllm:" prefix puts them beside vLLM's own counters (and in `LLM.get_metrics()`).
vLLM's multi-process metrics mode (--api-server-count > 1, or PROMETHEUS_MULTIPROC_DIR
set) serves a registry of its own instead: there the counters are not on /metrics (a
warning says so at start-up) and the stats file still has them.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile

logger = logging.getLogger("vllm_hass")

STEPS = "vllm:hass_auto_tree_steps"
HEAD_OFF = "vllm:hass_auto_head_off_steps"
EXPLORE = "vllm:hass_auto_explore_steps"

_registered: dict = {}  # "collector": the one on the default registry (replaced per engine)


def stats_path() -> str:
    """The stats file of a new engine: $VLLM_HASS_AUTO_STATS if set, else a fresh file in
    the temporary directory (removed when the process exits)."""
    from vllm_hass.auto_runtime import STATS_ENV

    path = os.environ.get(STATS_ENV)
    if path:
        return path
    fd, path = tempfile.mkstemp(prefix="vllm-hass-auto-", suffix=".json")
    os.close(fd)
    os.unlink(path)  # an empty file is not a snapshot: the runtime writes the first one
    import atexit

    atexit.register(_remove, path)
    return path


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


class AutoStatsCollector:
    """Reads the stats file at each collect() (a missing or partial file: zeros)."""

    def __init__(self, path: str):
        self.path = path

    def read(self) -> dict:
        try:
            with open(self.path) as f:
                snap = json.load(f)
            return snap if isinstance(snap, dict) else {}
        except (OSError, ValueError):
            return {}

    def collect(self):
        from prometheus_client.core import CounterMetricFamily

        snap = self.read()
        steps = CounterMetricFamily(STEPS, 'vllm-hass "tree": "auto": engine steps per chosen '
                                    'shape (depth/top_k/total_tokens, or none)', labels=["shape"])
        for shape, n in sorted((snap.get("shape_steps") or {}).items()):
            steps.add_metric([shape], float(n))
        yield steps
        yield CounterMetricFamily(HEAD_OFF, 'vllm-hass "tree": "auto": steps with the draft '
                                  "head switched off", value=float(snap.get("head_off_steps", 0)))
        yield CounterMetricFamily(EXPLORE, 'vllm-hass "tree": "auto": steps in which one '
                                  "request explored the largest tree",
                                  value=float(snap.get("explore_steps", 0)))


def register(path: str) -> None:
    """Expose the engine's auto counters (stats file `path`) on the default registry; a
    later engine in the same process replaces an earlier one's collector."""
    from prometheus_client import REGISTRY

    old = _registered.pop("collector", None)
    if old is not None:
        try:
            REGISTRY.unregister(old)
        except KeyError:  # vLLM's unregister_vllm_metrics may have removed it
            pass
    collector = AutoStatsCollector(path)
    REGISTRY.register(collector)
    _registered["collector"] = collector
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        logger.warning("vllm-hass: PROMETHEUS_MULTIPROC_DIR is set (multi-process metrics): the "
                       '"tree": "auto" counters are not on /metrics; they are in %s', path)
