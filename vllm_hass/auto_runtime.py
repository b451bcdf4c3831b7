"""`"tree": "auto"` inside the engine step: timing, acceptance counting, the per-step plan,
its log line, the stats file (vllm_hass/auto_tree.py has the model and the chooser).

The runner calls, per step: `begin` (_prepare_inputs), `cells` (verify_layout's
statistics cells), `count` (_sample, after acceptance), `plan` (propose), `clock.mark`
(propose and the drafter), `end` (propose, before the drafts' one sync).

* Timing adds no device sync. CPU: time.perf_counter (the step is synchronous). CUDA: a
  pool of timing events recorded on the stream and read when complete (`query()`, which
  does not wait) — in practice one step later, after the step's own sync.
* Acceptance: per verified slot, `count` adds "on the accepted path" into a small device
  vector at the slot's cell (fixed-shape index_add_, no sync); offered counts are known on
  the host. Every READ_EVERY steps the device vector goes to a host buffer in a
  non-blocking copy and is consumed the step after (vLLM syncs every step in between).
* The stats file (VLLM_HASS_AUTO_STATS, else a temporary file; rank 0): rewritten
  atomically when the chosen shape changes, every STATS_EVERY steps, and once the engine
  has gone idle (a small daemon thread), so after a run it is complete within ~1 s. The
  API server's /metrics reads it (vllm_hass/auto_metrics.py).
* Tensor parallel: every rank must choose the same shapes (their trees must agree). The
  acceptance counts are identical on all ranks (same decisions); the costs are not (each
  rank times itself), so the chooser reads a copy of rank 0's cost model, refreshed every
  READ_EVERY steps by `broadcast` (the TP group's CPU broadcast): identical inputs,
  identical choices.

No vLLM import (the runner passes `broadcast`, the rank and the logger).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import weakref
from collections import Counter

import numpy as np
import torch

from vllm_hass.auto_tree import (NONE, Acceptance, Chooser, Costs, Plan, Shape, chain_flags,
                                 parse_schedule, shape_grid)

STATS_ENV = "VLLM_HASS_AUTO_STATS"  # path: JSON rewritten every STATS_EVERY steps / on a change
SCHEDULE_ENV = "VLLM_HASS_AUTO_SCHEDULE"  # test only: a forced shape schedule (auto_tree.parse_schedule)
READ_EVERY = 32
STATS_EVERY = 50
IDLE_FLUSH = 0.5  # seconds


class StepClock:
    """Marks within a step; `ready()` returns finished steps as (info, [(label, data,
    seconds since the step's first mark)], gap: seconds since the previous step's last
    mark or None)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []
        self.pending: list = []
        self._pool: list = []
        self._prev_end = None  # the last read step's last mark (kept for the gap)

    def mark(self, label: str, data=None) -> None:
        if self.cuda:
            ev = self._pool.pop() if self._pool else torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append((label, data, ev))
        else:
            self.marks.append((label, data, time.perf_counter()))

    def end(self, info) -> None:
        if self.marks:
            self.pending.append((info, self.marks))
        self.marks = []

    def discard(self) -> None:
        """Drop the marks of a step that never ended (vLLM skipped its drafting)."""
        if self.cuda:
            self._pool.extend(ev for _, _, ev in self.marks)
        self.marks = []

    def ready(self) -> list:
        out = []
        while self.pending and (not self.cuda or self.pending[0][1][-1][2].query()):
            info, marks = self.pending.pop(0)
            t0 = marks[0][2]
            if self.cuda:
                times = [(lab, d, t0.elapsed_time(ev) / 1e3) for lab, d, ev in marks]
                gap = None if self._prev_end is None else self._prev_end.elapsed_time(t0) / 1e3
                if self._prev_end is not None:
                    self._pool.append(self._prev_end)
                self._pool.extend(ev for _, _, ev in marks[:-1])
            else:
                times = [(lab, d, t - t0) for lab, d, t in marks]
                gap = None if self._prev_end is None else t0 - self._prev_end
            self._prev_end = marks[-1][2]
            out.append((info, times, gap))
        return out


def observe(costs: Costs, info: dict, times: list, gap: float | None) -> None:
    """Feed one finished step's timings into the cost model (see Costs for the parts)."""
    at = {lab: t for lab, _, t in times if lab in ("verify_end", "first_end", "end")}
    if "verify_end" not in at:
        return
    costs.verify.update(info["tokens"], at["verify_end"])
    inside = times[-1][2]
    if gap is not None and gap < 2 * inside + 0.005:  # else the engine sat idle between steps
        costs.overhead.update(info["B"], gap)
    if "first_end" in at:
        costs.first.update(info["first_rows"], at["first_end"] - at["verify_end"])
    for i, (lab, data, t) in enumerate(times):
        if lab == "grow":
            shape, Be = data
            nxt = [times[j] for j in range(i + 1, len(times)) if times[j][0] in ("level", "grown")]
            levels = [x for x in nxt[: shape.depth - 1] if x[0] == "level"]
            ends = nxt[1: len(levels) + 1]
            costs.root.update(Be, (nxt[0][2] if nxt else t) - t)
            for (_, width, t1), (_, _, t2) in zip(levels, ends):
                costs.level.update(width, t2 - t1)


class AutoRuntime:
    """The engine-side state of "tree": "auto" for one runner (see the module docstring)."""

    def __init__(self, bound, device: torch.device, max_tokens: int, max_reqs: int, *,
                 rank: int = 0, broadcast=None, logger: logging.Logger | None = None,
                 stats_path: str | None = None):
        self.bound = Shape(bound.depth, bound.top_k, bound.total_tokens)
        self.grid = shape_grid(bound.depth, bound.top_k, bound.total_tokens)
        self.costs = Costs(max_tokens, max_reqs, max_reqs * bound.top_k)
        self.costs_used = self.costs if broadcast is None else Costs(max_tokens, max_reqs,
                                                                     max_reqs * bound.top_k)
        top_ks = sorted({s.top_k for s in self.grid if s.top_k > 1})
        self.acc = Acceptance(top_ks, bound.depth, bound.total_tokens)
        text = os.environ.get(SCHEDULE_ENV)
        try:
            schedule = parse_schedule(text, self.bound) if text else None
        except ValueError as e:
            raise ValueError(f"{SCHEDULE_ENV}={text!r}: {e}") from None
        self.chooser = Chooser(self.grid, self.costs_used, self.acc, schedule)
        self.clock = StepClock(device)
        self.device = device
        self.rank, self.broadcast, self.logger = rank, broadcast, logger or logging.getLogger("vllm_hass")
        self.counts_dev = torch.zeros(self.acc.n_cells, dtype=torch.float32, device=device)
        pin = device.type == "cuda"
        self.counts_host = torch.zeros(self.acc.n_cells, dtype=torch.float32, pin_memory=pin)
        self.offered = np.zeros(self.acc.n_cells)  # host counts since the last read
        self.offered_read = None  # the host counts matching the copy in flight
        self.steps = 0
        self.shape_steps: Counter = Counter()
        self.explore_steps = 0
        self.head_off_steps = 0
        self.explored = 0  # which request explores next (in turn)
        self.last: tuple | None = None  # (shape, head_on) last logged
        # the engine's file (auto_metrics.stats_path: $VLLM_HASS_AUTO_STATS or a temporary one)
        self.stats_path = (stats_path or os.environ.get(STATS_ENV)) if rank == 0 else None
        self.counted = 0  # steps counted in shape_steps
        self.written = -1  # ... of which the stats file shows
        self._changed = False
        self.last_step = 0.0
        self._lock = threading.Lock()
        if self.stats_path:
            threading.Thread(target=_flush_when_idle, args=(weakref.ref(self),), daemon=True,
                             name="vllm-hass-auto-stats").start()

    # -- per step ----------------------------------------------------------------------
    def begin(self) -> None:
        self.clock.discard()
        self.clock.mark("start")
        for info, times, gap in self.clock.ready():
            observe(self.costs, info, times, gap)
        if self.offered_read is not None:  # the copy issued a step ago has landed
            self.acc.add(self.offered_read, self.counts_host.numpy().astype(np.float64))
            self.offered_read = None

    def cells(self, kind, depths, ranks, parents, live) -> np.ndarray:
        """verify_layout's `stats`: [B, N, 2] counter cells; the offered counts, here."""
        chain = chain_flags(parents, live, int(depths.max()))
        cells = self.acc.cells(kind, depths, ranks, chain, live)
        self.offered += np.bincount(cells.ravel(), minlength=self.acc.n_cells)
        return cells

    def count(self, step, acc) -> None:
        """Accepted slots of this step's trees into the device counters (fixed shapes)."""
        if step.stat_cells is None:
            return
        B, N = step.trees.tokens.shape
        path = acc.path  # [B, D] accepted slots, -1 padded
        hit = torch.zeros(B, N + 1, dtype=torch.float32, device=path.device)
        hit.scatter_(1, torch.where(path >= 0, path, N), 1.0)
        vals = hit[:, :N].unsqueeze(-1).expand(B, N, 2)
        self.counts_dev.index_add_(0, step.stat_cells.reshape(-1), vals.reshape(-1))

    def plan(self, B: int, Be: int, T_base: int) -> Plan:
        """This step's plan; every READ_EVERY steps also the counters' copy to the host and
        (TP) rank 0's costs to every rank."""
        if self.steps % READ_EVERY == 0 or self.steps in (1, 2, 4, 8, 16):  # early: sooner
            self.counts_host.copy_(self.counts_dev, non_blocking=True)
            self.counts_dev.zero_()
            self.offered_read, self.offered = self.offered, np.zeros(self.acc.n_cells)
            if self.broadcast is not None:
                self.costs_used.load(self.broadcast(self.costs.state() if self.rank == 0 else None))
        self.steps += 1
        p = self.chooser.plan(B, Be, T_base)
        now = (self.chooser.current, self.chooser.head_on)
        self._changed = now != self.last
        if self._changed and self.rank == 0 and self.chooser.schedule is None:
            self.logger.info("vllm-hass: auto tree -> %s%s (batch %d)", now[0],
                             "" if now[1] else ", head off", B)
        self.last = now
        if not p.head_on:  # counted here; head-on steps in assign (what was drafted)
            self._count(NONE, False)
        return p

    def _count(self, shape: Shape, explored: bool) -> None:
        self.shape_steps[shape.key] += 1
        self.explore_steps += explored
        self.head_off_steps += not self.chooser.head_on
        self.counted += 1
        if self.stats_path and (self._changed or self.steps % STATS_EVERY == 0):
            self.write_stats()
        self.last_step = time.monotonic()

    def assign(self, plan: Plan, n: int) -> list[tuple[Shape, np.ndarray]]:
        """plan.groups over the n requests that can be drafted for -> [(shape, positions
        [k])], NONE dropped; counts the step under the shape its requests got ("none"
        when none got drafts, e.g. every request's draft KV has holes)."""
        out = self._assign(plan, n)
        drafted = [s for s, _ in out if not (plan.explore and s == plan.groups[0])]
        self._count(drafted[0] if drafted else NONE,
                    plan.explore and bool(out) and out[0][0] == plan.groups[0])
        return out

    def _assign(self, plan: Plan, n: int) -> list[tuple[Shape, np.ndarray]]:
        ar = np.arange(n)
        if not plan.groups or n == 0:
            return []
        if plan.explore:
            pick = self.explored % n
            self.explored += 1
            out = [(plan.groups[0], ar[pick: pick + 1])]
            if len(plan.groups) > 1:
                out.append((plan.groups[1], np.delete(ar, pick)))
        else:
            g = len(plan.groups)
            out = [(s, ar[ar % g == i]) for i, s in enumerate(plan.groups)]
        return [(s, pos) for s, pos in out if s != NONE and pos.size]

    # -- the stats file ----------------------------------------------------------------
    def snapshot(self) -> dict:
        return {"steps": self.counted, "shape_steps": dict(self.shape_steps),
                "explore_steps": self.explore_steps, "head_off_steps": self.head_off_steps,
                "current": self.chooser.current.key, "head_on": self.chooser.head_on,
                "bound": self.bound.key, "costs": self.costs.to_json(),
                "acceptance": self.acc.to_json(self.grid)}

    def write_stats(self) -> None:
        """Rewrite the stats file atomically (temporary sibling, then os.replace)."""
        with self._lock:
            path = self.stats_path
            if path is None:
                return
            tmp = f"{path}.tmp{os.getpid()}"
            try:
                self.written = self.counted
                with open(tmp, "w") as f:
                    json.dump(self.snapshot(), f)
                os.replace(tmp, path)
            except OSError as e:  # a bad path must not stop serving
                self.logger.warning("vllm-hass: cannot write %s=%s: %s", STATS_ENV, path, e)
                self.stats_path = None


def _flush_when_idle(ref) -> None:
    """Rewrite the stats file once the engine has been idle IDLE_FLUSH seconds with steps
    the file does not show yet (the end of a run), so it is complete within ~1 s of the
    last step. Ends with its runtime (a weak reference)."""
    while True:
        time.sleep(IDLE_FLUSH)
        rt = ref()
        if rt is None or rt.stats_path is None:
            return
        if rt.written < rt.counted and time.monotonic() - rt.last_step > IDLE_FLUSH:
            rt.write_stats()
        del rt
