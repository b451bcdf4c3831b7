""""tree": "auto" without an engine: the cost model (interpolation, moving averages), the
acceptance statistics (a hand-computed example), the chooser (no drafts when drafting
does not pay, a deep tree when it does, no flapping, exploration within its budget),
the runtime's counting, clock and stats file, and hass.json's auto section."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from vllm_hass.auto_runtime import AutoRuntime, StepClock, observe
from vllm_hass.auto_tree import (NONE, Acceptance, Chooser, Costs, Piecewise, Shape, chain_flags,
                                 isotonic, parse_schedule, parse_shape, shape_grid)
from vllm_hass.config import TreeConfig, parse_spec
from vllm_hass.errors import UserError
from vllm_hass.step import DraftStore, Staging, verify_layout

BOUND = Shape(6, 10, 60)


# --- cost model ----------------------------------------------------------------------------


def test_piecewise_interpolates_and_extrapolates_its_prior():
    p = Piecewise([1, 2, 4, 8, 16])
    p.set_prior([1, 2, 4], [1.0, 2.0, 4.0])  # measured up to 4, linear beyond
    assert p.y == [1.0, 2.0, 4.0, 8.0, 16.0]
    assert p(3) == pytest.approx(3.0) and p(12) == pytest.approx(12.0)
    assert p(32) == pytest.approx(32.0)  # past the last point: proportional
    assert p(0) == 0.0


def test_piecewise_follows_a_uniform_slowdown_fast_and_keeps_its_shape():
    p = Piecewise([1, 2, 4, 8])
    p.set_prior([1, 2, 4, 8], [1.0, 2.0, 4.0, 8.0])
    p.update(2, 4.0)  # twice the prior: the scale moves scale_alpha of the way
    assert p.scale == pytest.approx(1.0 + p.scale_alpha) and p(2) < 4.0
    for i in range(60):  # the machine got twice as slow, at every size
        x = (1, 2, 4)[i % 3]
        p.update(x, 2.0 * x)
    assert p(2) == pytest.approx(4.0, rel=0.02) and p(8) == pytest.approx(16.0, rel=0.02)
    assert p(4) / p(1) == pytest.approx(4.0, rel=0.02)  # the ratio between sizes stays
    for _ in range(100):  # one size alone cannot show a shape error: the scale takes it
        p.update(4, 12.0)
    assert p(4) == pytest.approx(12.0, rel=0.01) and p(1) / p(4) == pytest.approx(0.25, rel=0.03)


def test_piecewise_corrects_its_shape_slowly_and_converges_at_a_point():
    p = Piecewise([1, 2, 4])
    p.set_prior([1, 2, 4], [1.0, 2.0, 4.0])
    for i in range(400):  # 4 tokens really cost 8x one token, not 4x
        p.update(1, 1.0) if i % 2 else p.update(4, 8.0)
    assert p(4) / p(1) == pytest.approx(8.0, rel=0.05)
    q = Piecewise([1, 2, 4])
    q.set_prior([1, 2, 4], [1.0, 2.0, 4.0])
    for _ in range(300):  # between the points: the prediction there converges
        q.update(3, 7.5)
    assert q(3) == pytest.approx(7.5, rel=1e-3)
    q.update(8, 16.0)  # past the end: proportional, onto the last point
    assert q(8) == pytest.approx(2 * q(4))


def test_costs_never_fall_with_more_work():
    """Noise made the 8-token step slower than the 16-token one: the fit is isotonic."""
    assert isotonic([1, 3, 2, 4]) == [1, 2.5, 2.5, 4]
    assert isotonic([1, 3, 2, 4], [1, 1, 3, 1]) == [1, 2.25, 2.25, 4]
    p = Piecewise([1, 8, 16, 32])
    p.load([1.0, 15.0, 12.0, 20.0])
    assert p(8) == p(16) == 13.5 and p(8) <= p(12) <= p(16) <= p(32)


def test_step_time_adds_the_parts():
    c = Costs(64, 8, 80)
    for part, slope in (("verify", 1.0), ("overhead", 0.5), ("first", 0.1), ("root", 0.2),
                        ("level", 0.05)):
        pw = getattr(c, part)
        pw.load([slope * x for x in pw.x])
    B, Be, T = 4, 3, 4
    # tree 3/2/6 for 3 of 4 requests: verify 4 + 3*5 tokens, first pass 4 + 3*3 rows,
    # root of 3 requests, 2 levels of 3*2 rows
    want = 1.0 * 19 + 0.5 * 4 + 0.1 * 13 + 0.2 * 3 + 2 * 0.05 * 6
    assert c.step_time(Shape(3, 2, 6), B, Be, T, head_on=True) == pytest.approx(want)
    assert c.step_time(NONE, B, Be, T, head_on=True) == pytest.approx(4 + 2 + 0.4)
    assert c.step_time(NONE, B, Be, T, head_on=False) == pytest.approx(4 + 2)  # no head at all


def test_observe_reads_a_steps_marks():
    c = Costs(64, 8, 80)
    for part in Costs.PARTS:  # a prior; each observation then sets its part's scale
        pw = getattr(c, part)
        pw.load([1e-4 * x for x in pw.x])
        pw.alpha, pw.scale_alpha = 0.0, 1.0
    marks = [("start", None, 0.0), ("verify_end", None, 0.010), ("first_end", None, 0.012),
             ("grow", (Shape(3, 2, 6), 2), 0.012), ("level", 4, 0.013), ("level", 4, 0.016),
             ("grown", None, 0.018), ("end", None, 0.018)]
    observe(c, {"B": 2, "tokens": 8, "first_rows": 4}, marks, gap=0.004)
    assert c.verify(8) == pytest.approx(0.010) and c.overhead(2) == pytest.approx(0.004)
    assert c.first(4) == pytest.approx(0.002) and c.root(2) == pytest.approx(0.001)
    assert c.level(4) == pytest.approx(0.002)  # levels of 3 ms, then 2 ms (the last)
    observe(c, {"B": 2, "tokens": 8, "first_rows": 4}, marks, gap=10.0)  # idle: not overhead
    assert c.overhead(2) == pytest.approx(0.004)


def test_cpu_clock_gives_times_and_gaps():
    clock = StepClock(torch.device("cpu"))
    for i in range(2):
        clock.mark("start")
        clock.mark("end")
        clock.end({"i": i})
    (a, ta, gap_a), (b, tb, gap_b) = clock.ready()
    assert a == {"i": 0} and gap_a is None and gap_b >= 0
    assert [lab for lab, _, _ in tb] == ["start", "end"] and tb[0][2] == 0.0 <= tb[1][2]
    assert clock.ready() == []


# --- acceptance --------------------------------------------------------------------------


def test_chain_flags_follow_each_first_child():
    # root -> 1, 2; 1 -> 3, 4; 2 -> 5; 3 -> 6   (slot 0 = root)
    parents = np.array([[-1, 0, 0, 1, 1, 2, 3]])
    live = np.ones_like(parents, dtype=bool)
    assert chain_flags(parents, live, 3).tolist() == [[True, True, False, True, False, False, True]]
    live[0, 6] = False  # truncated by the scheduler: the chain ends at depth 2
    assert chain_flags(parents, live, 3)[0, 6] == False  # noqa: E712


def test_acceptance_hand_computed():
    """Four verified top_k-2 trees of 3 nodes (MIN_TREES); two accept their rank-0 and
    rank-2 nodes (a path of 2), two only their rank-1 node (the top-1 child was rejected)."""
    acc = Acceptance([2], max_depth=2, max_total=4)  # G = 3 ranks
    #          root  a(d1,r0) b(d1,r1) c(d2,r2, child of a)
    depths = np.array([[0, 1, 1, 2]] * 4)
    ranks = np.array([[-1, 0, 1, 2]] * 4)
    parents = np.array([[-1, 0, 0, 1]] * 4)
    live = np.ones((4, 4), dtype=bool)
    chain = chain_flags(parents, live, 2)
    cells = acc.cells(np.array([0] * 4), depths, ranks, chain, live)
    assert (cells[:, 0] == acc.trash).all()  # the root counts nowhere
    offered = np.bincount(cells.ravel(), minlength=acc.n_cells).astype(float)
    hit = np.array([[0, 1, 0, 1], [0, 0, 1, 0]] * 2, dtype=float)
    accepted = np.zeros(acc.n_cells)
    np.add.at(accepted, cells.reshape(-1), np.repeat(hit.reshape(-1), 2))
    acc.add(offered, accepted)
    # top-1 path: depth 1 accepted 2 of 4, depth 2 (node c) 2 of 4
    assert acc.chain_p().tolist() == [0.5, 0.5]
    assert acc.tau(Shape(1, 1, 2)) == 1.5 and acc.tau(Shape(2, 1, 3)) == 2.0
    # trees: rank 0 -> 2/4, rank 1 -> 2/4, rank 2 (depth 2) -> 2/4
    assert acc.tau(Shape(2, 2, 4)) == pytest.approx(2.5)
    assert acc.tau(Shape(2, 2, 3)) == pytest.approx(2.0)  # ranks 0, 1
    assert acc.tau(Shape(1, 2, 4)) == pytest.approx(2.0)  # depth 1 only
    assert acc.tau(NONE) == 1.0
    # a table without data falls back to its top-1 path
    other = Acceptance([2, 4], max_depth=2, max_total=4)
    assert other.tau(Shape(2, 4, 4)) == 1.0


def test_counts_decay_with_new_trees_only():
    acc = Acceptance([2, 4], max_depth=2, max_total=4)
    t2 = acc.tree_cells // 2  # start of the top_k-4 table
    new = np.zeros(acc.n_cells)
    new[acc.G] = 8  # 8 trees of the top_k-2 table (their depth-1 rank-0 node)
    acc.add(new, new * 0.5)
    new4 = np.zeros(acc.n_cells)
    new4[t2 + acc.G] = 256  # HALF trees of the other table
    acc.add(new4, new4)
    assert acc.offered[acc.G] == 8 and acc.accepted[acc.G] == 4  # untouched: no new trees
    acc.add(new4, new4 * 0)
    assert acc.offered[t2 + acc.G] == 256 + 128 and acc.accepted[t2 + acc.G] == 128


# --- the chooser ---------------------------------------------------------------------------


def _costs(verify_per_token: float, fixed: float, draft_scale: float) -> Costs:
    """Synthetic costs: verify = fixed + per-token, head passes draft_scale per row."""
    c = Costs(4096, 64, 640)
    c.verify.load([fixed + verify_per_token * x for x in c.verify.x])
    c.overhead.load([0.0] * len(c.overhead.x))
    c.first.load([draft_scale * (0.2 + 0.01 * x) for x in c.first.x])
    c.root.load([draft_scale * (0.2 + 0.01 * x) for x in c.root.x])
    c.level.load([draft_scale * (0.4 + 0.01 * x) for x in c.level.x])
    return c


def _acceptance(p_chain: float, p_rank) -> Acceptance:
    grid = shape_grid(6, 10, 60)
    acc = Acceptance(sorted({s.top_k for s in grid if s.top_k > 1}), 6, 60)
    off, hit = np.zeros(acc.n_cells), np.zeros(acc.n_cells)
    n = 100.0
    for d in range(1, 7):
        off[acc.tree_cells + d] = n
        hit[acc.tree_cells + d] = n * p_chain ** d
    for k in acc.top_ks:
        base = acc.kind(k) * (acc.D + 1) * acc.G
        for g in range(acc.G):
            d = min(1 + g // k, 6)
            off[base + d * acc.G + g] = n
            hit[base + d * acc.G + g] = n * p_rank(d, g, k)
    acc.add(off, hit)
    return acc


def test_no_drafts_when_drafting_is_expensive_and_acceptance_low():
    grid = shape_grid(6, 10, 60)
    # compute-bound verification (CPU-like: every token costs), a slow head, 30% acceptance
    ch = Chooser(grid, _costs(1.0, 0.5, 2.0), _acceptance(0.3, lambda d, g, k: 0.3 ** d / k))
    plans = [ch.plan(16, 16, 16) for _ in range(3)]
    assert {p.shape for p in plans} == {NONE}
    assert not any(p.head_on or p.explore for p in plans)  # not even a perfect head could pay
    assert all(p.groups == [] for p in plans)
    # where a perfect head could pay but this one does not: the head stops after OFF_AFTER
    ch = Chooser(grid, _costs(0.01, 1.0, 0.05), _acceptance(0.02, lambda d, g, k: 0.0))
    plans = [ch.plan(1, 1, 1) for _ in range(Chooser.OFF_AFTER + 2)]
    assert {p.shape for p in plans} == {NONE} and plans[0].explore
    assert plans[Chooser.OFF_AFTER - 2].head_on and not plans[-1].head_on


def test_a_deep_tree_when_acceptance_is_high_and_verification_cheap():
    grid = shape_grid(6, 10, 60)
    # memory-bound verification (GPU-like: 60 tokens cost little more than 1), cheap head
    ch = Chooser(grid, _costs(0.002, 10.0, 0.05), _acceptance(0.85, lambda d, g, k: 0.9 ** d / k * 3))
    p = ch.plan(1, 1, 1)
    assert p.shape.depth == 6 and p.shape.top_k > 1, p.shape
    assert p.head_on and p.groups[-1] == p.shape


class _NoisyAcceptance:
    """Two chains whose predicted rates trade places by +-1% every step (timing noise)."""

    def __init__(self, costs, a, b):
        self.costs, self.a, self.b, self.i = costs, a, b, 0

    def tau(self, s):
        if s == NONE:
            return 1.0
        self.i += s == self.a
        eps = 0.01 if self.i % 2 else -0.01
        t = self.costs.step_time(s, 1, 1, 1, True)
        return 3.0 * t * (1 + (eps if s == self.a else -eps))

    def taus(self, g):
        return np.array([self.tau(s) for s in g.shapes])


@pytest.mark.parametrize("hysteresis", [True, False])
def test_hysteresis_prevents_flapping(hysteresis, monkeypatch):
    if not hysteresis:  # the control: the same noise flaps a chooser without it
        monkeypatch.setattr(Chooser, "MARGIN", 0.0)
        monkeypatch.setattr(Chooser, "DWELL", 0)
    a, b = Shape(2, 1, 3), Shape(3, 1, 4)
    costs = _costs(0.01, 1.0, 0.01)
    ch = Chooser([NONE, a, b], costs, _NoisyAcceptance(costs, a, b))
    shapes = [ch.plan(1, 1, 1).shape for _ in range(200)]
    switches = sum(x != y for x, y in zip(shapes, shapes[1:]))
    assert NONE not in shapes
    assert (switches == 0) if hysteresis else (switches > 50), switches


def test_exploration_stays_within_its_budget():
    grid = shape_grid(6, 10, 60)
    costs = _costs(0.01, 1.0, 0.05)
    ch = Chooser(grid, costs, _acceptance(0.5, lambda d, g, k: 0.5 ** d / k))
    plans = [ch.plan(8, 8, 8) for _ in range(3000)]
    explored = [i for i, p in enumerate(plans) if p.explore]
    assert explored and explored[0] == 0  # the first step explores (nothing measured yet)
    for i in explored:
        p = plans[i]
        assert p.groups[0] == ch.bound and p.groups[1:] == ([p.shape] if p.shape != NONE else [NONE])
    # the extra time of the explored steps over what the chosen shape would have cost
    extra = sum(costs.step_time(ch.bound, 8, 1, 8 + 7 * plans[i].shape.drafts, True)
                - costs.step_time(plans[i].shape, 8, 8, 8, True) for i in explored)
    total = sum(costs.step_time(p.shape, 8, 8, 8, True) for p in plans)
    assert extra / total < 0.015, (len(explored), extra / total)


class _FixedAcceptance:
    def __init__(self, taus):
        self.t = taus

    def tau(self, s):
        return self.t.get(s, 1.0)

    def taus(self, g):
        return np.array([self.tau(s) for s in g.shapes])


@pytest.mark.parametrize("tau,marginal", [(1.2, True), (3.0, False)])
def test_a_marginal_choice_steps_without_drafts_now_and_then(tau, marginal):
    """Drafting only a little faster than none: every EXPLORE_MIN-th step drafts nothing,
    so both step sizes are measured close together; a clear win never pauses."""
    a = Shape(1, 1, 2)
    ch = Chooser([NONE, a], _costs(0.01, 1.0, 0.01), _FixedAcceptance({a: tau}))
    plans = [ch.plan(4, 4, 4) for _ in range(64)]
    assert {p.shape for p in plans} == {a} and not any(p.explore for p in plans)
    paused = [i + 1 for i, p in enumerate(plans) if not p.groups]
    assert paused == ([16, 32, 48, 64] if marginal else [])


def test_schedule_forces_shapes_in_turn():
    sched = parse_schedule("4/3/10,none,2/2/4|1/1/2|none,off", BOUND)
    assert sched == [[Shape(4, 3, 10)], [NONE], [Shape(2, 2, 4), Shape(1, 1, 2), NONE], []]
    ch = Chooser(shape_grid(6, 10, 60), Costs(64, 8, 80), Acceptance([2], 6, 60), sched)
    plans = [ch.plan(4, 4, 4) for _ in range(5)]
    assert [p.shape for p in plans] == [Shape(4, 3, 10), NONE, Shape(2, 2, 4), NONE, Shape(4, 3, 10)]
    assert [p.head_on for p in plans] == [True, True, True, False, True]
    assert plans[1].groups == [] and plans[2].groups == sched[2]
    for bad in ("7/1/8", "2/2/8", "3/1/3", "x"):  # deeper than the bound, over capacity, ...
        with pytest.raises(ValueError):
            parse_shape(bad, BOUND)


def test_grid_is_small_and_within_the_bound():
    grid = shape_grid(6, 10, 60)
    assert 20 <= len(grid) <= 40 and NONE in grid and BOUND in grid
    assert all(s.total_tokens <= 1 + s.top_k + (s.depth - 1) * s.top_k ** 2 for s in grid if s.depth)
    assert [s for s in grid if s.top_k == 1] == [Shape(k, 1, k + 1) for k in range(1, 7)]
    assert shape_grid(3, 1, 4) == [NONE, Shape(1, 1, 2), Shape(2, 1, 3), Shape(3, 1, 4)]


# --- the runtime ---------------------------------------------------------------------------


def test_runtime_counts_accepted_slots_on_the_device(monkeypatch, tmp_path):
    from types import SimpleNamespace

    from vllm_hass.sampler import Accepted
    from vllm_hass.tree import VerifyTrees

    monkeypatch.setenv("VLLM_HASS_AUTO_STATS", str(tmp_path / "stats.json"))
    rt = AutoRuntime(TreeConfig(2, 2, 4, auto=True), torch.device("cpu"), 64, 4)
    depths = np.array([[0, 1, 1, 2]])
    ranks = np.array([[-1, 0, 1, 2]])
    parents = np.array([[-1, 0, 0, 1]])
    live = np.ones((1, 4), dtype=bool)
    cells = rt.cells(np.array([rt.acc.kind(2)]), depths, ranks, parents, live)
    step = SimpleNamespace(stat_cells=torch.from_numpy(cells),
                           trees=VerifyTrees(torch.zeros(1, 4), None, None, None, None))
    rt.count(step, Accepted(torch.tensor([[1, 3]]), None, None, None))
    assert rt.counts_dev.sum() == 4  # two nodes, each in its tree and its top-1 path cell
    for part in Costs.PARTS:  # some costs: a perfect head could pay, so step 0 explores
        pw = getattr(rt.costs, part)
        pw.load([1e-3 * (1 + 0.01 * x) for x in pw.x])
    p = rt.plan(1, 1, 1)  # step 0: the counters go to the host, read at the next begin
    assert p.explore and rt.assign(p, 1)[0][0] == rt.chooser.bound
    rt.begin()
    assert rt.acc.chain_p()[:2].tolist() == [1.0, 1.0]
    assert rt.acc.tau(Shape(2, 2, 4)) == 3.0  # 1 tree: below MIN_TREES, its top-1 path
    data = json.loads((tmp_path / "stats.json").read_text())
    assert set(data) >= {"shape_steps", "costs", "acceptance"}
    assert data["shape_steps"] == {"none": 1} and data["explore_steps"] == 1
    assert data["steps"] == 1 and "verify_ms" in data["costs"]


def test_runtime_assigns_groups():
    from vllm_hass.auto_tree import Plan

    rt = AutoRuntime(TreeConfig(3, 2, 8, auto=True), torch.device("cpu"), 64, 8)
    a, b = Shape(3, 2, 8), Shape(1, 1, 2)
    assert rt.assign(Plan(a, [a]), 3)[0][1].tolist() == [0, 1, 2]
    split = rt.assign(Plan(a, [a, NONE, b]), 5)  # in turn; NONE's requests get nothing
    assert [(s, p.tolist()) for s, p in split] == [(a, [0, 3]), (b, [2])]
    ex = [rt.assign(Plan(b, [a, b], explore=True), 3) for _ in range(2)]
    assert [(s, p.tolist()) for s, p in ex[0]] == [(a, [0]), (b, [1, 2])]
    assert [(s, p.tolist()) for s, p in ex[1]] == [(a, [1]), (b, [0, 2])]  # the next request
    only = rt.assign(Plan(NONE, [a, NONE], explore=True), 2)  # the 3rd exploration: request 0
    assert [(s, p.tolist()) for s, p in only] == [(a, [0])]
    assert rt.assign(Plan(NONE, []), 4) == []


def test_verify_layout_stages_statistics_cells_for_trees_of_mixed_shapes():
    """Requests verified with trees of different shapes (and one with none) in one step; the
    cells the device sees are the host's."""
    store = DraftStore(8, 16)
    store.replace(["r0", "r1"], np.array([
        [[11, 12, 13, 14, 15], [7, -1, -1, -1, -1]],  # tokens: a 5-node tree, a 1-node chain
        [[0, 0, 1, 1, 2], [0, -1, -1, -1, -1]],  # parents
        [[1, 1, 2, 2, 2], [1, -1, -1, -1, -1]],  # depths
        [[0, 1, 2, 3, 4], [0, -1, -1, -1, -1]],  # ranks
    ]), kind=np.array([0, -1]))
    acc = Acceptance([2], 2, 8)
    seen = {}

    def stats(kind, depths, ranks, parents, live):
        seen.update(kind=kind.tolist(), ranks=ranks.tolist())
        return acc.cells(kind, depths, ranks, chain_flags(parents, live, 2), live)

    drafts = [[11, 12, 13, 14, 15], [7], []]
    B, k = 3, np.array([5, 1, 0])
    qsl = np.concatenate([[0], np.cumsum(1 + k)])
    ids = np.concatenate([[100 + b, *drafts[b]] for b in range(B)]).astype(np.int64)
    step = verify_layout(num_reqs=B, qsl=qsl, computed=np.array([10, 20, 30]), num_drafts=k,
                         input_ids=ids, store=store, req_ids=["r0", "r1", "r2"],
                         block_table=torch.zeros(B, 4, dtype=torch.int32),
                         positions=torch.zeros(int(qsl[-1]), dtype=torch.int64),
                         staging=Staging(4096, "cpu"), stats=stats)
    assert seen["kind"] == [0, -1, -1]
    assert seen["ranks"][0] == [-1, 0, 1, 2, 3, 4] and seen["ranks"][2] == [-1] * 6
    assert step.req_depth.tolist() == [2, 1, 0]
    assert torch.equal(step.stat_cells, torch.from_numpy(step.stat_cells_host))
    cells = step.stat_cells_host
    assert (cells[0, 1:, 0] != acc.trash).all() and (cells[1:, :, 0] == acc.trash).all()
    assert cells[1, 1, 1] == acc.tree_cells + 1  # the chain's node: its top-1-path cell


# --- hass.json -----------------------------------------------------------------------------


def test_auto_spec_and_bounds(identity_head):
    def spec(tree):
        return parse_spec({"method": "hass", "model": str(identity_head), "tree": tree})

    s = spec("auto")
    assert s.tree == TreeConfig(6, 10, 60, auto=True) and s.num_speculative_tokens == 59
    assert s.tree.to_dict() == {"depth": 6, "top_k": 10, "total_tokens": 60, "auto": True}
    assert spec({"auto": True}).tree == s.tree
    s = spec({"auto": True, "max_depth": 3, "max_top_k": 4, "max_total_tokens": 16})
    assert s.tree == TreeConfig(3, 4, 16, auto=True) and s.num_speculative_tokens == 15
    # bounds no shape can reach are lowered: depth <= total - 1; total <= what fits
    assert spec({"auto": True, "max_total_tokens": 4}).tree == TreeConfig(3, 10, 4, auto=True)
    assert spec({"auto": True, "max_depth": 2, "max_top_k": 2}).tree == TreeConfig(2, 2, 7, auto=True)
    fixed = spec({"depth": 4, "top_k": 3, "total_tokens": 10})
    assert fixed.tree == TreeConfig(4, 3, 10) and not fixed.tree.auto  # honoured as before


AUTO_BAD = [
    ("fast", "'tree' must be an object with depth, top_k, total_tokens (or \"auto\"), got 'fast'"),
    ({"auto": False}, "'tree.auto' must be true (or leave it out for a fixed tree), got False"),
    ({"auto": "yes"}, "'tree.auto' must be true"),
    ({"auto": True, "depth": 4}, "unknown key 'tree.depth' with 'tree.auto' (expected auto, "
                                 "max_depth, max_top_k, max_total_tokens)"),
    ({"auto": True, "max_depth": 0}, "'tree.max_depth' must be an integer >= 1, got 0"),
    ({"auto": True, "max_top_k": "4"}, "'tree.max_top_k' must be an integer >= 1, got '4'"),
    ({"auto": True, "max_top_k": True}, "'tree.max_top_k' must be an integer >= 1, got True"),
    ({"auto": True, "max_total_tokens": 1}, "'tree.max_total_tokens' must be an integer >= 2, got 1"),
    ({"auto": True, "max_total_tokens": 200}, "'tree.max_total_tokens' must be <= 128, got 200"),
]


@pytest.mark.parametrize("tree,message", AUTO_BAD, ids=[m for _, m in AUTO_BAD])
def test_auto_spec_errors(identity_head, tree, message):
    with pytest.raises(UserError) as e:
        parse_spec({"method": "hass", "model": str(identity_head), "tree": tree})
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_auto_top_k_bound_meets_a_small_vocabulary(small_vocab):
    _, head = small_vocab  # 6 tokens
    spec = parse_spec({"method": "hass", "model": str(head), "tree": "auto"})
    assert spec.tree.top_k == 6  # the default bound, lowered
    with pytest.raises(UserError) as e:
        parse_spec({"method": "hass", "model": str(head), "tree": {"auto": True, "max_top_k": 8}})
    assert "'tree.max_top_k' must be <= the head's vocabulary (6), got 8" in str(e.value)


def test_metrics_collector_reads_the_stats_file(tmp_path):
    """auto_metrics: the stats file's counts as Prometheus counters (zeros before the
    engine's first snapshot), served from the default registry; a second engine's
    collector replaces the first's."""
    from prometheus_client import REGISTRY, generate_latest

    from vllm_hass import auto_metrics

    path = tmp_path / "stats.json"
    auto_metrics.register(str(path))
    text = generate_latest(REGISTRY).decode()
    assert "vllm:hass_auto_head_off_steps_total 0.0" in text
    assert "vllm:hass_auto_tree_steps_total{" not in text
    path.write_text(json.dumps({"shape_steps": {"none": 7, "3/1/4": 5}, "head_off_steps": 2,
                                "explore_steps": 1}))
    text = generate_latest(REGISTRY).decode()
    assert 'vllm:hass_auto_tree_steps_total{shape="3/1/4"} 5.0' in text
    assert 'vllm:hass_auto_tree_steps_total{shape="none"} 7.0' in text
    assert "vllm:hass_auto_head_off_steps_total 2.0" in text
    assert "vllm:hass_auto_explore_steps_total 1.0" in text
    path.write_text("{trunc")  # never raises into a scrape
    assert "vllm:hass_auto_explore_steps_total 0.0" in generate_latest(REGISTRY).decode()
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"shape_steps": {"2/1/3": 4}}))
    auto_metrics.register(str(other))
    text = generate_latest(REGISTRY).decode()
    assert text.count("# TYPE vllm:hass_auto_tree_steps_total counter") == 1
    assert 'shape="2/1/3"} 4.0' in text and 'shape="3/1/4"' not in text


def test_metrics_stats_path_defaults_to_a_fresh_file(monkeypatch, tmp_path):
    from vllm_hass import auto_metrics
    from vllm_hass.auto_runtime import STATS_ENV

    monkeypatch.setenv(STATS_ENV, str(tmp_path / "mine.json"))
    assert auto_metrics.stats_path() == str(tmp_path / "mine.json")
    monkeypatch.delenv(STATS_ENV)
    a, b = auto_metrics.stats_path(), auto_metrics.stats_path()
    assert a != b and not os.path.exists(a)  # the runtime writes the first snapshot
