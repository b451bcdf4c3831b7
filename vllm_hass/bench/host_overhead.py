"""Host overhead of the plugin's engine step: device->host syncs, torch ops and host time.

    vllm-hass bench host-overhead [--batch-sizes 1,8,64] [--steps N] [--device cpu|cuda]

Runs the plugin's own step code — `HassRunnerMixin._prepare_inputs` (tree layout, masks,
positions), the tree-attention wrapper of every target layer, `_sample` (greedy or T > 0
acceptance, KV compaction) and `propose_draft_token_ids` (first pass, tree growth per
depth, the drafts back to the scheduler) — on a stand-in of vLLM's runner, with the
model forwards and the Triton launches replaced by stand-ins that return tensors of the
right shapes. vLLM's own work (its input preparation, its sampler for the root rows, its
bookkeeping) is done outside the measured region.

* syncs / ops: counted (vllm_hass.bench.syncs) at Llama-3-8B shapes (32 layers, 32/8
  heads, d 128, vocab 128,256; tree depth 6, top_k 10, 60 tokens, 512-token contexts).
  On a CPU every tensor is on the CPU, so what would be a sync on CUDA is recognised by
  the memory it reads (registered host buffers vs the rest); on CUDA (`--device cuda`) the
  count is CUDA's own (torch.cuda.set_sync_debug_mode).
* host ms: the same steps timed with tiny tensors (same B, tree and layer count; vocab
  64, hidden 32, 4/1 heads of 16), so what remains is Python and dispatch, not the
  arithmetic a GPU would do.

No vLLM import: runs where only torch (and numpy) are installed, e.g. a GPU machine.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch

from vllm_hass.bench.syncs import HostMemory, SyncCounter
from vllm_hass.config import TreeConfig

LLAMA3_8B = dict(layers=32, heads=32, kv_heads=8, head_dim=128, hidden=4096, vocab=128256)
TINY = dict(layers=32, heads=4, kv_heads=1, head_dim=16, hidden=32, vocab=64)
TREE = TreeConfig(depth=6, top_k=10, total_tokens=60)
CONTEXT = 512
BLOCK = 16
PHASES = ("prepare", "attention", "sample", "propose")


class _NoLaunch:
    """Stands in for a Triton JIT function: `kernel[grid](...)` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def _top_k_top_p(logits: torch.Tensor, k: torch.Tensor | None, p: torch.Tensor | None):
    """Stand-in for vLLM's apply_top_k_top_p where vLLM is not installed (its work, not
    the plugin's: a sort and two masks, like vLLM's torch path)."""
    srt, idx = logits.sort(-1, descending=True)
    drop = torch.zeros_like(srt, dtype=torch.bool)
    if k is not None:
        drop |= torch.arange(srt.shape[-1], device=srt.device) >= k.unsqueeze(1)
    if p is not None:
        prob = srt.masked_fill(drop, float("-inf")).softmax(-1)
        drop |= (prob.cumsum(-1) - prob) >= p.unsqueeze(1)
    return logits.scatter(-1, idx, srt.masked_fill(drop, float("-inf")))


@contextlib.contextmanager
def kernel_stand_ins():
    """While active, Triton launches are no-ops (and, without vLLM, its top-k/top-p op a
    stand-in); everything is restored on exit, so nothing else in the process sees them."""
    from vllm_hass import sampler
    from vllm_hass.kernels import kv_compact, tree_attention

    stubs = [(tree_attention, "_tree_attn_fwd", _NoLaunch()),
             (tree_attention, "_merge_splits", _NoLaunch()),
             (kv_compact, "_kv_compact_kernel", _NoLaunch())]
    if sampler.apply_top_k_top_p is None:
        stubs.append((sampler, "apply_top_k_top_p", _top_k_top_p))
    saved = [(mod, name, getattr(mod, name)) for mod, name, _ in stubs]
    for mod, name, stub in stubs:
        setattr(mod, name, stub)
    try:
        yield
    finally:
        for mod, name, orig in saved:
            setattr(mod, name, orig)


class _Buffer:  # vLLM's CpuGpuBuffer, host side only (what the mixin reads)
    def __init__(self, n: int, dtype, host: HostMemory):
        self.cpu = host.add(torch.zeros(n, dtype=dtype), pinned=False)
        self.np = self.cpu.numpy()


class _BlockTable:
    def __init__(self, table: torch.Tensor):
        self.table = table

    def get_device_tensor(self, n: int) -> torch.Tensor:
        return self._view if self._view.shape[0] == n else self.table[:n]

    def set(self, n: int):
        self._view = self.table[:n]


class VllmRunnerStandIn:
    """What HassRunnerMixin reads of vLLM's GPUModelRunner, with vLLM's own hooks returning
    results prepared outside the measured region."""

    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens):
        return self._prepared

    def _build_attention_metadata(self, *args, **kwargs):
        return self._attn_metadata, None


@dataclass
class StepTimes:
    syncs: int
    ops: int
    ms: dict


def _make_runner(B: int, shape: dict, device, host: HostMemory, sampling: str):
    from vllm_hass.drafting import TreeDrafter
    from vllm_hass.runner import HassRunnerMixin

    cls = type("HarnessRunner", (HassRunnerMixin, VllmRunnerStandIn), {})
    r = object.__new__(cls)  # no vLLM __init__: set what the mixin reads
    num_spec = max(TREE.max_drafts, TREE.scratch_nodes)
    N = 1 + num_spec
    r.device = torch.device(device)
    r.max_num_reqs, r.max_num_tokens = B, max(B * N, 2048)
    r.max_model_len = 4096
    r._hass_tree = TREE
    r._hass_rank_check = None
    r.cache_config = SimpleNamespace(block_size=BLOCK)
    r._hass_init_buffers(num_spec)
    for st in (r._hass_verify_staging, r._hass_first_staging, r._hass_seed_staging):
        host.add(st.host, pinned=True)
    r.query_start_loc = _Buffer(B + 1, torch.int32, host)
    r.input_ids = _Buffer(r.max_num_tokens, torch.int32, host)
    r.discard_request_mask = _Buffer(B, torch.bool, host)
    r.positions = torch.zeros(r.max_num_tokens, dtype=torch.int64, device=device)
    max_blocks = r.max_model_len // BLOCK
    table = torch.arange(B * max_blocks, dtype=torch.int32, device=device).view(B, max_blocks) % 7
    bt = _BlockTable(table)
    bt.set(B)
    greedy = sampling == "greedy"
    temp = torch.full((B,), 0.0 if greedy else 0.8, device=device)
    gens = {} if greedy else {i: torch.Generator().manual_seed(i) for i in range(0, B, 4)}
    md = SimpleNamespace(temperature=temp, all_greedy=greedy, all_random=not greedy,
                         top_k=None if greedy else torch.full((B,), 20, device=device),
                         top_p=None if greedy else torch.full((B,), 0.9, device=device),
                         generators=gens, max_num_logprobs=None)
    ib = SimpleNamespace(
        num_reqs=B, req_ids=[f"req-{i}" for i in range(B)],
        num_computed_tokens_cpu=np.full(B, CONTEXT, dtype=np.int32),
        token_ids_cpu=np.random.default_rng(0).integers(0, shape["vocab"], (B, r.max_model_len)),
        block_table=[bt], sampling_metadata=md, update_async_output_token_ids=lambda: None)
    r.input_batch = ib
    r.requests = {rid: SimpleNamespace(sampling_params=SimpleNamespace()) for rid in ib.req_ids}
    V = shape["vocab"]
    # vLLM's sampler for the root rows: vLLM's work, a prepared answer
    root_tokens = torch.zeros(B, 1, dtype=torch.int32, device=device)
    r.sampler = lambda logits, sampling_metadata: SimpleNamespace(
        sampled_token_ids=root_tokens, logprobs_tensors=None)
    kv = [torch.zeros(8, shape["kv_heads"], BLOCK, 2 * shape["head_dim"], device=device)
          for _ in range(shape["layers"])]
    from vllm_hass.sampler import kv_layer_views

    r._hass_caches = kv_layer_views(kv)
    gen = torch.Generator(device=device).manual_seed(0)
    draft_logits = torch.randn(B * TREE.top_k, V, generator=gen, device=device)

    class Drafter(TreeDrafter):
        tree, block_size = TREE, BLOCK

        def _forward(self, input_ids, positions, hidden, attn):
            if attn.tree is not None:  # the head's one attention layer
                _attention_layer(attn.tree, input_ids.shape[0], shape, kv[0])
            return hidden  # [n, H]: the head's output stand-in

        def _logits(self, h):
            return draft_logits[: h.shape[0]]

    r._hass_kv0 = kv[0]
    r.drafter = Drafter()
    r.drafter.device = r.device
    return r, gen


def _attention_layer(info, n_rows: int, shape: dict, kv_cache: torch.Tensor) -> None:
    """The CUDA path's per-layer tree rows (vllm_hass.attn_info.tree_rows with the Triton
    kernel, launch stubbed) on stand-in query/output buffers."""
    from vllm_hass.attn_info import layer_kv_views, tree_rows
    from vllm_hass.kernels.tree_attention import split_kv_cache, tree_attention

    q = _QUERY.get(kv_cache.device)
    if q is None or q.shape[0] < n_rows or q.shape[1] != shape["heads"] * shape["head_dim"]:
        q = _QUERY[kv_cache.device] = torch.zeros(n_rows, shape["heads"] * shape["head_dim"],
                                                  device=kv_cache.device)
    k, v = layer_kv_views(_IMPL, kv_cache, split_kv_cache)  # what attention_cuda._tree_rows runs
    tree_rows(info, q[:n_rows], k, v, q[:n_rows], shape["heads"], shape["head_dim"], 1.0, tree_attention)


_IMPL = SimpleNamespace()  # stands in for the layer's attention impl (its views cache)
_QUERY: dict = {}  # stand-in query/output buffer of the target's attention layers


class _Counter:
    """SyncCounter on a CPU (emulated device); on CUDA, CUDA's own sync count plus the
    op count."""

    def __init__(self, host: HostMemory, device: str):
        self.cuda = torch.device(device).type == "cuda"
        self.ops_counter = SyncCounter(host, device_is_cpu_emulated=not self.cuda)
        self.syncs, self.ops, self.events = 0, 0, []

    def __enter__(self):
        if self.cuda:
            from vllm_hass.bench.syncs import cuda_sync_count

            self._cuda = cuda_sync_count()
            self._res = self._cuda.__enter__()
        self.ops_counter.__enter__()
        return self

    def __exit__(self, *exc):
        self.ops_counter.__exit__(*exc)
        self.ops = self.ops_counter.ops
        if self.cuda:
            self._cuda.__exit__(*exc)
            self.syncs += self._res.count
            self.events += self._res.messages
        else:
            self.syncs, self.events = self.ops_counter.syncs, list(self.ops_counter.events)
        return False


class Scheduler:
    """vLLM's scheduler and bookkeeping around the runner, outside the measured region:
    schedules each request's drafts, lays out the input ids, reads back the output."""

    def __init__(self, runner, shape: dict, gen):
        self.r, self.shape, self.gen = runner, shape, gen
        B = runner.input_batch.num_reqs
        self.drafts: list[list[int]] = [[] for _ in range(B)]
        self.root = np.zeros(B, dtype=np.int64)
        self.logits = None

    def before(self):
        r, ib = self.r, self.r.input_batch
        B = ib.num_reqs
        k = np.array([len(d) for d in self.drafts])
        n = 1 + k
        qsl = np.concatenate([[0], np.cumsum(n)])
        r.query_start_loc.np[: B + 1] = qsl
        ids = np.concatenate([[self.root[b], *self.drafts[b]] for b in range(B)])
        r.input_ids.np[: ids.size] = ids
        pos = np.concatenate([ib.num_computed_tokens_cpu[b] + np.arange(n[b]) for b in range(B)])
        r.positions[: pos.size] = torch.from_numpy(pos).to(r.device)
        # vLLM 0.32/0.33 build SpecDecodeMetadata every step (max_spec_len 0: no drafts)
        spec = SimpleNamespace(num_draft_tokens=k.tolist(), max_spec_len=int(k.max()))
        r._prepared = (None, spec, int(n.max()))
        r._attn_metadata = {"layer": SimpleNamespace()}
        T = int(qsl[-1])
        V = self.shape["vocab"]
        if self.logits is None or self.logits.shape[0] < T:
            self.logits = torch.randn(T, V, generator=self.gen, device=r.device)
            self.hidden = torch.randn(max(T, r.max_num_tokens), self.shape["hidden"],
                                      generator=self.gen, device=r.device)
        self.T = T
        return SimpleNamespace(scheduled_spec_decode_tokens={}), n

    def after(self, out, drafts):
        ib = self.r.input_batch
        tok = out.sampled_token_ids.cpu().numpy()
        for b in range(ib.num_reqs):
            valid = tok[b][tok[b] >= 0]
            ib.num_computed_tokens_cpu[b] += len(valid)
            self.root[b] = valid[-1]
        self.drafts = drafts


def run_steps(B: int, shape: dict, sampling: str, steps: int, device: str = "cpu",
              count: bool = True) -> list[StepTimes]:
    host = HostMemory()
    torch.manual_seed(0)
    r, gen = _make_runner(B, shape, device, host, sampling)
    sched = Scheduler(r, shape, gen)
    out_steps = []
    for i in range(steps):
        so, n = sched.before()
        counter = _Counter(host, device) if count else None
        ms = {}

        def timed(name, fn, *a):
            t0 = time.perf_counter()
            if counter is not None:
                with counter:
                    res = fn(*a)
            else:
                res = fn(*a)
            ms[name] = ms.get(name, 0.0) + (time.perf_counter() - t0) * 1e3
            return res

        timed("prepare", r._prepare_inputs, so, n)
        timed("prepare", r._build_attention_metadata)
        step = r._hass_step
        info = getattr(r._attn_metadata["layer"], "hass_tree", None)  # what the backend reads
        if info is not None:
            for _ in range(shape["layers"]):
                timed("attention", _attention_layer, info, sched.T, shape, r._hass_kv0)
        else:
            ms["attention"] = 0.0
        logits = sched.logits[: sched.T]
        if step is not None:
            out = timed("sample", r._sample, logits, None)
            sampled = out.sampled_token_ids
        else:  # no drafts scheduled: vLLM's sampler alone
            out = SimpleNamespace(sampled_token_ids=torch.zeros(B, 1, dtype=torch.int32, device=r.device))
            sampled = out.sampled_token_ids
            ms["sample"] = 0.0
        drafts = timed("propose", r.propose_draft_token_ids, so, sampled, None,
                       sched.hidden[: sched.T], None, None, None, None, None)
        sched.after(out, drafts)
        out_steps.append(StepTimes(counter.syncs if counter else 0, counter.ops if counter else 0, ms))
        if counter is not None and i == steps - 1:
            out_steps[-1].events = list(counter.events)
    return out_steps


def measure(batch_sizes, steps: int, device: str = "cpu", shape_counts=LLAMA3_8B, shape_time=TINY):
    import os

    os.environ["VLLM_HASS_TREE_KERNEL"] = "triton"  # the CUDA path's compaction (launch stubbed)
    with kernel_stand_ins():
        return _measure(batch_sizes, steps, device, shape_counts, shape_time)


def _measure(batch_sizes, steps, device, shape_counts, shape_time):
    rows = []
    for B in batch_sizes:
        for sampling in ("greedy", "T>0"):
            # the first step drafts without verifying; steady state from step 2 on
            counted = run_steps(B, shape_counts, sampling, 3, device)[2:]
            timed = run_steps(B, shape_time, sampling, steps + 2, device, count=False)[2:]
            per_phase = {p: statistics.median(t.ms.get(p, 0.0) for t in timed) for p in PHASES}
            total = statistics.median(sum(t.ms.values()) for t in timed)
            rows.append(dict(B=B, sampling=sampling, syncs=counted[0].syncs, ops=counted[0].ops,
                             events=getattr(counted[0], "events", []), ms=total, **per_phase))
    return rows


def format_table(rows) -> str:
    lines = ["| B | sampling | syncs/step | torch ops/step | host ms/step | prepare | attention (32 layers) | sample | propose |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['B']} | {r['sampling']} | {r['syncs']} | {r['ops']} | {r['ms']:.2f} | "
                     f"{r['prepare']:.2f} | {r['attention']:.2f} | {r['sample']:.2f} | {r['propose']:.2f} |")
    return "\n".join(lines)


def run(args) -> int:
    rows = measure(list(args.batch_sizes), args.steps, args.device)
    print(format_table(rows))
    if args.events:
        for r in rows:
            print(r["B"], r["sampling"], r["events"])
    return 0


def main(argv=None) -> int:
    from vllm_hass.bench.flags import int_list_arg

    ap = argparse.ArgumentParser(prog="vllm-hass bench host-overhead", description=__doc__.split("\n")[0])
    ap.add_argument("--batch-sizes", default="1,8,64", type=int_list_arg("--batch-sizes"))
    ap.add_argument("--steps", type=int, default=30, help="timed steps per configuration")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--events", action="store_true", help="list each counted sync")
    return run(ap.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
