"""The runner side of `"tree": "auto"` (mixed into runner.HassRunnerMixin): start-up cost
priors, and propose_draft_token_ids with a shape chosen per step (auto_tree.Chooser via
auto_runtime.AutoRuntime; the runner's other hooks call the AutoRuntime directly).

Requests whose draft KV has a hole (they were in a step where the head did not run, see
auto_tree's docstring) are never drafted for again: `_hass_stale`.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

logger = logging.getLogger("vllm_hass")


class AutoRunnerMixin:
    def _hass_make_auto(self):
        from vllm.distributed import get_tp_group

        from vllm_hass.auto_runtime import AutoRuntime
        from vllm_hass.step import Staging

        self._hass_group_staging = Staging(2 * self.max_num_reqs + 2, self.device)
        group = get_tp_group()
        broadcast = None
        if group.world_size > 1:  # every rank must choose alike (auto_runtime docstring)
            def broadcast(obj):
                return group.broadcast_object(obj, src=0)
        stats = getattr(self.speculative_config.draft_model_config.hf_config, "hass_auto_stats", None)
        return AutoRuntime(self._hass_tree, self.device, self.max_num_tokens, self.max_num_reqs,
                           rank=group.rank_in_group, broadcast=broadcast, logger=logger,
                           stats_path=stats)

    def _hass_measure_costs(self) -> None:
        """Priors of the auto cost model, once at start-up: the target's forward + logits
        at 1, 2, 4, ... tokens (vLLM's _dummy_run, the drafter's own dummy passes off), the
        head's forward (first pass), forward + logits (a level) and logits alone (the root)
        at 1, 2, 4, ... rows; each sweep stops after a run of 0.25 s (rank 0 decides under
        TP: every rank runs the same passes) and is repeated twice over all its sizes, each
        size keeping its fastest run (another process's load only ever adds time, and the
        ratios between sizes, which decide between shapes, must not come from one spike).
        The online estimates refine them from the steps' own timings."""
        import time

        from vllm.config import CUDAGraphMode

        from vllm_hass.auto_tree import geometric

        auto, drafter = self._hass_auto, self.drafter
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)

        def timed(fn, n):
            sync()
            t0 = time.perf_counter()
            fn(n)
            sync()
            return time.perf_counter() - t0

        def sweep(part, limit, fn, passes=3):
            sizes, best = [], {}
            for n in geometric(limit):  # pass 1: up to the first run over 0.25 s
                n = min(n, limit)
                fn(n)  # warm
                sizes.append(n)
                best[n] = timed(fn, n)
                stop = best[n] > 0.25
                if auto.broadcast is not None:
                    stop = auto.broadcast(stop)
                if stop:
                    break
            for _ in range(passes - 1):  # interleaved repeats: a load spike only adds time
                for n in sizes:
                    best[n] = min(best[n], timed(fn, n))
            getattr(auto.costs, part).set_prior(sizes, [best[n] for n in sizes])

        def verify(n):  # eager (on CUDA this runs before vLLM captures its graphs)
            hidden, _ = self._dummy_run(n, cudagraph_runtime_mode=CUDAGraphMode.NONE, skip_eplb=True)
            self.model.compute_logits(hidden)

        drafter.dummy_run = lambda *args, **kwargs: None  # the target's dummy run alone
        try:
            sweep("verify", self.max_num_tokens, verify)
        finally:
            del drafter.dummy_run
        K = self._hass_tree.top_k
        sweep("first", self.max_num_tokens, lambda n: drafter.dummy_pass(n, logits=False))
        sweep("level", self.max_num_reqs * K, lambda n: drafter.dummy_pass(n, logits=True))
        sweep("root", self.max_num_reqs, lambda n: drafter._logits(drafter.hidden_states[:n]))
        c = auto.costs
        logger.info("vllm-hass: auto tree costs at start-up (ms): verify 1/%d tokens %.2f/%.2f, "
                    "head pass 1 row %.2f, with logits %.2f", K + 1, 1e3 * c.verify(1),
                    1e3 * c.verify(K + 1), 1e3 * c.first(1), 1e3 * c.level(1))

    def _hass_fresh(self, req_ids) -> np.ndarray:
        """[B] bool: the request's draft KV has no holes (auto: not in a head-off step)."""
        stale = self._hass_stale
        if not stale:
            return np.ones(len(req_ids), dtype=bool)
        if len(stale) > 4 * self.max_num_reqs:  # forget finished requests
            self._hass_stale = stale = {r: None for r in stale if r in self.requests}
        return np.fromiter((r not in stale for r in req_ids), dtype=bool, count=len(req_ids))

    def _hass_propose_auto(self, step, acc, sampled_token_ids, hidden_states):
        """propose_draft_token_ids for "tree": "auto": the chooser's plan for this step
        (auto_tree.Chooser), then the first pass and the trees of each planned shape.
        acc None: no request had drafts (built here, only when the head runs)."""
        from vllm_hass.sampler import plain_accepted
        from vllm_hass.step import first_pass_layout

        auto, ib, tree = self._hass_auto, self.input_batch, self._hass_tree
        B = ib.num_reqs
        req_ids = ib.req_ids
        auto.clock.mark("verify_end")
        qsl = self.query_start_loc.np[: B + 1]
        T = int(qsl[B])
        params = self._hass_params(req_ids)
        # the next step's tokens besides drafts: one per request, a partial prefill's next chunk
        partial = self.discard_request_mask.np[:B]
        T_next = int(np.where(partial, qsl[1:] - qsl[:-1], 1).sum())
        plan = auto.plan(B, int(params.sum()), T_next)
        drafts: list[list[int]] = [[] for _ in range(B)]
        info = {"B": B, "tokens": T}
        if not plan.head_on:  # the head does not run: these requests' draft KV gets a hole
            self._hass_stale.update(dict.fromkeys(req_ids))
            self._hass_store.replace([], np.zeros((3, 0, 0), dtype=np.int64))
            auto.clock.mark("end")
            auto.clock.end(info)
            return drafts
        if acc is None:
            acc = plain_accepted(sampled_token_ids, B, self.device)
        fp = first_pass_layout(
            num_reqs=B, qsl=qsl, computed=ib.num_computed_tokens_cpu[:B],
            verify=None if step is None else step.verify,
            depth=tree.depth if step is None else step.req_depth,
            input_ids=self.input_ids.np[:T], token_ids=ib.token_ids_cpu[:B],
            partial=self.discard_request_mask.np[:B], params_ok=params & self._hass_fresh(req_ids),
            room=max(tree.scratch_nodes, tree.max_drafts), max_model_len=self.max_model_len,
            staging=self._hass_first_staging)
        info["first_rows"] = int(fp.qsl[-1])
        groups = auto.assign(plan, fp.eligible.size)
        if len(groups) == 1 and groups[0][1].size == fp.eligible.size:  # everyone, in order
            groups = [(groups[0][0], groups[0][1], None)]
        elif groups:  # the groups' positions on the device, in one pinned non-blocking copy
            devs = self._hass_group_staging.send([pos for _, pos in groups])
            groups = [(s, pos, d) for (s, pos), d in zip(groups, devs)]
        block_table = ib.block_table[0].get_device_tensor(B)
        packed = self.drafter.propose_trees(fp, step, acc, hidden_states, block_table,
                                            groups=groups, clock=auto.clock)
        auto.clock.mark("end")
        if packed is None:
            auto.clock.end(info)
            self._hass_store.replace([], np.zeros((3, 0, 0), dtype=np.int64))
            return drafts
        host = packed.cpu().numpy()  # the step's one device->host sync: the scheduler's drafts
        auto.clock.end(info)
        rows = fp.eligible[np.concatenate([pos for _, pos, _ in groups])]
        kinds = np.concatenate([np.full(pos.size, auto.acc.kind(s.top_k)) for s, pos, _ in groups])
        self._hass_store.replace([req_ids[b] for b in rows], host, kinds)
        start = 0
        for shape, pos, _ in groups:  # each group's trees have one size
            m = min(shape.drafts, shape.top_k + (shape.depth - 1) * shape.top_k ** 2)  # grow's M
            for b, tokens in zip(rows[start: start + pos.size].tolist(),
                                 host[0, start: start + pos.size, :m].tolist()):
                drafts[b] = tokens
            start += pos.size
        self._hass_check_ranks(step, acc, fp, packed)
        return drafts

