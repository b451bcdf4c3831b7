"""The host-overhead harness (vllm_hass/bench/host_overhead.py) against the step code as it
was before issue 13 (commit 0f66dba), for the "before" column of docs/host-overhead.md.

    git worktree add /tmp/before 0f66dba
    ln -s ../triton_kernels /tmp/before/vllm_hass/kernels
    ln -s ../converters /tmp/before/vllm_hass/converters
    cp vllm_hass/bench/host_overhead.py vllm_hass/bench/syncs.py /tmp/before/vllm_hass/bench/
    cp docs/results/host_overhead_before.py /tmp/before/
    cd /tmp/before && PYTHONPATH=/tmp/before python host_overhead_before.py

The old step read the same vLLM runner attributes, so the harness's stand-in runner and
scheduler serve it unchanged; what differs is adapted here: the old drafter (an
EagleProposer built without vLLM's __init__, its `_forward` replaced by the same
stand-in), the old layout's inputs (the scheduled-drafts dict, vLLM's
cu_num_sampled_tokens), the old target-cache lookup and the old per-layer wrapper
(gather rows, tree_attention without host bounds, scatter). Needs vLLM (the old modules
import it).
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import torch

from vllm_hass.bench import host_overhead as h


def _make_runner(B, shape, device, host, sampling):
    from vllm_hass.proposer import HassTreeProposer
    from vllm_hass.runner import HassRunnerMixin

    cls = type("HarnessRunner", (HassRunnerMixin, h.VllmRunnerStandIn), {})
    r = object.__new__(cls)
    num_spec = max(h.TREE.max_drafts, h.TREE.scratch_nodes)
    N = 1 + num_spec
    r.device = torch.device(device)
    r.max_num_reqs, r.max_num_tokens = B, max(B * N, 2048)
    r.max_model_len = 4096
    r._hass_tree = h.TREE
    r._hass_rank_check = None
    r._hass_store, r._hass_step, r._hass_info, r._hass_acc = {}, None, None, None
    r.cache_config = SimpleNamespace(block_size=h.BLOCK)
    r.query_start_loc = h._Buffer(B + 1, torch.int32, host)
    r.input_ids = h._Buffer(r.max_num_tokens, torch.int32, host)
    r.discard_request_mask = h._Buffer(B, torch.bool, host)
    r.positions = torch.zeros(r.max_num_tokens, dtype=torch.int64, device=device)
    max_blocks = r.max_model_len // h.BLOCK
    bt = h._BlockTable(torch.arange(B * max_blocks, dtype=torch.int32, device=device).view(B, max_blocks) % 7)
    bt.set(B)
    greedy = sampling == "greedy"
    md = SimpleNamespace(temperature=torch.full((B,), 0.0 if greedy else 0.8, device=device),
                         all_greedy=greedy, all_random=not greedy,
                         top_k=None if greedy else torch.full((B,), 20, device=device),
                         top_p=None if greedy else torch.full((B,), 0.9, device=device),
                         generators={} if greedy else {i: torch.Generator().manual_seed(i) for i in range(0, B, 4)},
                         max_num_logprobs=None)
    ib = SimpleNamespace(
        num_reqs=B, req_ids=[f"req-{i}" for i in range(B)],
        num_computed_tokens_cpu=np.full(B, h.CONTEXT, dtype=np.int32),
        token_ids_cpu=np.random.default_rng(0).integers(0, shape["vocab"], (B, r.max_model_len)),
        block_table=[bt], sampling_metadata=md, update_async_output_token_ids=lambda: None)
    r.input_batch = ib
    r.requests = {rid: SimpleNamespace(sampling_params=SimpleNamespace(),
                                       get_token_id=lambda i: 0) for rid in ib.req_ids}
    root_tokens = torch.zeros(B, 1, dtype=torch.int32, device=device)
    r.sampler = lambda logits, sampling_metadata: SimpleNamespace(
        sampled_token_ids=root_tokens, logprobs_tensors=None)
    kv = [torch.zeros(8, shape["kv_heads"], h.BLOCK, 2 * shape["head_dim"], device=device)
          for _ in range(shape["layers"])]
    r._hass_caches = kv
    r._hass_kv0 = kv[0]
    r.compilation_config = SimpleNamespace(
        static_forward_context={f"l{i}": SimpleNamespace(kv_cache=c) for i, c in enumerate(kv)})
    gen = torch.Generator(device=device).manual_seed(0)
    draft_logits = torch.randn(B * h.TREE.top_k, shape["vocab"], generator=gen, device=device)
    d = object.__new__(HassTreeProposer)
    d.tree, d.block_size, d.device = h.TREE, h.BLOCK, r.device
    d._draft_attn_layer_names = set()
    d.model = SimpleNamespace(compute_logits=lambda x: draft_logits[: x.shape[0]])

    def _forward(input_ids, positions, hidden, cad, tree_info=None):
        if tree_info is not None:
            _attention_layer(tree_info, input_ids.shape[0], shape, kv[0])
        return hidden

    d._forward = _forward
    r.drafter = d
    return r, gen


def _attention_layer(info, n_rows, shape, kv_cache):
    """The old CUDA wrapper's per-layer work: gather the tree rows, the kernel without host
    bounds (its length check syncs), scatter."""
    from vllm_hass.kernels.tree_attention import split_kv_cache, tree_attention

    q = torch.zeros(n_rows, shape["heads"] * shape["head_dim"], device=kv_cache.device)
    k, v = split_kv_cache(kv_cache)
    qr = q.view(-1, shape["heads"], shape["head_dim"])[info.rows]
    out = tree_attention(qr, k, v, info.block_table, info.query_start_loc, info.prefix_lens,
                         info.tree_lens, info.tree_mask, scale=1.0)
    q.view(-1, shape["heads"], shape["head_dim"])[info.rows] = out


class _OldScheduler(h.Scheduler):
    def before(self):
        so, n = super().before()
        r, ib = self.r, self.r.input_batch
        so.scheduled_spec_decode_tokens = {ib.req_ids[b]: d for b, d in enumerate(self.drafts) if d}
        spec = r._prepared[1]
        if spec is not None:
            spec.cu_num_sampled_tokens = torch.from_numpy(np.cumsum(n)).to(r.device)
        return so, n


def main():
    h._make_runner = _make_runner
    h._attention_layer = _attention_layer
    h.Scheduler = _OldScheduler
    # the old step kept its state in these; the harness reads the step via _hass_step
    h.measure.__globals__["_make_runner"] = _make_runner
    os.environ["VLLM_HASS_TREE_KERNEL"] = "triton"
    rows = h.measure([1, 8, 64], 20)
    print(h.format_table(rows))
    for r in rows:
        print(r["B"], r["sampling"], sorted(set(r["events"])), len(r["events"]))


if __name__ == "__main__":
    main()
