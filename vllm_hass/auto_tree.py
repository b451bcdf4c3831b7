"""`"tree": "auto"`: which draft tree to grow this step, from costs measured on the running
engine and acceptance measured online.

Each step the chooser (`Chooser.plan`) picks, for the current batch, the shape (depth,
top_k, total_tokens; a chain is top_k = 1; or no drafts at all) of a small grid
(`shape_grid`) that maximizes expected accepted tokens per second:

    rate(shape) = [(B - Be) + Be * tau(shape)] / t_step(shape)

B requests in the batch, Be of them may be drafted for; tau from `Acceptance` (how
often the node of depth d and score rank g was accepted, no labels needed), t_step from
`Costs` (target verification as a function of scheduled tokens, vLLM's own per-step
work as a function of B, the draft's first pass, its root and per-level passes as a
function of their rows). Hysteresis (a margin and a minimum dwell) keeps it from
flapping; exploration (one request drafts the largest tree, at most ~1% of the time,
and only while some shape could still beat the choice) keeps the estimates fresh.

"No drafts" has two modes (see `Plan.head_on`). Head on: the draft head still runs its
first pass over what the target accepted, so its KV cache stays complete and drafting can
resume for every request at once; it costs one head forward over the step's tokens plus
its host-side layout. Head off: nothing of the head runs (zero drafting cost: what
vLLM without speculation pays), and every request in such a step has a hole in its draft
KV, so it is never drafted for again (it decodes without speculation until it finishes;
lossless either way). The chooser goes from on to off after OFF_AFTER consecutive steps
without drafts (at once when not even a head whose every draft is accepted could pay at
this batch), and back on when drafting clearly pays at the current batch (by JUMP):
requests that arrive from then on are drafted for. Measured on this project's 2-core CPU (SmolLM2-135M
and its shipped head, float32, VLLM_HASS_AUTO_SCHEDULE=none,off alternating the two modes
step by step in one engine, medians; the machine was shared, load average 13-28): the
head-on first pass costs 4.5 ms of a 101 ms decode step at batch 1 (4.4%) and 8.1 ms of
209 ms at batch 16 (3.9%); head off, the plugin's drafting hook takes 0.2 ms. More than
the 3% the issue allows against no speculation, so a batch that never gains from drafts
must not keep paying it; keeping the head on for OFF_AFTER steps first lets a short lull
(or a first exploration) pass without losing every request's drafts.

No vLLM import, no torch: numpy over a grid of ~36 shapes, once per step (~0.1-0.4 ms
here; vllm_hass/auto_runtime.py wires it into the engine).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, order=True)
class Shape:
    depth: int  # 0: no drafts
    top_k: int
    total_tokens: int  # root included

    @property
    def key(self) -> str:
        return "none" if self.depth == 0 else f"{self.depth}/{self.top_k}/{self.total_tokens}"

    @property
    def drafts(self) -> int:
        return self.total_tokens - 1

    def __str__(self) -> str:
        if self.depth == 0:
            return "no drafts"
        return f"depth={self.depth} top_k={self.top_k} total_tokens={self.total_tokens}"


NONE = Shape(0, 0, 1)


def capacity(depth: int, top_k: int) -> int:
    """Largest total_tokens depth levels of top_k can fill (root included)."""
    return 1 + top_k + (depth - 1) * top_k * top_k


def shape_grid(max_depth: int, max_top_k: int, max_total: int) -> list[Shape]:
    """No drafts, chains 1..max_depth, and trees over top_k {2, 4, max}, depth {2, 4, max},
    total_tokens {8, 16, 32, max} (each capped by what its depth and top_k can draft):
    ~36 shapes for the default 6/10/60, the bound itself included."""
    out = [NONE] + [Shape(k, 1, k + 1) for k in range(1, max_depth + 1) if k + 1 <= max_total]
    for k in sorted({k for k in (2, 4, max_top_k) if 2 <= k <= max_top_k}):
        for d in sorted({d for d in (2, 4, max_depth) if 2 <= d <= max_depth}):
            cap = min(max_total, capacity(d, k))
            for t in sorted({min(t, cap) for t in (8, 16, 32, max_total)}):
                if t >= d + 1:
                    out.append(Shape(d, k, t))
    return sorted(set(out))


class GridArrays:
    """A grid's shapes as arrays (the chooser evaluates all of them at once)."""

    def __init__(self, grid: list[Shape]):
        self.shapes = list(grid)
        self.depth = np.array([s.depth for s in grid], dtype=np.float64)
        self.top_k = np.array([s.top_k for s in grid], dtype=np.float64)
        self.drafts = np.array([s.drafts for s in grid], dtype=np.float64)
        self.index = {s: i for i, s in enumerate(grid)}


def parse_shape(text: str, bound: Shape) -> Shape:
    """'D/K/T' or 'none' -> Shape within the bound (ValueError otherwise)."""
    if text == "none":
        return NONE
    d, k, t = (int(x) for x in text.split("/"))
    if not (1 <= d <= bound.depth and 1 <= k <= bound.top_k and d + 1 <= t <= bound.total_tokens
            and t <= capacity(d, k)):
        raise ValueError(f"shape {text!r} is not within the bounds {bound.key}")
    return Shape(d, k, t)


# --- costs ------------------------------------------------------------------------------


class Piecewise:
    """y(x) = scale * shape(x), for a cost that grows with x (tokens, rows, requests).

    shape: piecewise linear between fixed points, set from the start-up measurement
    (`set_prior`, a back-to-back sweep). scale: an exponential moving average (rate
    `scale_alpha`) of observed / shape(x): what the machine's momentary speed does to every
    x alike (other processes' load, longer contexts). The shape is corrected only by
    differences between sizes: each point keeps a moving average of its log residual
    (observed / predicted, after the scale's update); the points observed within the last
    WINDOW updates move by `alpha` of their residual minus the mean of those residuals. A
    uniform slowdown moves the scale alone; one size observed alone cannot show a shape
    error and changes none; two sizes observed in turn (the chooser's shape and a no-draft
    step) correct their ratio. Predictions never fall with x (timing noise would
    otherwise make a larger step look cheaper): the shape is read through its isotonic
    fit, each point weighted by 1 + its observations."""

    WINDOW = 24  # updates: sizes observed this close together are compared

    def __init__(self, points: list[int], alpha: float = 0.25, scale_alpha: float = 0.5,
                 link: "Piecewise | None" = None):
        self.x = [float(p) for p in points]
        self.y = [0.0] * len(points)  # the shape's points
        self.scale = 1.0
        self.alpha, self.scale_alpha = alpha, scale_alpha
        # another cost whose scale multiplies this one's: a part observed rarely (the
        # draft's, while it does not run) follows the machine's speed through it
        self.link = link
        self.seen = [0] * len(points)  # observations per point
        self.res = [0.0] * len(points)  # moving average of each point's log residual
        self.when = [-10 ** 9] * len(points)  # update count at each point's last observation
        self.updates = 0
        self._iso: np.ndarray | None = None  # isotonic fit of y (cached)

    def _weights(self, x: float) -> tuple[int, float]:
        """(i, w): x = (1 - w) * x[i] + w * x[i+1], x clamped to the points."""
        if x <= self.x[0] or len(self.x) == 1:
            return 0, 0.0
        x = min(x, self.x[-1])
        i = min(bisect.bisect_right(self.x, x) - 1, len(self.x) - 2)
        return i, (x - self.x[i]) / (self.x[i + 1] - self.x[i])

    def _fit(self) -> np.ndarray:
        if self._iso is None:
            self._iso = np.maximum(np.array(isotonic(self.y, [1.0 + n for n in self.seen])), 0.0)
        return self._iso

    def shape(self, x: float) -> float:
        if x <= 0:
            return 0.0
        iso = self._fit()
        if len(self.x) == 1:
            return float(iso[0]) * x / self.x[0]
        i, w = self._weights(x)
        # past the last point: proportionally more
        return float((1 - w) * iso[i] + w * iso[i + 1]) * max(x / self.x[-1], 1.0)

    @property
    def factor(self) -> float:
        return self.scale * (self.link.scale if self.link is not None else 1.0)

    def __call__(self, x: float) -> float:
        return self.factor * self.shape(x)

    def many(self, x: np.ndarray) -> np.ndarray:
        """__call__ over an array of x (the chooser's whole grid at once)."""
        iso = self._fit()
        if len(self.x) == 1:
            y = iso[0] * x / self.x[0]
        else:
            y = np.interp(x, self.x, iso) * np.maximum(x / self.x[-1], 1.0)
        return self.factor * np.where(x > 0, y, 0.0)

    def update(self, x: float, y: float) -> None:
        if x <= 0 or not math.isfinite(y) or y <= 0:
            return
        self.updates += 1
        i, w = self._weights(x)
        j = i if w < 0.5 or len(self.x) == 1 else i + 1  # the point the observation is at
        self.seen[j] += 1
        link = self.link.scale if self.link is not None else 1.0
        base = self.shape(x) * link
        if base <= 0:  # no prior yet: the observation becomes the point
            self.y[j], self._iso = y / (self.scale * link) * min(self.x[-1] / x, 1.0), None
            return
        self.scale += self.scale_alpha * (y / base - self.scale)
        r = math.log(y / (base * self.scale))
        self.res[j] += 0.5 * (r - self.res[j])
        self.when[j] = self.updates
        recent = [k for k in range(len(self.x)) if self.updates - self.when[k] < self.WINDOW]
        if len(recent) < 2:
            return
        mean = sum(self.res[k] for k in recent) / len(recent)
        for k in recent:
            step = self.alpha * (self.res[k] - mean)
            self.y[k] *= math.exp(step)
            self.res[k] -= step
        self._iso = None

    def set_prior(self, xs: list[float], ys: list[float]) -> None:
        """The shape from measurements ys at xs (ascending): linear between them,
        proportional below the first, along the last segment's slope beyond the last."""
        self._iso, self.scale, self.seen = None, 1.0, [0] * len(self.x)
        self.res, self.when = [0.0] * len(self.x), [-10 ** 9] * len(self.x)
        slope = max((ys[-1] - ys[-2]) / (xs[-1] - xs[-2]), 0.0) if len(xs) > 1 else ys[-1] / xs[-1]
        for j, p in enumerate(self.x):
            if p <= xs[0]:
                self.y[j] = ys[0] * p / xs[0]
            elif p >= xs[-1]:
                self.y[j] = ys[-1] + slope * (p - xs[-1])
            else:
                self.y[j] = float(np.interp(p, xs, ys))

    def state(self) -> list[float]:
        return [self.scale, *self.y]

    def load(self, state: list[float]) -> None:
        """state(): [scale, *points]; or the points alone (scale 1)."""
        if len(state) == len(self.x) + 1:
            self.scale, state = state[0], state[1:]
        else:
            self.scale = 1.0
        self.y, self._iso = list(state), None


def isotonic(y: list[float], w: list[float] | None = None) -> list[float]:
    """The non-decreasing sequence closest to y in weighted least squares (pool adjacent
    violators; weights w, default 1)."""
    blocks: list[list[float]] = []  # [mean, weight, count]
    for v, wt in zip(y, w or [1.0] * len(y)):
        blocks.append([v, wt, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            m2, w2, n2 = blocks.pop()
            m1, w1, n1 = blocks[-1]
            blocks[-1] = [(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2, n1 + n2]
    return [m for m, _, n in blocks for _ in range(n)]


def geometric(limit: int) -> list[int]:
    """1, 2, 4, ... up to the first power of two >= limit."""
    out = [1]
    while out[-1] < limit:
        out.append(out[-1] * 2)
    return out


class Costs:
    """Seconds per step, by part (each a Piecewise): `verify` (scheduled tokens: the
    target's forward, sampling, acceptance, compaction), `overhead` (batch size: vLLM's
    scheduler and bookkeeping between steps), `first` (the head's first pass, by rows),
    `root` (per drafted request: root logits, top-k, rerank) and `level` (one expansion
    level, by rows = requests x top_k). The others' scales are relative to verify's (see
    Piecewise.link): the machine's speed, measured every step, moves every part."""

    PARTS = ("verify", "overhead", "first", "root", "level")

    def __init__(self, max_tokens: int, max_reqs: int, max_width: int):
        self.verify = Piecewise(geometric(max_tokens))  # observed every step
        self.overhead = Piecewise(geometric(max_reqs), link=self.verify)
        self.first = Piecewise(geometric(max_tokens), link=self.verify)
        self.root = Piecewise(geometric(max_reqs), link=self.verify)
        self.level = Piecewise(geometric(max_width), link=self.verify)

    def step_time(self, shape: Shape, B: int, Be: int, T_base: int, head_on: bool) -> float:
        """Predicted seconds of a step with Be of the B requests drafted as `shape`; T_base:
        tokens scheduled besides drafts (one per decoding request, prefill chunks)."""
        t = self.verify(T_base + Be * shape.drafts) + self.overhead(B)
        if shape.depth == 0 or Be == 0:
            return t + (self.first(T_base) if head_on else 0.0)
        return (t + self.first(T_base + Be * shape.depth) + self.root(Be)
                + (shape.depth - 1) * self.level(Be * shape.top_k))

    def step_times(self, g: "GridArrays", B: int, Be: int, T_base: int, head_on: bool) -> np.ndarray:
        """step_time for every shape of a grid at once (same formula)."""
        plain = self.verify(T_base) + self.overhead(B) + (self.first(T_base) if head_on else 0.0)
        if Be == 0:
            return np.full(g.depth.shape, plain)
        t = (self.verify.many(T_base + Be * g.drafts) + self.overhead(B)
             + self.first.many(T_base + Be * g.depth) + self.root(Be)
             + np.maximum(g.depth - 1, 0) * self.level.many(Be * g.top_k))
        return np.where(g.depth == 0, plain, t)

    def state(self) -> dict[str, list[float]]:
        return {p: getattr(self, p).state() for p in self.PARTS}

    def load(self, state: dict[str, list[float]]) -> None:
        for p in self.PARTS:
            getattr(self, p).load(state[p])

    def to_json(self) -> dict:
        """{part_ms: {x: milliseconds}}: the predictions (what the chooser reads) at the
        model's points."""
        return {f"{p}_ms": {int(x): round(getattr(self, p)(x) * 1e3, 4) for x in getattr(self, p).x}
                for p in self.PARTS}


# --- acceptance -------------------------------------------------------------------------


def chain_flags(parents: np.ndarray, live: np.ndarray, max_depth: int) -> np.ndarray:
    """[B, N] bool: slot is on the tree's top-1 path (the chain a top_k = 1 draft would
    have grown: root, its best child, that one's best child, ...). parents [B, N] (-1 root
    / padding, slots in BFS order); siblings are contiguous and in draft-score order, so a
    node's best kept child is its first child. Host numpy, max_depth rounds."""
    B, N = parents.shape
    first = np.zeros((B, N), dtype=bool)
    first[:, 1:] = live[:, 1:] & (parents[:, 1:] >= 0) & (parents[:, 1:] != parents[:, :-1])
    chain = np.zeros((B, N), dtype=bool)
    chain[:, 0] = True
    rows = np.arange(B)[:, None]
    par = np.maximum(parents, 0)
    for _ in range(max_depth):
        chain[:, 1:] = first[:, 1:] & chain[rows, par[:, 1:]]
    return chain


class Acceptance:
    """Running acceptance estimates, per top_k table k (trees drafted with that top_k):
    offered[k, d, g] / accepted[k, d, g] = how often the node at depth d and score rank g
    was in a verified tree / on its accepted path; and for the top-1 path (any tree's, a
    chain's) per depth. A running estimate: old counts decay as new trees arrive (`add`).

    tau(shape) = 1 + expected accepted drafts per verified tree of that shape:
      chain k:     sum over depth j <= k of P(top-1 node at depth j accepted)
      tree d/k/t:  sum over ranks g < t - 1 and depths <= d of accepted[k, ., g] / trees
                   with a rank-g node (k's table, or the nearest larger top_k with data)."""

    MIN_TREES = 4.0  # a table is used once it has seen this many trees
    HALF = 256.0  # trees after which old counts weigh half

    def __init__(self, top_ks: list[int], max_depth: int, max_total: int):
        self.top_ks = sorted(top_ks)
        self.D, self.G = max_depth, max(max_total - 1, 1)
        nk = len(self.top_ks)
        self.tree_cells = nk * (self.D + 1) * self.G
        self.n_cells = self.tree_cells + self.D + 2  # + chain depths 0..D + trash
        self.trash = self.n_cells - 1
        self.offered = np.zeros(self.n_cells)
        self.accepted = np.zeros(self.n_cells)
        self._taus = None  # (grid, taus) cache

    def kind(self, top_k: int) -> int:
        """Table index of a tree drafted with top_k (-1: a chain or unknown)."""
        return self.top_ks.index(top_k) if top_k in self.top_ks else -1

    def cells(self, kind: np.ndarray, depths: np.ndarray, ranks: np.ndarray, chain: np.ndarray,
              live: np.ndarray) -> np.ndarray:
        """[B, N, 2] int64 counter cells of each verified slot: its (table, depth, rank)
        cell and its top-1-path cell (trash for the root, padding, unknown tables or
        ranks). kind [B]; depths, ranks (-1 unknown), chain, live [B, N]."""
        node = live & (depths >= 1)
        k = kind[:, None]
        ok = node & (k >= 0) & (ranks >= 0) & (ranks < self.G) & (depths <= self.D)
        tree = np.where(ok, (k * (self.D + 1) + depths) * self.G + ranks, self.trash)
        ch = np.where(node & chain & (depths <= self.D), self.tree_cells + depths, self.trash)
        return np.stack([tree, ch], -1).astype(np.int64)

    def taus(self, g: GridArrays) -> np.ndarray:
        """tau of every shape of a grid (cached until the next `add`)."""
        if self._taus is None or self._taus[0] is not g:
            self._taus = (g, np.array([self.tau(s) for s in g.shapes]))
        return self._taus[1]

    def add(self, offered: np.ndarray, accepted: np.ndarray) -> None:
        """New counts [n_cells]. Each table (and the top-1 path's) keeps the last ~HALF
        trees' worth of data: its old counts are scaled by 0.5 ** (new trees / HALF), so a
        table without new trees keeps its counts, and its estimates, as they were."""
        nk = len(self.top_ks)
        spans = [(i * (self.D + 1) * self.G, (i + 1) * (self.D + 1) * self.G) for i in range(nk)]
        spans.append((self.tree_cells, self.n_cells))
        self._taus = None
        for lo, hi in spans:
            # trees = offered nodes of depth 1, rank 0 (tables) / depth 1 (top-1 path)
            first = lo + self.G if hi <= self.tree_cells else lo + 1
            f = 0.5 ** (float(offered[first]) / self.HALF)
            self.offered[lo:hi] = self.offered[lo:hi] * f + offered[lo:hi]
            self.accepted[lo:hi] = self.accepted[lo:hi] * f + accepted[lo:hi]

    def _table(self, top_k: int):
        """(accepted [D+1, G], trees per rank [G]) for top_k or the nearest with data."""
        off = self.offered[: self.tree_cells].reshape(len(self.top_ks), self.D + 1, self.G)
        acc = self.accepted[: self.tree_cells].reshape(len(self.top_ks), self.D + 1, self.G)
        order = sorted(range(len(self.top_ks)),
                       key=lambda i: (self.top_ks[i] < top_k, abs(self.top_ks[i] - top_k)))
        for i in order:
            n = off[i].sum(0)
            if n[0] >= self.MIN_TREES:
                return acc[i], n
        return None

    def chain_p(self) -> np.ndarray:
        """[D] P(top-1 node at depth 1..D accepted), 0 where never offered."""
        o = self.offered[self.tree_cells + 1: self.tree_cells + self.D + 1]
        a = self.accepted[self.tree_cells + 1: self.tree_cells + self.D + 1]
        return np.where(o > 0, a / np.maximum(o, 1e-12), 0.0)

    def tau(self, shape: Shape) -> float:
        if shape.depth == 0:
            return 1.0
        chain = 1.0 + float(self.chain_p()[: min(shape.depth, shape.drafts)].sum())
        if shape.top_k == 1:
            return chain
        table = self._table(shape.top_k)
        if table is None:  # no tree of this kind seen yet: its top-1 path at least
            return chain
        acc, n = table
        g = min(shape.drafts, self.G)
        per_rank = acc[1: shape.depth + 1, :g].sum(0) / np.maximum(n[:g], 1e-12)
        return 1.0 + float(np.where(n[:g] > 0, per_rank, 0.0).sum())

    def trees_seen(self) -> float:
        return float(self.offered[self.tree_cells + 1])

    def to_json(self, grid: list[Shape]) -> dict:
        return {"chain": [round(float(p), 4) for p in self.chain_p()],
                "trees_seen": round(self.trees_seen(), 1),
                "tau": {s.key: round(self.tau(s), 4) for s in grid}}


# --- the chooser ------------------------------------------------------------------------


@dataclass
class Plan:
    """This step's drafting. `groups`: the shapes the requests that can be drafted for are
    split among ([] = no drafts; NONE in a list: those requests get none): with `explore`
    groups[0] (the largest shape) goes to one request and groups[1:] to the rest, else the
    requests go to the groups in turn. head_on False: the head does not run at all (see
    the module docstring)."""

    shape: Shape  # the chosen shape (what is counted and logged)
    groups: list[Shape]
    head_on: bool = True
    explore: bool = False


class Chooser:
    MARGIN = 0.04  # switch only to a shape predicted this much faster
    DWELL = 8  # ... and not within this many steps of the last switch
    JUMP = 1.25  # ... unless it is predicted this much faster
    OFF_AFTER = 32  # consecutive no-draft steps before the head stops (at once when even
    # a perfect head could not pay at this batch; module docstring)
    BUDGET = 0.01  # exploration: at most this fraction of the time
    EXPLORE_MIN, EXPLORE_MAX = 16, 1024  # steps between explorations

    def __init__(self, grid: list[Shape], costs: Costs, acc: Acceptance,
                 schedule: list[list[Shape]] | None = None):
        self.grid, self.costs, self.acc = grid, costs, acc
        self.arrays = GridArrays(grid)
        self.bound = max(grid, key=lambda s: (s.total_tokens, s.top_k, s.depth))
        self.current = NONE
        self.since_switch = 10 ** 9
        self.none_streak = 0
        self.head_on = True
        self.next_explore = 0
        self.schedule = schedule
        self.step = 0

    def rate(self, shape: Shape, B: int, Be: int, T_base: int, tau: float | None = None) -> float:
        """Expected tokens per second of a step drafting `shape` for Be of B requests."""
        tau = self.acc.tau(shape) if tau is None else tau
        t = self.costs.step_time(shape, B, Be, T_base, self.head_on)
        return ((B - Be) + Be * tau) / t if t > 0 else 0.0

    def rates(self, B: int, Be: int, T_base: int, taus: np.ndarray | None = None) -> np.ndarray:
        """rate of every grid shape (`taus` to override the estimates)."""
        g = self.arrays
        taus = self.acc.taus(g) if taus is None else taus
        t = self.costs.step_times(g, B, Be, T_base, self.head_on)
        return np.where(t > 0, ((B - Be) + Be * taus) / np.maximum(t, 1e-30), 0.0)

    def best(self, B: int, Be: int, T_base: int) -> tuple[Shape, np.ndarray]:
        """The fastest shape (ties: the smaller tree) and every shape's rate."""
        r = self.rates(B, Be, T_base)
        top = np.flatnonzero(r >= r.max())
        return min((self.grid[i] for i in top), key=lambda s: s.total_tokens), r

    def plan(self, B: int, Be: int, T_base: int) -> Plan:
        """B requests, Be of them with sampling options that allow drafts, T_base tokens
        scheduled besides drafts (this step's, as the next step's estimate)."""
        self.step += 1
        if self.schedule is not None:
            return self._scheduled()
        if Be == 0:  # nobody to draft for: a step without drafts
            self._count(NONE)
            return Plan(NONE, [], self.head_on)
        best, rates = self.best(B, Be, T_base)
        at = self.arrays.index
        cur = rates[at[self.current]]
        self.since_switch += 1
        gain = rates[at[best]] / cur if cur > 0 else math.inf
        # turning the head back on pays off only for requests that arrive from then on
        # (the others' draft KV has holes): only for a clear gain
        need = 1 + self.MARGIN if self.head_on else self.JUMP
        if best != self.current and gain > need and (
                self.since_switch >= self.DWELL or gain > self.JUMP):
            self.current, self.since_switch = best, 0
        self._count(self.current)
        if self.current == NONE and self.head_on and not self._could_pay(B, Be, T_base, cur):
            self.head_on = False  # not even a perfect head would pay here: stop it now
        groups = [] if self.current == NONE else [self.current]
        explore = self.head_on and self._explore_due(B, Be, T_base, rates[at[self.current]])
        if explore:
            groups = [self.bound, self.current]
        elif self.current != NONE and self.step % self.EXPLORE_MIN == 0 \
                and rates[at[self.current]] < rates[at[NONE]] * self.JUMP:
            # only marginally better than no drafts: a step without them now and then
            # observes both step sizes at the same moment (Piecewise learns their ratio)
            groups = []
        return Plan(self.current, groups, self.head_on, explore)

    def _count(self, shape: Shape) -> None:
        """Head on/off bookkeeping (module docstring)."""
        self.none_streak = self.none_streak + 1 if shape == NONE else 0
        if shape != NONE:
            self.head_on = True
        elif self.none_streak >= self.OFF_AFTER:
            self.head_on = False

    def _explore_due(self, B: int, Be: int, T_base: int, chosen: float) -> bool:
        """Explore (one request drafts the largest shape) when due, and only while some
        shape, were every draft accepted, could beat the current choice. The next one is
        due after enough steps that exploring costs at most BUDGET of the time."""
        if self.step < self.next_explore or self.current == self.bound:
            return False
        if not self._could_pay(B, Be, T_base, chosen):
            return False
        t = self.costs.step_time(self.current, B, Be, T_base, self.head_on)
        rest = T_base + (Be - 1) * self.current.drafts
        extra = self.costs.step_time(self.bound, B, 1, rest, True) - t
        gap = extra / max(self.BUDGET * t, 1e-12)
        self.next_explore = self.step + int(min(max(gap, self.EXPLORE_MIN), self.EXPLORE_MAX))
        return True

    def _could_pay(self, B: int, Be: int, T_base: int, chosen: float) -> bool:
        """Some drafting shape, were every one of its drafts accepted, would beat `chosen`."""
        perfect = self.rates(B, Be, T_base, taus=self.arrays.depth + 1.0)
        return bool((perfect[self.arrays.depth > 0] > chosen * (1 + self.MARGIN)).any())

    def _scheduled(self) -> Plan:
        """The test-only forced schedule (VLLM_HASS_AUTO_SCHEDULE): entry i of the cycle
        for step i."""
        entry = self.schedule[(self.step - 1) % len(self.schedule)]
        if not entry:  # "off"
            self.head_on = False
            return Plan(NONE, [], False)
        self.head_on = True
        drafting = [s for s in entry if s != NONE]
        self.current = drafting[0] if drafting else NONE
        return Plan(self.current, entry if drafting else [], True)


def parse_schedule(text: str, bound: Shape) -> list[list[Shape]]:
    """'4/3/10,none,2/2/4|1/1/2,off' -> one entry per step, cycled; '|' splits a step's
    requests among shapes in turn ('none' among them: those requests get no drafts);
    'off' (an empty entry): the head does not run."""
    out: list[list[Shape]] = []
    for entry in text.split(","):
        parts = [p.strip() for p in entry.split("|")]
        out.append([] if parts == ["off"] else [parse_shape(p, bound) for p in parts])
    return out
