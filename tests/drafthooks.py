"""Test hooks on the drafter's output, in-process (TP = 1 engines only: TP workers are
spawned and do not see the test's patches).

Both wrap `HassRunnerMixin.propose_draft_token_ids`, the runner's contract with vLLM:
it returns one list of draft tokens per request of the batch, and records each
request's tree topology in `runner._hass_store[req_id] = (tokens, parents, depths)`
(parents: 0 = the root, else a 1-based slot; BFS order), which the next step verifies.

- `RecordDrafts` keeps every tree the plugin drafted, per prompt, in order.
- `ForcedDrafts` replaces the plugin's trees by trees built from the target's known
  greedy continuation: at depth d the true token is among the siblings with
  probability p[d] (at a pseudo-random rank), so acceptance is partial, deterministic
  and known in advance (`expected`), and accepted paths often need KV compaction.
"""

from __future__ import annotations

import zlib
from collections import defaultdict


def _root_index(runner, b: int, req_id: str, sampled) -> int:
    """Index in prompt + output of the token the next tree hangs from (this step's last
    sampled token). The runner's bookkeeping appends this step's tokens after drafting."""
    state = runner.requests[req_id]
    row = sampled[b]
    new = int((row >= 0).sum()) if hasattr(row, "shape") else len(row)
    return len(state.prompt_token_ids) + len(state.output_token_ids) + new - 1


class _Wrap:
    def install(self, monkeypatch):
        from vllm_hass import runner as runner_mod

        orig = runner_mod.HassRunnerMixin.propose_draft_token_ids
        hook = self

        def propose_draft_token_ids(runner, scheduler_output, sampled_token_ids, *args, **kwargs):
            drafts = orig(runner, scheduler_output, sampled_token_ids, *args, **kwargs)
            return hook.after(runner, drafts, sampled_token_ids)

        monkeypatch.setattr(runner_mod.HassRunnerMixin, "propose_draft_token_ids",
                            propose_draft_token_ids)
        return self


class RecordDrafts(_Wrap):
    def __init__(self):
        self.trees: dict[tuple, list[tuple[list[int], list[int]]]] = defaultdict(list)

    def after(self, runner, drafts, sampled):
        for b, req_id in enumerate(runner.input_batch.req_ids):
            if drafts[b]:
                tokens, parents, _ = runner._hass_store[req_id]
                key = tuple(runner.requests[req_id].prompt_token_ids)
                self.trees[key].append((list(tokens), list(parents)))
        return drafts


class ForcedDrafts(_Wrap):
    """sequences: prompt tuple -> prompt + the target's greedy continuation, long enough
    to cover every position a tree can reach. p: inclusion probability per depth.
    width: siblings per level (1 = a chain)."""

    def __init__(self, sequences: dict[tuple, list[int]], p: list[float], width: int, vocab: int,
                 seed: int = 0):
        self.sequences, self.p, self.width, self.vocab, self.seed = sequences, p, width, vocab, seed
        self.expected: dict[tuple, list[int]] = defaultdict(list)  # accepted length per tree
        self.roots: dict[tuple, list[int]] = defaultdict(list)  # root index of each tree

    def _rng(self, key, root, depth) -> float:
        h = zlib.crc32(repr((self.seed, key, root, depth)).encode())
        return h / 2**32

    def tree(self, key: tuple, root: int):
        full = self.sequences[key]
        toks, par, dep = [], [], []
        spine, run, accepted = 0, True, 0
        for d, p in enumerate(self.p, start=1):
            if root + d >= len(full):
                raise AssertionError("ForcedDrafts: the known continuation is too short")
            true = full[root + d]
            hit = self._rng(key, root, d) < p
            rank = int(self._rng(key, root, -d) * self.width) if hit else -1
            first = len(toks) + 1
            for j in range(self.width):
                toks.append(true if j == rank else (true + 1 + j) % self.vocab)
                par.append(spine)
                dep.append(d)
            run = run and hit
            accepted += run
            spine = first + (rank if hit else 0)
        return toks, par, dep, accepted

    def after(self, runner, drafts, sampled):
        for b, req_id in enumerate(runner.input_batch.req_ids):
            if not drafts[b]:
                continue
            key = tuple(runner.requests[req_id].prompt_token_ids)
            root = _root_index(runner, b, req_id, sampled)
            toks, par, dep, acc = self.tree(key, root)
            self.roots[key].append(root)
            drafts[b] = toks
            runner._hass_store[req_id] = (toks, par, dep)
            self.expected[key].append(acc)
        return drafts

    def verified(self) -> list[int]:
        """Expected accepted lengths of the trees that were verified: all but each
        request's last (drafted in the step it finished)."""
        return [a for accs in self.expected.values() for a in accs[:-1]]

    def per_depth(self) -> list[int]:
        v = self.verified()
        return [sum(a >= d for a in v) for d in range(1, len(self.p) + 1)]
