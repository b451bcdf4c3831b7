"""Tree acceptance at T > 0, at the tensor level, with statistical power.

`vllm_hass.sampler.tree_sample` is run on a stand-in runner (a real vLLM `Sampler` and a
real `SamplingMetadata`) over hundreds of thousands of rows that all carry the same
verification tree and the same target logits per tree slot (vocabulary V = 8). The law
of the emitted sequence (first token; next token given that the previous one was a
drafted child; ...) is compared, cell by cell, with the exact law computed here
independently: softmax(logits / T), top-k, top-p (vLLM's rule: a token stays iff the
mass of the tokens ranked above it is < p, i.e. the smallest top set whose mass reaches
p; no ties in these logits), renormalised.

Row groups in one batch (randomly interleaved): greedy rows (temperature 0: the output
must be exactly the greedy acceptance, every row), T = 0.7 with top-k 5 and top-p 0.8
(the main group), T = 1.0 plain, T = 1.3 with top-p 0.9; one row in ten carries its own
seeded torch.Generator (SamplingMetadata.generators), the others use the global RNG.

The tree (slot: parent, chosen by rank of the T=0.7 law at the parent):
  root 0 -> 1 (rank 0), 2 (rank 1), 3 (rank 3: in the top-5 but outside the top-p 0.8
  nucleus, which holds ranks 0-2), 4 (rank 6: outside the top-5);
  1 -> 5 (rank 0), 6 (rank 2);  2 -> 7 (rank 1);  5 -> 8 (rank 0). Depth 3.

Test: for every (group, slot, token) cell with 0 < p < 1, an exact two-sided binomial
test of the count among the rows that reached the slot (given that number the counts
are multinomial under the exact rule), Bonferroni over all such cells (all rows pooled,
plus the seeded rows alone) at family-wise alpha = 0.001; cells with p = 0 must be
empty, and a sequence must never stop on a drafted child's token.

Power (normal approximation, computed by `_power` from the exact law and the expected
number of rows reaching each slot; `test_power_of_the_test` asserts it): 5 calls x
100,000 rows give the main group 320,000 rows; m = 260 cells are tested, so the
threshold is 0.001 / 260 = 3.8e-6 (z = 4.62). A 2-point error (|p' - p| = 0.02) on any
single token of any reachable slot of the main group is detected with probability
>= 0.978 (the weakest: slot 6, reached by ~27,500 rows; slots 0-2, 5, 8 >= 0.9999,
slot 7 0.9994). The T = 1.0 and T = 1.3 groups (80,000 rows each) detect it with
probability ~1 on the first token (0.94 / 0.90 at the depth-1 slots 1 / 2, less deeper).
Runtime: ~25 s on this machine's 2 shared cores (pytest wall ~30 s with imports).

Mutations killed (checked in-process by monkeypatching mutated copies of the
functions): a rejected sibling's probability not zeroed (`p[rej, x[rej]] = 0.0`
dropped), the residual not renormalised, top-p applied to the residual after the
rejections instead of before, the probabilities of the wrong slot (off by one, in
accept_sampled or in tree_sample's rows), greedy rows sampled, seeded rows' uniforms
taken from the global RNG.
"""

import math

import pytest
import torch

from vllm.v1.sample.sampler import Sampler

from vllm_hass import sampler as hass_sampler
from vllm_hass.tree import VerifyTrees

V, N = 8, 9
PARENTS = [-1, 0, 0, 0, 0, 1, 1, 2, 5]
DEPTHS = [0, 1, 1, 1, 1, 2, 2, 2, 3]
CHILD_RANK = [None, 0, 1, 3, 6, 0, 2, 1, 0]  # rank of each slot's token at its parent (T=0.7 law)
MAX_CHILDREN = 4
# target logits per tree slot (no ties; top-p boundaries >= 1 point away: asserted)
LOGITS = torch.tensor([
    [0.37, -0.95, 0.72, -2.21, -0.47, 0.56, -1.44, -0.11],
    [-0.66, 0.9, -0.22, 0.35, -1.81, 1.55, 0.84, 0.23],
    [1.33, -2.82, -3.41, 1.06, -0.13, -1.23, 0.1, 1.39],
    [1.13, 2.54, -1.86, 1.38, -0.06, -1.98, 1.27, 1.21],
    [-0.38, 0.56, 0.22, 0.38, -1.51, -2.63, -4.1, 3.45],
    [-0.33, 0.0, 1.98, -1.9, -1.81, -0.36, -3.74, 2.94],
    [2.08, -2.62, 1.86, -0.25, -0.01, 0.7, -1.6, 2.54],
    [-0.52, -2.71, 2.53, -2.37, 2.41, -4.28, -1.59, 1.74],
    [-2.48, 0.8, 0.53, -1.44, 0.02, 1.62, 0.18, -2.08],
], dtype=torch.float64)
GREEDY = -1
# (temperature, top_k, top_p) per random group; vLLM stores "no top-k" as V, "no top-p" as 1
GROUPS = [(0.7, 5, 0.8), (1.0, V, 1.0), (1.3, V, 0.9)]
MAIN = 0
SHARE = {GREEDY: 0.04, 0: 0.64, 1: 0.16, 2: 0.16}
ROWS, CALLS = 100_000, 5
SEEDED_EVERY = 10
ALPHA, DELTA, POWER = 1e-3, 0.02, 0.95


# --- the exact law, independently of vLLM and of the plugin --------------------------

def exact_law(logits: torch.Tensor, temperature: float, top_k: int, top_p: float):
    """softmax(l / T) -> keep the top_k -> renormalise -> keep tokens whose higher-ranked
    mass is < top_p -> renormalise. Also returns the top-p margin (distance of the
    boundary cumulative masses from top_p) so the test can assert float32 is safe."""
    z = logits.double() / temperature
    order = torch.argsort(z, descending=True)
    keep = torch.zeros(V, dtype=torch.bool)
    keep[order[:top_k]] = True
    q = torch.softmax(torch.where(keep, z, -math.inf), -1)
    above = torch.cumsum(q[order], 0) - q[order]  # mass ranked strictly above each token
    keep[order[above >= top_p]] = False
    margin = (above[:top_k] - top_p).abs().min().item() if top_p < 1 else 1.0
    p = torch.where(keep, q, 0.0)
    return p / p.sum(), margin


def tree_tokens() -> list[int]:
    tokens = [0] * N
    for s in range(1, N):
        order = torch.argsort(LOGITS[PARENTS[s]], descending=True)  # rank order at any T
        tokens[s] = int(order[CHILD_RANK[s]])
    tokens[0] = 3  # the root token itself is never emitted (any value)
    return tokens


TOKENS = tree_tokens()


def child_table() -> torch.Tensor:
    table = torch.full((N, V), -1, dtype=torch.long)
    for s in range(1, N):
        assert table[PARENTS[s], TOKENS[s]] == -1  # siblings carry distinct tokens
        table[PARENTS[s], TOKENS[s]] = s
    return table


CHILD = child_table()


def laws() -> torch.Tensor:
    """[G, N, V] exact next-token law at every slot for every random group."""
    return torch.stack([torch.stack([exact_law(LOGITS[s], *g)[0] for s in range(N)])
                        for g in GROUPS])


def reach(law: torch.Tensor) -> torch.Tensor:
    """[G, N] probability that the emitted sequence passes through each slot."""
    r = torch.zeros(law.shape[0], N, dtype=torch.float64)
    r[:, 0] = 1.0
    for s in range(1, N):
        r[:, s] = r[:, PARENTS[s]] * law[:, PARENTS[s], TOKENS[s]]
    return r


def greedy_sequence() -> list[int]:
    """Greedy acceptance walked by hand: follow the child that is the argmax, then bonus."""
    out, s = [], 0
    while True:
        x = int(LOGITS[s].argmax())
        out.append(x)
        if CHILD[s, x] < 0:
            return out
        s = int(CHILD[s, x])


def _phi(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def _z_crit(m: int) -> float:
    lo, hi = 0.0, 20.0  # Phi^-1(1 - ALPHA / (2 m)) by bisection
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if 1 - _phi(mid) > ALPHA / (2 * m) else (lo, mid)
    return hi


def _power(p: float, n: float, z: float) -> float:
    """P(|Z| > z) for the z-test of one cell with n draws when the true value is p +- DELTA
    (the worse of the two directions that are possible)."""
    if n <= 0:
        return 0.0
    sd0 = math.sqrt(p * (1 - p) / n)
    out = []
    for q in (p + DELTA, p - DELTA):
        if not 0 < q < 1:
            continue
        sd1 = math.sqrt(q * (1 - q) / n)
        out.append(_phi((abs(q - p) - z * sd0) / sd1) + _phi((-abs(q - p) - z * sd0) / sd1))
    return min(out)


# --- the batch ----------------------------------------------------------------------

def make_batch(groups: torch.Tensor, seeds: dict[int, int]):
    """Stand-in runner (real Sampler, real SamplingMetadata), logits and trees."""
    B = groups.numel()
    temp = torch.zeros(B, dtype=torch.float32)
    top_k = torch.full((B,), V, dtype=torch.int32)
    top_p = torch.ones(B, dtype=torch.float32)
    for g, (t, k, p) in enumerate(GROUPS):
        sel = groups == g
        temp[sel], top_k[sel], top_p[sel] = t, k, p
    md = hass_sampler.sampling_metadata(
        temp, top_k, top_p, {i: torch.Generator().manual_seed(s) for i, s in seeds.items()})

    class Runner:
        sampler = Sampler()

        class input_batch:
            sampling_metadata = md

    rows = torch.arange(B).unsqueeze(1) * N + torch.arange(N)
    trees = VerifyTrees(
        tokens=torch.tensor(TOKENS).expand(B, N).clone(),
        parents=torch.tensor(PARENTS).expand(B, N).clone(),
        depths=torch.tensor(DEPTHS).expand(B, N).clone(),
        n=torch.full((B,), N, dtype=torch.long), rows=rows)
    logits = LOGITS.float().repeat(B, 1)  # row b*N + s = slot s of request b
    return Runner, logits, trees


def assign_groups(B: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.full((round(B * share),), grp) for grp, share in SHARE.items()])
    labels = torch.cat([labels, torch.full((B - labels.numel(),), MAIN)])[:B]
    return labels[torch.randperm(B, generator=g)]


def run(groups: torch.Tensor, seeds: dict[int, int]):
    runner, logits, trees = make_batch(groups, seeds)
    out, acc = hass_sampler.tree_sample(runner, logits, trees, MAX_CHILDREN)
    tok = out.sampled_token_ids.long()
    # the output format: path then bonus then -1 padding, and it agrees with Accepted
    assert torch.equal(tok.gather(1, acc.length.unsqueeze(1)).squeeze(1), acc.bonus)
    return tok


def walk(tok: torch.Tensor):
    """Per row: the slot the sequence was at when it emitted each token. Checks that the
    sequence continues exactly while it follows drafted children and stops after the
    first token that is not one (the bonus), as the -1 padding says."""
    B, W = tok.shape
    cur = torch.zeros(B, dtype=torch.long)
    active = torch.ones(B, dtype=torch.bool)
    steps = []
    for j in range(W):
        x = tok[:, j]
        # after a drafted child's token another token always follows (probability 1)
        assert bool((x[active] >= 0).all()), f"a sequence stopped on a drafted token ({j})"
        assert bool((x[~active] == -1).all()), f"tokens after the bonus ({j})"
        steps.append((active.clone(), cur.clone(), x.clamp(min=0)))
        nxt = CHILD[cur, x.clamp(min=0)]
        active &= nxt >= 0
        cur = nxt.clamp(min=0)
    assert not bool(active.any())  # every sequence ended with a bonus token
    return steps


def count(steps, groups: torch.Tensor, select: torch.Tensor) -> torch.Tensor:
    """[G, N, V] counts of (slot reached, next token) per random group."""
    c = torch.zeros(len(GROUPS), N, V, dtype=torch.float64)
    for active, cur, x in steps:
        m = active & select & (groups >= 0)
        c.index_put_((groups[m], cur[m], x[m]), torch.ones(int(m.sum()), dtype=torch.float64),
                     accumulate=True)
    return c


def binomial_pvalue(k: int, n: int, p: float) -> float:
    """Exact two-sided binomial p-value 2 min(P(X <= k), P(X >= k)), X ~ Bin(n, p)
    (float64 log-pmf over mean +- 60 sd, outside which the mass is < 1e-700)."""
    sd = math.sqrt(n * p * (1 - p))
    lo, hi = max(0, int(n * p - 60 * sd - 50)), min(n, int(n * p + 60 * sd + 50))
    if not lo <= k <= hi:
        return 0.0
    j = torch.arange(lo, hi + 1, dtype=torch.float64)
    logpmf = (math.lgamma(n + 1) - torch.lgamma(j + 1) - torch.lgamma(n - j + 1)
              + j * math.log(p) + (n - j) * math.log1p(-p))
    pmf = logpmf.exp()
    below, above = float(pmf[: k - lo + 1].sum()), float(pmf[k - lo:].sum())
    return min(1.0, 2 * min(below, above))


def cell_pvalues(counts: torch.Tensor, law: torch.Tensor):
    """(p-values of the cells with 0 < p < 1 among the rows that reached their slot,
    with their (group, slot, token) and counts, and the counts of cells with p = 0)."""
    n = counts.sum(-1, keepdim=True).expand_as(counts)
    inner = (law > 0) & (law < 1) & (n > 0)
    where = inner.nonzero().tolist()
    pv = [binomial_pvalue(int(counts[g, s, x]), int(n[g, s, x]), float(law[g, s, x]))
          for g, s, x in where]
    return pv, where, counts[law == 0]


@pytest.fixture(scope="module")
def draws():
    torch.manual_seed(1234)
    groups_all, toks = [], []
    seeded = []
    for call in range(CALLS):
        groups = assign_groups(ROWS, seed=call)
        seeds = {i: ROWS * call + i for i in range(0, ROWS, SEEDED_EVERY)}  # all distinct
        toks.append(run(groups, seeds))
        groups_all.append(groups)
        mask = torch.zeros(ROWS, dtype=torch.bool)
        mask[list(seeds)] = True
        seeded.append(mask)
    return toks, groups_all, seeded


def test_design_is_sound():
    """The tree has what the mutations need; float32 cannot flip a top-p boundary."""
    law = laws()
    for s in range(N):
        for g in GROUPS:
            assert exact_law(LOGITS[s], *g)[1] > 5e-3, (s, g)
        gaps = LOGITS[s].sort().values.diff()
        assert gaps.min() > 0.02, s
    main = law[MAIN]
    kids = [TOKENS[s] for s in range(1, N) if PARENTS[s] == 0]
    assert len(kids) >= 3
    order = torch.argsort(LOGITS[0], descending=True)
    assert int((main[0] > 0).sum()) == 3  # nucleus = ranks 0..2 at the root
    assert main[0, TOKENS[3]] == 0 and int(order[3]) == TOKENS[3]  # in top-5, out of top-p
    assert int(order[6]) == TOKENS[4] and main[0, TOKENS[4]] == 0  # out of top-5
    # under T=0.7 + top-k only (no top-p), slot 3's token would be accepted often
    assert exact_law(LOGITS[0], 0.7, 5, 1.0)[0][TOKENS[3]] > 0.08
    assert max(DEPTHS) == 3


def test_power_of_the_test():
    """The power stated in the module docstring, from the exact law and the design."""
    law = laws()
    r = reach(law)
    n_group = torch.tensor([SHARE[g] * ROWS * CALLS for g in range(len(GROUPS))])
    cells = int(((law > 0) & (law < 1) & (r.unsqueeze(-1) > 0)).sum())
    m = 2 * cells  # the cells of reachable slots, pooled rows + seeded rows alone
    z = _z_crit(m)
    power = torch.zeros(len(GROUPS), N)
    for g in range(len(GROUPS)):
        for s in range(N):
            ps = [float(p) for p in law[g, s] if 0 < p < 1]
            n = float(n_group[g] * r[g, s])
            power[g, s] = min((_power(p, n, z) for p in ps), default=1.0) if n > 0 else 1.0
    print(f"\ncells tested m = {m}, z_crit = {z:.3f}")
    for g, spec in enumerate(GROUPS):
        print(spec, "expected rows per slot", [round(float(n_group[g] * x)) for x in r[g]])
        print("   min power per slot", [round(float(x), 4) for x in power[g]])
    assert (power[MAIN] >= POWER).all(), power[MAIN]
    for g in range(len(GROUPS)):  # the other groups: the first token
        assert power[g, 0] >= POWER, (g, power[g])


def test_greedy_rows_are_exact_greedy_acceptance(draws):
    toks, groups_all, _ = draws
    want = greedy_sequence()
    assert len(want) >= 3  # greedy accepts drafts here
    for tok, groups in zip(toks, groups_all):
        g = tok[groups == GREEDY]
        assert g.shape[0] > 0
        assert torch.equal(g[:, : len(want)], torch.tensor(want).expand(g.shape[0], -1))
        assert bool((g[:, len(want):] == -1).all())


def test_emitted_law_equals_target_law(draws):
    toks, groups_all, seeded = draws
    law = laws()
    pooled = torch.zeros(len(GROUPS), N, V, dtype=torch.float64)
    alone = torch.zeros_like(pooled)
    for tok, groups, mask in zip(toks, groups_all, seeded):
        steps = walk(tok)
        pooled += count(steps, groups, torch.ones_like(mask))
        alone += count(steps, groups, mask)
    pv1, where1, zero1 = cell_pvalues(pooled, law)
    pv2, where2, zero2 = cell_pvalues(alone, law)
    pv, where = pv1 + pv2, where1 + where2
    m = len(pv)
    worst = min(range(m), key=pv.__getitem__)
    print(f"\n{m} cells, smallest p-value {pv[worst]:.2e} at (group, slot, token) "
          f"{where[worst]}, Bonferroni threshold {ALPHA / m:.2e}")
    assert float(zero1.sum()) == 0 and float(zero2.sum()) == 0, "token outside top-k/top-p emitted"
    assert pv[worst] > ALPHA / m, (where[worst], pv[worst], "seeded" if worst >= len(pv1) else "")


def test_seeded_rows_reproduce():
    """Fresh generators with the same seeds give the same tokens (the global RNG state
    differs between the runs); greedy rows too; unseeded rows do not repeat."""
    B = 4000
    groups = assign_groups(B, seed=99)
    seeds = {i: 7 * i + 1 for i in range(0, B, 3)}
    torch.manual_seed(1)
    a = run(groups, seeds)
    torch.manual_seed(2)
    b = run(groups, seeds)
    s = torch.tensor(sorted(seeds))
    W = max(a.shape[1], b.shape[1])
    a, b = _pad(a, W), _pad(b, W)
    assert torch.equal(a[s], b[s])
    greedy = groups == GREEDY
    assert torch.equal(a[greedy], b[greedy])
    free = torch.ones(B, dtype=torch.bool)
    free[s] = False
    free &= ~greedy
    differ = (a[free] != b[free]).any(1).float().mean()
    assert differ > 0.2  # the unseeded rows are random (and not secretly seeded)
    # different seeds give different draws
    c = _pad(run(groups, {i: 7 * i + 2 for i in seeds}), W + 8)[:, :W]
    assert (c[s] != a[s]).any(1).float().mean() > 0.2


def _pad(t: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=-1)


def test_seeded_row_does_not_depend_on_the_rest_of_the_batch():
    """vLLM's contract for a seeded request: its tokens come from its own generator only,
    whatever else is in the batch (vLLM's sampler and rejection sampler draw a fixed
    number of values per request). Here a seeded row is sampled alone and then among
    500 other rows (same seed, same row index, same logits and tree)."""
    k = 20
    seeds = {i: 1000 + i for i in range(k)}
    crowd = run(torch.cat([torch.full((k,), MAIN), assign_groups(500, seed=5)]), seeds)[:k]
    differ = []
    for i in range(k):
        alone = run(torch.full((1,), MAIN), {0: seeds[i]})
        W = max(alone.shape[1], crowd.shape[1])
        if not torch.equal(_pad(alone, W)[0], _pad(crowd, W)[i]):
            differ.append(i)
    assert not differ, f"{len(differ)} of {k} seeded rows changed with the batch around them"
