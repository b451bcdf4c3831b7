"""One engine step's data: `TreeStep`, built in the runner's `_prepare_inputs` from the
scheduler's host-side numbers, read by `_sample` (acceptance, KV compaction) and by the
drafter (its first pass).

Everything whose shape or value the host already knows — which requests carry trees,
their slots, parents and depths, the logits rows, the RoPE positions, the tree masks,
the draft's first-pass layout and its lengths — is computed here with numpy on the host
and sent to the device in one non-blocking copy from a pinned buffer (`Staging`).
Only what depends on this step's acceptance (which path, which bonus token) is computed
on the device, with fixed shapes, so a step needs no device->host sync until the new
drafts go back to the scheduler (`drafts_to_host`: the step's one sync).

No vLLM import: the host-overhead harness (vllm_hass/bench/host_overhead.py) runs this
module on machines without vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from vllm_hass.attn_info import TreeAttnInfo
from vllm_hass.tree import VerifyTrees


class Staging:
    """A pinned host buffer and its device twin, allocated once at the maximum size.

    `send(arrays)` packs int64 arrays into the host buffer and issues one non-blocking
    copy; the returned device views are valid for this step. The host buffer is reused
    next step: safe because between two writes of one buffer the host syncs with the
    device at least once after the first copy was queued (vLLM's synchronous bookkeeping
    reads every step's sampled tokens; the drafts' copy is another), so that copy has
    completed. Trees run with synchronous scheduling only (refused otherwise)."""

    def __init__(self, capacity: int, device: torch.device):
        pin = torch.cuda.is_available() and torch.device(device).type == "cuda"
        self.host = torch.zeros(capacity, dtype=torch.int64, pin_memory=pin)
        self.host_np = self.host.numpy()
        self.dev = torch.zeros(capacity, dtype=torch.int64, device=device)

    def send(self, arrays: list[np.ndarray]) -> list[torch.Tensor]:
        sizes = [a.size for a in arrays]
        total = sum(sizes)
        if total > self.host_np.size:
            raise AssertionError(f"vllm-hass staging: {total} values exceed the {self.host_np.size} "
                                 "allocated at start-up (a bound in step.py is wrong)")
        off = np.concatenate([[0], np.cumsum(sizes)])
        for a, s in zip(arrays, off[:-1]):
            self.host_np[s: s + a.size] = a.ravel()
        dev = self.dev[:total]
        dev.copy_(self.host[:total], non_blocking=True)
        return [t.view(a.shape) for t, a in zip(dev.split(sizes), arrays)]


class DraftStore:
    """Each request's last drafted tree (tokens, parents, depths, score ranks; BFS, 1-based
    parents) and the kind of tree it is (`kind`: its acceptance-statistics table, -1 =
    none), as host arrays: what the scheduler sends back as speculative tokens is matched
    against it to recover the tree topology. Also item-assignable by request id (the
    tests' forced drafts: ranks unknown)."""

    ROWS = 4  # tokens, parents, depths, ranks

    def __init__(self, rows: int, width: int):
        self.width = width
        self.arrays = np.full((self.ROWS, rows, width), -1, dtype=np.int64)
        self.kind = np.full(rows, -1, dtype=np.int64)
        self.index: dict[str, int] = {}
        self.count = 0

    def replace(self, req_ids: list[str], packed: np.ndarray, kind: np.ndarray | int = -1) -> None:
        """packed [3 or 4, Be, M]: this step's trees for req_ids (in order); kind [Be]."""
        r, be, m = packed.shape
        self.arrays[:r, :be, :m] = packed
        self.arrays[r:, :be] = -1
        self.arrays[:, :be, m:] = -1
        self.kind[:be] = kind
        self.index = dict(zip(req_ids, range(be)))
        self.count = be

    def __setitem__(self, req_id: str, tree) -> None:
        row = self.index.get(req_id)
        if row is None:
            row, self.count = self.count, self.count + 1
            self.index[req_id] = row
        t = np.asarray(tree, dtype=np.int64)
        self.arrays[:, row] = -1
        self.arrays[: t.shape[0], row, : t.shape[1]] = t
        self.kind[row] = -1

    def __getitem__(self, req_id: str):
        a = self.arrays[:, self.index[req_id]]
        k = int((a[0] >= 0).sum())
        return a[0, :k].tolist(), a[1, :k].tolist(), a[2, :k].tolist()

    def rows_of(self, req_ids: list[str]) -> np.ndarray:
        get = self.index.get
        return np.fromiter((get(r, -1) for r in req_ids), dtype=np.int64, count=len(req_ids))


@dataclass
class FirstPass:
    """The draft head's first (causal) pass over what the target just accepted.

    Request b gets F[b] rows: a verify request min(depth, drafts) + 1 (root, its
    accepted path, padding up to the longest possible path: fixed before acceptance is
    known), any other request its scheduled rows. Row j sits at position computed + j."""

    qsl: np.ndarray  # [B+1] host offsets of each request's rows
    qsl_dev: torch.Tensor  # [B+1]
    positions: torch.Tensor  # [T] draft positions
    row_req: torch.Tensor  # [T] request of each row
    row_j: torch.Tensor  # [T] row index within the request
    host_tok: torch.Tensor  # [T] input token where the host knows it (-1: filled on device)
    bonus_row: torch.Tensor  # [T] bool: the row reads this step's bonus token
    verify_row: torch.Tensor  # [T] bool: the row belongs to a verified tree
    verify_req: torch.Tensor  # [B] bool: the request was verified
    F: torch.Tensor  # [B] rows per request
    target_start: torch.Tensor  # [T] first target row (query row) of the row's request
    seq_lens: np.ndarray  # [B] host: computed + F (exact: padding rows included)
    seq_lens_dev: torch.Tensor  # [B]
    eligible: np.ndarray  # [Be] host indices of requests that get a new tree
    eligible_dev: torch.Tensor  # [Be]
    base_bound: np.ndarray  # [Be] host upper bound of each drafted request's last position


@dataclass
class TreeStep:
    """What one tree step carries from `_prepare_inputs` to `_sample` and the drafter."""

    num_reqs: int
    verify: np.ndarray  # [B] host bool: drafts were scheduled (the request is verified)
    any_verify: bool
    max_depth: int  # deepest verified slot (host)
    trees: VerifyTrees  # device
    live_rows: torch.Tensor  # [R] logits row of every live slot, in (request, slot) order
    row_req: torch.Tensor  # [R] request of each live slot
    slot_row: torch.Tensor  # [B, N] index into live_rows of each slot (-1: padding)
    root_pos: torch.Tensor  # [B] int64 position of each root (num_computed_tokens)
    attn: TreeAttnInfo | None  # target tree attention (None: only chains / no trees)
    req_depth: np.ndarray | None = None  # [B] host: deepest verified slot of each request
    stat_cells: torch.Tensor | None = None  # [B, N, 2] acceptance-statistics cells ("auto")
    stat_cells_host: np.ndarray | None = None  # the same, on the host
    first: FirstPass | None = None  # filled once eligibility is known (propose)
    acc: object | None = None  # sampler.Accepted, filled by _sample


def ancestor_masks(parents: np.ndarray, n: np.ndarray) -> np.ndarray:
    """parents [Bt, N] (-1 root/padding), n [Bt] live slots -> packed int32 mask rows
    [sum(n), ceil(N/32)]: bit j of a row = the node attends tree slot j (its ancestors
    and itself). Host numpy, pointer jumping (log2 N rounds)."""
    bt, N = parents.shape
    anc = np.broadcast_to(np.eye(N, dtype=bool), (bt, N, N)).copy()
    up = parents.copy()
    rows_b = np.arange(bt)[:, None]
    for _ in range(max(1, int(N).bit_length())):
        has = up >= 0
        idx = np.where(has, up, 0)
        anc |= anc[rows_b, idx] & has[..., None]
        up = np.where(has, up[rows_b, idx], up)
    live = np.arange(N) < n[:, None]
    anc &= live[:, None, :]
    words = -(-N // 32)
    bits = np.zeros((bt, N, words * 32), dtype=bool)
    bits[..., :N] = anc
    packed = np.packbits(bits, axis=-1, bitorder="little").view("<i4")  # [bt, N, words]
    return packed[live]


def verify_layout(*, num_reqs: int, qsl: np.ndarray, computed: np.ndarray, num_drafts: np.ndarray,
                  input_ids: np.ndarray, store: DraftStore, req_ids: list[str],
                  block_table: torch.Tensor, positions: torch.Tensor, staging: Staging,
                  stats=None) -> TreeStep:
    """The verification step's layout (vLLM laid the drafts out as a chain; we recover
    each request's tree from the store and rewrite the drafts' RoPE positions).

    qsl [B+1], computed [B], num_drafts [B], input_ids [T]: vLLM's host arrays for this
    step (input_ids holds each request's root then its scheduled drafts). A request whose
    scheduled drafts are not (a prefix of) its stored tree — vLLM's -1 placeholders of a
    resumed request, say — verifies its root only. Trees of any size and shape mix in one
    step (each request's own, padded to the largest). stats(kind [B], depths, ranks,
    parents, live [B, N]) -> [B, N, 2] int64: acceptance-statistics cells of every slot
    ("tree": "auto"), staged with the rest."""
    B = num_reqs
    k = num_drafts[:B].astype(np.int64)
    N = 1 + int(k.max())
    cols = np.arange(N)
    sched = cols < (1 + k)[:, None]
    start = qsl[:B].astype(np.int64)
    tok = np.where(sched, input_ids[np.minimum(start[:, None] + cols, input_ids.size - 1)], -1)
    srow = store.rows_of(req_ids)
    st = store.arrays[: 3 if stats is None else 4, np.maximum(srow, 0), : N - 1]  # [3|4, B, N-1]
    match = (srow >= 0) & (k > 0) & ((st[0] == tok[:, 1:]) | ~sched[:, 1:]).all(1)
    n = np.where(match, 1 + k, 1)
    live = cols < n[:, None]
    tokens = np.where(live, tok, -1)
    parents = np.full((B, N), -1, dtype=np.int64)
    depths = np.zeros((B, N), dtype=np.int64)
    parents[:, 1:] = np.where(live[:, 1:], st[1], -1)
    depths[:, 1:] = np.where(live[:, 1:], st[2], 0)
    # logits rows: vLLM computes 1 + k rows per request (every draft and the bonus)
    lstart = np.cumsum(1 + k) - (1 + k)
    rows = lstart[:, None] + np.minimum(cols, n[:, None] - 1)
    live_rows = rows[live]
    row_req = np.nonzero(live)[0]
    slot_row = np.full((B, N), -1, dtype=np.int64)
    slot_row[live] = np.arange(live_rows.size)
    # depth-based RoPE positions of the drafts (their KV slots stay linear)
    draft = live.copy()
    draft[:, 0] = False
    b_idx, s_idx = np.nonzero(draft)
    pos_rows = start[b_idx] + s_idx
    pos_vals = computed[b_idx].astype(np.int64) + depths[b_idx, s_idx]
    # tree attention for requests that branch (a chain is the tail of a causal query:
    # vLLM's kernel already shows each draft exactly its ancestors)
    chain = (parents[:, 1:] == cols[:-1]) | ~live[:, 1:]
    tree_reqs = np.nonzero((n > 1) & ~chain.all(1))[0]
    arrays = [tokens, parents, depths, n, rows, live_rows, row_req, slot_row,
              computed[:B].astype(np.int64), pos_rows, pos_vals]
    cells = None
    if stats is not None:
        ranks = np.full((B, N), -1, dtype=np.int64)
        ranks[:, 1:] = np.where(live[:, 1:], st[3], -1)
        kind = np.where(srow >= 0, store.kind[np.maximum(srow, 0)], -1)
        cells = stats(kind, depths, ranks, parents, live)
        arrays.append(cells)
    fixed = len(arrays)
    if tree_reqs.size:
        nt = n[tree_reqs]
        mask = ancestor_masks(parents[tree_reqs], nt)
        arrays += [tree_reqs, np.concatenate([[0], np.cumsum(nt)]), start[tree_reqs],
                   computed[tree_reqs].astype(np.int64), nt, mask.astype(np.int64)]
    dev = staging.send(arrays)
    tokens_d, parents_d, depths_d, n_d, rows_d, live_d, rreq_d, srow_d, root_d, prow_d, pval_d = dev[:11]
    positions[prow_d] = pval_d
    attn = None
    if tree_reqs.size:
        treq_d, qsl_d, qstart_d, pre_d, tl_d, mask_d = dev[fixed:]
        attn = TreeAttnInfo(
            query_start_loc=qsl_d.int(), q_row_start=qstart_d.int(),
            block_table=block_table[treq_d], prefix_lens=pre_d.int(), tree_lens=tl_d.int(),
            tree_mask=mask_d.int(), all_rows=int(nt.sum()) == int(qsl[B]),
            max_query_len=int(nt.max()), max_prefix_len=int(computed[tree_reqs].max()))
    verify = k > 0
    return TreeStep(
        num_reqs=B, verify=verify, any_verify=bool(verify.any()),
        max_depth=int(depths.max()),
        trees=VerifyTrees(tokens=tokens_d, parents=parents_d, depths=depths_d, n=n_d, rows=rows_d),
        live_rows=live_d, row_req=rreq_d, slot_row=srow_d, root_pos=root_d, attn=attn,
        req_depth=depths.max(1), stat_cells=None if cells is None else dev[11],
        stat_cells_host=cells)


def first_pass_layout(*, num_reqs: int, qsl: np.ndarray, computed: np.ndarray,
                      verify: np.ndarray | None, depth: int | np.ndarray, input_ids: np.ndarray,
                      token_ids: np.ndarray, partial: np.ndarray, params_ok: np.ndarray,
                      room: int, max_model_len: int, staging: Staging) -> FirstPass:
    """Host layout of the draft's first pass (see FirstPass). token_ids [B, max_len]:
    vLLM's per-request token buffer (the next prompt token of a partial prefill chunk);
    partial [B]: a chunk that does not end its prompt; params_ok [B]: sampling options
    allow a tree; room: KV positions a tree needs after the last accepted token; depth:
    the longest path a verified tree can have (or [B], each request's)."""
    B = num_reqs
    start = qsl[:B].astype(np.int64)
    n_sched = qsl[1: B + 1].astype(np.int64) - start
    comp = computed[:B].astype(np.int64)
    ver = np.zeros(B, dtype=bool) if verify is None else verify[:B]
    F = np.where(ver, np.minimum(depth, n_sched - 1) + 1, n_sched)
    fqsl = np.concatenate([[0], np.cumsum(F)])
    T = int(fqsl[-1])
    row_req = np.repeat(np.arange(B), F)
    row_j = np.arange(T) - fqsl[:-1][row_req]
    last = row_j == F[row_req] - 1
    # host tokens of plain rows: the next scheduled token; a partial chunk's last row:
    # the next prompt token; other last rows read the bonus (device)
    nxt = input_ids[np.minimum(start[row_req] + row_j + 1, input_ids.size - 1)]
    part_tok = token_ids[row_req, np.minimum(comp[row_req] + row_j + 1, token_ids.shape[1] - 1)]
    vrow = ver[row_req]
    host_tok = np.where(vrow, -1, np.where(last, np.where(partial[row_req], part_tok, -1), nxt))
    bonus_row = ~vrow & last & ~partial[row_req]
    positions = comp[row_req] + row_j
    last_bound = comp + F - 1  # the last accepted position is at most this
    ok = (last_bound + 1 + room < max_model_len) & ~(partial & ~ver) & params_ok
    eligible = np.nonzero(ok)[0]
    pos_d, req_d, j_d, tok_d, brow_d, vrow_d, qsl_d, vreq_d, F_d, ts_d, sl_d, el_d = staging.send(
        [positions, row_req, row_j, host_tok, bonus_row.astype(np.int64), vrow.astype(np.int64),
         fqsl, ver.astype(np.int64), F, start[row_req], comp + F, eligible])
    return FirstPass(qsl=fqsl, qsl_dev=qsl_d, positions=pos_d, row_req=req_d, row_j=j_d,
                     host_tok=tok_d, bonus_row=brow_d.bool(), verify_row=vrow_d.bool(),
                     verify_req=vreq_d.bool(), F=F_d, target_start=ts_d,
                     seq_lens=comp + F, seq_lens_dev=sl_d, eligible=eligible, eligible_dev=el_d,
                     base_bound=last_bound[eligible])


def first_pass_inputs(fp: FirstPass, step: TreeStep | None, acc):
    """Device side of the first pass, from this step's acceptance (fixed shapes).

    Returns (tokens [T], hidden_rows [T] into the target's hidden states, last [B] row of
    each request's last accepted token, base [B] its draft position). Verify request row j:
    token = the path's j-th token (j < L) or the bonus (j >= L, padding included), hidden
    of slot path[j-1] (root for j = 0 and padding); other rows: the host token or the
    bonus, hidden of scheduled row j."""
    b, j = fp.row_req, fp.row_j
    bonus = acc.bonus[b]
    if step is not None and step.any_verify:
        L = acc.length
        P = acc.path.shape[1]
        path = torch.cat([acc.path, torch.full_like(acc.path[:, :1], -1)], 1)  # [B, P+1]
        at = path[b, j.clamp(max=P)]  # path slot j (the token of row j)
        before = path[b, (j - 1).clamp(min=0, max=P)]  # path slot j-1 (the hidden of row j)
        Lb = L[b]
        vtok = torch.where(j < Lb, step.trees.tokens[b, at.clamp(min=0)], bonus)
        vslot = torch.where((j >= 1) & (j <= Lb), before.clamp(min=0), 0)
        slot = torch.where(fp.verify_row, vslot, j)
        tok = torch.where(fp.verify_row, vtok, torch.where(fp.bonus_row, bonus, fp.host_tok))
        lastj = torch.where(fp.verify_req, L, fp.F - 1)
    else:
        slot = j
        tok = torch.where(fp.bonus_row, bonus, fp.host_tok)
        lastj = fp.F - 1
    hidden_rows = fp.target_start + slot
    last = fp.qsl_dev[:-1] + lastj
    base = fp.positions[last]
    return tok, hidden_rows, last, base
