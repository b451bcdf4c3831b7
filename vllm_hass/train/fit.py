"""Train an EAGLE or HASS head on the features made by `data.generate`.

Per batch, for steps j = 1..n (n = 1 is EAGLE):
    out_j = step_forward(head, embeds, [h_1..h_j])                 (hca.py)
    loss_j = v_w * SmoothL1(out_j, f_next) + p_w * CE(q, p_j) + topk_w * TopK(q, p_j)
    backward(beta^(j-1) * loss_j);  h_{j+1} = shift(out_j).detach()
then one AdamW step. Position i of the head consumes (target feature f_i, token
t_{i+1}) at position id i and is scored against f_{i+1} and the target's
distribution q_{i+1} over t_{i+2}, where t_{i+2} is an assistant token.
With a draft vocabulary (--draft-vocab, draft_vocab.py) the head's logits are the
vocabulary's rows of the lm_head (sliced once per run) and CE/Top-K are taken over
the vocabulary (losses.py: how the target's mass outside it counts).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch

from vllm_hass.errors import UserError
from vllm_hass.head import HassHead, HeadConfig

from .data import DTYPES, Samples, batches, collate
from .draft_vocab import DraftVocab, resolve
from .hca import next_hidden, step_forward
from .losses import feature_loss, in_vocab, soft_ce, to_draft, topk_loss


@dataclasses.dataclass
class Recipe:
    steps: int = 3           # harmonized context alignment steps (1 = EAGLE)
    v_w: float = 1.0         # feature regression (SmoothL1)
    p_w: float = 0.1         # soft cross-entropy against the target's distribution
    topk_w: float = 1.0      # Top-K distillation
    topk: int = 10
    beta: float = 1.0        # step j's loss is weighted beta^(j-1)
    noise: float = 0.2       # EAGLE's uniform feature noise
    topk_from_epoch: int = 0  # two-stage recipe: EAGLE loss first, Top-K from this epoch


METHODS = {"eagle": dict(steps=1, topk_w=0.0), "hass": dict(steps=3, topk_w=1.0)}


def load_shared(target: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The target's input embedding and lm_head (float32), read straight from safetensors."""
    from safetensors import safe_open

    want = {"model.embed_tokens.weight": None, "lm_head.weight": None}
    for f in sorted(target.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            for k in set(fh.keys()) & set(want):
                want[k] = fh.get_tensor(k).float()
    embed = want["model.embed_tokens.weight"]
    if embed is None:
        raise UserError(f"--target {target}: no model.embed_tokens.weight in *.safetensors")
    return embed, want["lm_head.weight"] if want["lm_head.weight"] is not None else embed  # tied


def resolve_lm_head_dtype(name: str, device: str) -> str:
    """auto: bfloat16 on CUDA (tensor cores), float32 elsewhere: on this project's CPUs
    (AVX2, no AMX/AVX-512) a bf16 [1500, 576] x [576, 8192] matmul took 4-5x a float32 one."""
    if name != "auto":
        return name
    return "bfloat16" if str(device).startswith("cuda") else "float32"


def logits(head: HassHead, out: torch.Tensor, lm_head: torch.Tensor) -> torch.Tensor:
    """head.logits with the matmul in lm_head's dtype (bfloat16: AMX / tensor cores, ~6x
    faster on this CPU; EAGLE and HASS train in bf16 mixed precision too); float32 result."""
    if head.lm_head_norm is not None:
        out = head.lm_head_norm(out)
    return (out.to(lm_head.dtype) @ lm_head.t()).float()


def head_config(target_cfg: dict, fc_bias: bool = True) -> HeadConfig:
    return HeadConfig.from_dict({**target_cfg, "hass": {"fc_bias": fc_bias}})


def uniform_noise(h: torch.Tensor, lengths: torch.Tensor, std: float,
                  gen: torch.Generator) -> torch.Tensor:
    # EAGLE: U(-0.5, 0.5) * std * 512 / len, len = the sample's length (its feature tensor
    # is [1, len, H] and it divides by shape[1]); kept so the recipe matches.
    if std <= 0:
        return h
    u = torch.rand(h.shape, generator=gen, dtype=torch.float32).to(h.device)
    return h + (u - 0.5) * (std * 512 / lengths.clamp_min(1).float())[:, None, None]


def batch_forward(head: HassHead, batch: dict, embed: torch.Tensor, lm_head: torch.Tensor,
                  r: Recipe, topk_w: float, gen: torch.Generator | None, train: bool,
                  vocab: DraftVocab | None = None, lm_draft: torch.Tensor | None = None,
                  lm_draft_f32: torch.Tensor | None = None) -> dict:
    """Runs the n steps on one batch; with train=True also accumulates gradients.
    Returns per-step losses and top-1 agreement with the target (masked means).
    vocab/lm_draft: the draft vocabulary and its lm_head rows [Vd, H] (lm_head[vocab.ids]);
    lm_head [V, H] still gives the target's q over the full vocabulary, unless the data
    stores the target's log-normaliser `lse` and lm_draft_f32 (the same rows in float32) is
    given: then q over the vocabulary is exp(f @ W_D^T - lse), a Vd-row matmul, not V.

    The head runs over every position (attention needs the whole context), but the
    lm_head, q and the losses only over the N scored positions (assistant tokens): the
    packed [N, ...] tensors below. Padding and prompt positions cost nothing there."""
    ids, f = batch["input_ids"], batch["hidden"]
    B, T = ids.shape
    L, dev = T - 1, f.device
    embeds = embed[ids[:, 1:]]
    h1 = f[:, :-1]
    if train and gen is not None:
        h1 = uniform_noise(h1, batch["valid"].sum(1), r.noise, gen)
    mask = torch.cat((batch["loss_mask"][:, 2:], torch.zeros(B, 1, device=dev)), dim=1)  # [B, L]
    sel = mask.nonzero(as_tuple=True)  # training only (never the serving path): a sync is fine
    w = mask[sel]                                       # [N] position weights
    pos_n = sel[1]                                      # [N] position of each scored row
    target = f[:, 1:][sel]                              # [N, H]
    q_top1 = batch["topk_ids"][:, 1:, 0][sel]           # [N] the target's greedy token (f32 logits)
    tk_ids = batch["topk_ids"][:, 1:, :r.topk][sel]     # [N, K]
    tk_p = batch["topk_p"][:, 1:, :r.topk][sel]         # [N, K]
    with torch.no_grad():
        if vocab is not None and lm_draft_f32 is not None and "lse" in batch:
            lse = batch["lse"][:, 1:][sel]              # [N]
            q = (target.float() @ lm_draft_f32.t() - lse[:, None]).exp()  # [N, Vd], sums to m
        else:
            # the target's own next-token distribution (its features are post-norm)
            q = (target.to(lm_head.dtype) @ lm_head.t()).float().softmax(-1)  # [N, V]
            if vocab is not None:
                q = in_vocab(q, vocab.ids)              # [N, Vd], sums to the in-vocabulary mass
    if vocab is not None:  # everything in draft ids; outside tokens carry no probability
        tk_ids, tk_p = to_draft(tk_ids, tk_p, vocab.index)
        q_top1 = vocab.index[q_top1]  # -1: the target's greedy token is outside
    else:
        lm_draft = lm_head
    pos = torch.arange(L, device=dev)[None].expand(B, L)
    hiddens, stats = [h1], {"loss": 0.0, "steps": []}
    for j in range(1, r.steps + 1):
        out = step_forward(head, embeds, hiddens, pos)  # [B, L, H]
        o = out[sel]                                    # [N, H]
        m = w * (pos_n >= j - 1)  # positions whose context end would be before the sequence
        logp = logits(head, o, lm_draft).log_softmax(-1)  # [N, V or Vd]
        vloss, ploss = feature_loss(o, target, m), soft_ce(logp, q, m)
        tloss = topk_loss(logp, tk_ids, tk_p, m) if topk_w > 0 else torch.zeros((), device=dev)
        loss = r.v_w * vloss + r.p_w * ploss + topk_w * tloss
        if train:
            (r.beta ** (j - 1) * loss).backward()
        with torch.no_grad():
            n = m.sum().item()
            # amax, not argmax: 7x faster over a 49k vocabulary on CPU
            top1 = (logp.gather(-1, q_top1.clamp_min(0)[..., None])[..., 0] == logp.amax(-1)) \
                & (q_top1 >= 0)
            hit = (top1.float() * m).sum().item()
        stats["steps"].append({"v": vloss.item(), "p": ploss.item(), "topk": tloss.item(),
                               "hit": hit, "n": n})
        stats["loss"] += r.beta ** (j - 1) * loss.item()
        hiddens.append(next_hidden(h1, out.detach()))
    return stats


@torch.no_grad()
def evaluate(head: HassHead, samples: Samples, idx: list[int], embed, lm_head,
             steps: int = 5, max_len: int | None = None,
             draft_ids: torch.Tensor | None = None) -> dict:
    """Decode-exact per-step top-1 agreement with the target on held-out samples, and
    the chain acceptance it implies: for every context end c inside a reply, how many
    of the draft's next `steps` greedy tokens match the target's (teacher-forced on the
    data's tokens, which equal the target's own when the data is self-distilled).
    With draft_ids [Vd], lm_head holds those rows only and drafts map back through them."""
    head.eval()
    hit = torch.zeros(steps)
    n = 0
    accepted = torch.zeros(steps + 1)  # histogram of accepted lengths
    for i in idx:
        b = {k: v.to(embed.device) for k, v in collate([samples[i]], max_len).items()}
        ids, f = b["input_ids"], b["hidden"]
        L = ids.shape[1] - 1
        embeds = embed[ids[:, 1:]]
        q_top1 = b["topk_ids"][:, 1:, 0]  # the target's greedy token
        mask = b["loss_mask"][0, 2:].cpu().bool()
        mask = torch.cat((mask, torch.zeros(1, dtype=torch.bool)))
        pos = torch.arange(L, device=embed.device)[None]
        hiddens, ok = [f[:, :-1]], []
        for j in range(1, steps + 1):
            out = step_forward(head, embeds, hiddens, pos)
            draft = logits(head, out, lm_head).argmax(-1)
            draft = draft if draft_ids is None else draft_ids[draft]
            ok.append((draft == q_top1)[0].cpu() & mask)
            hiddens.append(next_hidden(f[:, :-1], out))
        # context ends c with all `steps` drafted positions inside a reply
        cs = [c for c in range(L - steps + 1) if bool(mask[c:c + steps].all())]
        for c in cs:
            run = 0
            while run < steps and bool(ok[run][c + run]):
                run += 1
            accepted[run] += 1
            for j in range(steps):
                hit[j] += float(ok[j][c + j])
        n += len(cs)
    head.train()
    n = max(n, 1)
    chain = (accepted * torch.arange(steps + 1)).sum().item() / n
    return {"contexts": n, "step_acc": [round(h / n, 4) for h in hit.tolist()],
            "accept_len": round(chain, 4), "tau_chain": round(1 + chain, 4)}


# Checkpoints -------------------------------------------------------------------------

def save_repo_layout(out: Path, head: HassHead, embed: torch.Tensor, target_cfg: dict) -> Path:
    """The HASS/EAGLE repos' layout: pytorch_model.bin (fc.*, layers.0.*, embed_tokens.weight)
    and a LlamaConfig config.json with EAGLE's `bias` key."""
    cfg = head.config
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().cpu().float().contiguous() for k, v in head.head_state_dict().items()}
    sd["embed_tokens.weight"] = embed.cpu().contiguous()
    torch.save(sd, out / "pytorch_model.bin.part")
    (out / "pytorch_model.bin.part").rename(out / "pytorch_model.bin")
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
              "num_hidden_layers": 1, "bias": cfg.fc_bias, "torch_dtype": "float32",
              "tie_word_embeddings": False, **cfg.llama_dict()}
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if k in target_cfg:
            config[k] = target_cfg[k]
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def save_plugin(out: Path, head: HassHead, target_cfg: dict, kind: str, dtype: str,
                info: dict) -> Path:
    from vllm_hass.converters.convert import write_plugin_checkpoint

    weights = {k: v.detach().cpu() for k, v in head.head_state_dict().items()}
    path = write_plugin_checkpoint(out, head.config, weights, kind=kind,
                                   dtype=dtype, target=target_cfg,
                                   source=f"vllm-hass train ({kind})", force=True)
    (path / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    return path


# The loop ------------------------------------------------------------------------------

def fit(*, target: str, data: str, out: str, method: str = "hass", recipe: Recipe | None = None,
        epochs: int = 2, lr: float = 3e-4, warmup: float = 0.02, batch_tokens: int = 2048,
        max_len: int | None = None, eval_samples: int = 32, eval_steps: int = 5,
        seed: int = 0, fc_bias: bool = True, dtype: str = "bfloat16",
        lm_head_dtype: str = "auto", device: str = "cpu",
        repo_out: str | None = None, state: str | None = None, resume: bool = False,
        force: bool = False, log_every: int = 20, save_every: int = 200,
        limit: int | None = None, init: str | None = None, draft_vocab: int = 0,
        draft_vocab_from: str | None = None) -> dict:
    from vllm_hass.converters.convert import target_config
    from vllm_hass.vocab import write_vocab

    r = recipe or Recipe(**METHODS[method])
    tdir, out_p = Path(target).absolute(), Path(out)
    state_p = Path(state) if state else out_p.with_name(out_p.name + ".state.pt")
    if out_p.exists() and not (force or resume):
        raise UserError(f"--out {out_p}: already exists (pass --force to replace it, "
                        "or --resume to continue its run)")
    if resume and not state_p.exists():
        raise UserError(f"--resume: no training state at {state_p}")
    tcfg = target_config(tdir)
    samples = Samples(data)
    if samples.meta.get("eval_only"):
        raise UserError(f"--data {data}: made from evaluation prompts (`train gen --eval-data`); "
                        "it is for `train eval`, never for training")
    if int(samples.meta.get("topk", 0)) < r.topk and r.topk_w > 0:
        raise UserError(f"--topk {r.topk}: {data} stores only the top {samples.meta.get('topk')} "
                        "probabilities (remake it with `train data --topk`)")
    cfg = head_config(tcfg, fc_bias)
    H = samples[0]["hidden"].shape[1]
    if H != cfg.hidden_size:
        raise UserError(f"--data {data}: features have size {H}, "
                        f"target hidden_size is {cfg.hidden_size}")
    embed, lm_f32 = load_shared(tdir)  # lm_f32 [V, H] float32, kept for q's rows below
    lm_head_dtype = resolve_lm_head_dtype(lm_head_dtype, device)
    embed, lm_head = embed.to(device), lm_f32.to(device, DTYPES[lm_head_dtype])

    # Held-out samples: the last files (seed-independent, so two runs compare on the same ones).
    n_all = len(samples) if limit is None else min(limit, len(samples))
    n_eval = min(eval_samples, n_all // 5)
    train_idx = list(range(n_all - n_eval))
    eval_idx = list(range(n_all - n_eval, n_all))
    lengths = [min(samples.lengths[i], max_len or 1 << 30) for i in train_idx]
    plan = [[[train_idx[i] for i in b] for b in batches(lengths, batch_tokens, seed * 1000 + e)]
            for e in range(epochs)]
    total = sum(len(p) for p in plan)
    warm = max(1, int(warmup * total))
    vocab = resolve(draft_vocab, draft_vocab_from, samples, train_idx, eval_idx, tdir,
                    cfg.vocab_size)
    # the draft's logits use these rows only: sliced once here, not per step
    lm_draft = lm_head if vocab is None else lm_head[vocab.ids.to(device)].contiguous()  # [Vd, H]
    vocab_d = None if vocab is None else vocab.to(device)
    # q over the vocabulary from its rows and the stored log-normaliser (data with `lse`)
    lm_draft_f32 = None if vocab is None or not samples.has_lse else \
        lm_f32[vocab.ids].to(device).contiguous()  # [Vd, H] float32

    torch.manual_seed(seed)
    head = HassHead(cfg).float().to(device)
    if init:
        # Continue from a trained head (HASS trains on top of an EAGLE head); fresh optimizer.
        start = load_init(init)
        have, want = dataclasses.asdict(start.config), dataclasses.asdict(cfg)
        diff = sorted(k for k in want if have.get(k) != want[k] and k != "draft_vocab_size")
        if diff:
            raise UserError(f"--init {init}: head config differs from this run's in {diff} "
                            "(expected a head trained for the same target, same --no-fc-bias)")
        head.load_head_state_dict(start.head_state_dict())
    opt = torch.optim.AdamW(head.parameters(), lr=lr, betas=(0.9, 0.95))  # EAGLE's AdamW
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (total - s) / max(1, total - warm))))
    gen = torch.Generator().manual_seed(seed)
    epoch, pos_in_epoch, step, trained_tokens, spent = 0, 0, 0, 0, 0.0
    if resume:
        from vllm_hass.converters.layout import load_plain_pickle

        # weights_only: a state file is a pickle; plain tensors/containers only, never code
        st = load_plain_pickle(state_p, "training state")
        was = st.get("draft_ids")
        if (was is None) != (vocab is None) or (was is not None and not torch.equal(was, vocab.ids)):
            raise UserError(f"--resume: {state_p} was trained with "
                            f"{'no' if was is None else f'a {was.numel()}-token'} draft vocabulary; "
                            "pass the same --draft-vocab/--draft-vocab-from")
        head.load_state_dict(st["head"])
        opt.load_state_dict(st["opt"])
        sched.load_state_dict(st["sched"])
        gen.set_state(st["gen"])
        epoch, pos_in_epoch, step = st["epoch"], st["pos"], st["step"]
        trained_tokens, spent = st["tokens"], st["seconds"]
        print(f"resumed at epoch {epoch} batch {pos_in_epoch} (step {step}/{total})", flush=True)

    settings = {"method": method, "recipe": dataclasses.asdict(r), "epochs": epochs, "lr": lr,
                "warmup": warmup, "batch_tokens": batch_tokens, "max_len": max_len, "seed": seed,
                "fc_bias": fc_bias, "lm_head_dtype": lm_head_dtype,
                "init": str(Path(init).absolute()) if init else None,
                "data": str(Path(data).absolute()), "target": str(tdir),
                "train_samples": len(train_idx), "eval_samples": n_eval,
                "train_tokens_per_epoch": sum(lengths), "steps": total,
                "draft_vocab": None if vocab is None else {"size": vocab.ids.numel(), **vocab.meta}}
    print(json.dumps(settings), flush=True)

    def save_state():
        tmp = state_p.with_name(state_p.name + ".part")
        torch.save({"head": head.state_dict(), "opt": opt.state_dict(),
                    "sched": sched.state_dict(), "gen": gen.get_state(), "epoch": epoch,
                    "pos": pos_in_epoch, "step": step, "tokens": trained_tokens,
                    "seconds": spent, "draft_ids": None if vocab is None else vocab.ids}, tmp)
        tmp.rename(state_p)

    def save_heads(metrics):
        info = {**settings, "trained_tokens": trained_tokens, "train_seconds": round(spent, 1),
                "eval": metrics}
        save_plugin(out_p, head, tcfg, "eagle" if r.steps == 1 and r.topk_w == 0 else "hass",
                    dtype, info)
        if vocab is not None:
            write_vocab(out_p, vocab.ids.numpy(), cfg.vocab_size, vocab.meta)
        if repo_out:
            save_repo_layout(Path(repo_out), head, embed, tcfg)

    head.train()
    metrics: dict = {}
    history: list[float] = []  # mean training loss of each epoch (this process's part)
    window = []
    while epoch < epochs:
        topk_w = r.topk_w if epoch >= r.topk_from_epoch else 0.0
        epoch_loss = []
        for bi in range(pos_in_epoch, len(plan[epoch])):
            t0 = time.time()
            batch = collate([samples[i] for i in plan[epoch][bi]], max_len)
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            opt.zero_grad(set_to_none=True)
            st = batch_forward(head, batch, embed, lm_head, r, topk_w, gen, train=True,
                               vocab=vocab_d, lm_draft=lm_draft, lm_draft_f32=lm_draft_f32)
            torch.nn.utils.clip_grad_value_(head.parameters(), 0.5)  # EAGLE's clip
            opt.step()
            sched.step()
            step, pos_in_epoch = step + 1, bi + 1
            trained_tokens += int(batch["valid"].sum())
            spent += time.time() - t0
            window.append(st)
            epoch_loss.append(st["loss"])
            if step % log_every == 0 or step == total:
                hits = [sum(w["steps"][j]["hit"] for w in window) /
                        max(1, sum(w["steps"][j]["n"] for w in window)) for j in range(r.steps)]
                loss = sum(w["loss"] for w in window) / len(window)
                rate = trained_tokens / max(spent, 1e-9)
                eta = (total - step) * spent / step if step else 0.0
                print(f"epoch {epoch} step {step}/{total} lr {sched.get_last_lr()[0]:.2e} "
                      f"loss {loss:.4f} acc " + " ".join(f"{h:.3f}" for h in hits) +
                      f" | {rate:.0f} tok/s, {spent / 60:.1f} min, eta {eta / 60:.1f} min",
                      flush=True)
                window = []
            if save_every and step % save_every == 0:
                save_state()
        epoch, pos_in_epoch = epoch + 1, 0
        if epoch_loss:
            history.append(sum(epoch_loss) / len(epoch_loss))
        if eval_idx:
            metrics = evaluate(head, samples, eval_idx, embed, lm_draft, eval_steps, max_len,
                               None if vocab_d is None else vocab_d.ids)
            print(f"eval after epoch {epoch}: {json.dumps(metrics)}", flush=True)
        save_state()
        save_heads(metrics)
    print(f"done: {trained_tokens} tokens in {spent / 60:.1f} min -> {out_p}", flush=True)
    return {"out": str(out_p), "eval": metrics, "tokens": trained_tokens, "seconds": spent,
            "history": history, "head": head}


def load_head(path: str | Path) -> HassHead:
    """A trained head from a plugin-format or HASS/EAGLE-layout directory, in float32."""
    from vllm_hass.converters.layout import check_weights, load_checkpoint

    ckpt = load_checkpoint(path)
    weights = {k: v for k, v in ckpt.weights.items() if k not in ("embed_tokens.weight",
                                                                   "lm_head.weight")}
    cfg = ckpt.head_config
    check_weights(weights, cfg, str(path))
    head = HassHead(cfg)
    head.load_head_state_dict({k: v.float() for k, v in weights.items()})
    return head.float().eval()


def load_init(path: str) -> HassHead:
    if not Path(path).exists():
        raise UserError(f"--init {path}: no such head directory")
    try:
        return load_head(path)
    except UserError:
        raise
    except Exception as e:  # a layout the converter rejects: say which file and why, once
        raise UserError(f"--init {path}: not a loadable head ({str(e).splitlines()[0]})") from None


def evaluate_heads(target: str, data: str, heads: list[str], n: int = 32, steps: int = 5,
                   max_len: int | None = None, lm_head_dtype: str = "auto",
                   device: str = "cpu") -> dict[str, dict]:
    from vllm_hass.vocab import read_vocab

    samples = Samples(data)
    embed, lm_head = load_shared(Path(target))
    lm_head_dtype = resolve_lm_head_dtype(lm_head_dtype, device)
    embed, lm_head = embed.to(device), lm_head.to(device, DTYPES[lm_head_dtype])
    idx = list(range(max(0, len(samples) - n), len(samples)))
    out = {}
    for h in heads:  # a head with a draft vocabulary is evaluated as it is served: over it
        ids, _ = read_vocab(h) if (Path(h) / "config.json").exists() else (None, None)
        ids = None if ids is None else ids.to(device)
        rows = lm_head if ids is None else lm_head[ids]
        out[h] = evaluate(load_head(h).to(device), samples, idx, embed, rows, steps, max_len, ids)
    return out
