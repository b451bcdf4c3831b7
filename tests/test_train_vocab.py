"""`train fit --draft-vocab`: the losses over a draft vocabulary (a hand computation,
outside mass included), the trainer's equivalence with the full vocabulary when the
vocabulary is everything, and a tiny run whose saved head carries its vocabulary."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from vllm_hass.config import check_against_target, parse_spec
from vllm_hass.errors import UserError
from vllm_hass.fixtures import make_target, target_config
from vllm_hass.train.data import Samples, collate, generate
from vllm_hass.train.draft_vocab import DraftVocab
from vllm_hass.train.fit import Recipe, batch_forward, evaluate_heads, fit, head_config
from vllm_hass.train.losses import in_vocab, soft_ce, to_draft, top_k, topk_loss
from vllm_hass.vocab import build, count_tokens, read_vocab, special_ids, write_vocab

from test_train_fit import CHATML, synthetic_conversations


def test_losses_over_a_draft_vocabulary_by_hand():
    """V = 5, D = (3, 0, 2) in that order; the target puts 0.3 outside D (tokens 1, 4)."""
    q = torch.tensor([[0.2, 0.25, 0.1, 0.4, 0.05]])
    draft_ids = torch.tensor([3, 0, 2])
    index = torch.tensor([1, -1, 2, 0, -1])
    z = torch.tensor([[1.0, -0.5, 0.25]])  # the draft's logits over D
    logp = z.log_softmax(-1)
    p = [math.exp(v) / sum(math.exp(u) for u in (1.0, -0.5, 0.25)) for v in (1.0, -0.5, 0.25)]
    one = torch.ones(1)

    qd = in_vocab(q, draft_ids)
    assert qd[0].tolist() == pytest.approx([0.4, 0.2, 0.1])  # not renormalised: sums to m = 0.7
    ce = soft_ce(logp, qd, one).item()
    assert ce == pytest.approx(-(0.4 * math.log(p[0]) + 0.2 * math.log(p[1]) + 0.1 * math.log(p[2])))
    # = the in-vocabulary mass times the CE against the target renormalised over D
    m = 0.7
    assert ce == pytest.approx(m * -sum(qv / m * math.log(pv) for qv, pv in zip((0.4, 0.2, 0.1), p)))

    # Top-3 of q: tokens 3, 1, 0 -> 1 is outside D and drops out of the sum
    ids, qk = top_k(q, 3)
    assert ids.tolist() == [[3, 1, 0]]
    d_ids, d_p = to_draft(ids, qk, index)
    assert d_ids.tolist() == [[0, 0, 1]] and d_p[0].tolist() == pytest.approx([0.4, 0.0, 0.2])
    tk = topk_loss(logp, d_ids, d_p, one).item()
    assert tk == pytest.approx(-(0.4 * math.log(p[0]) + 0.2 * math.log(p[1])))

    # a position whose mass is all outside contributes nothing (and nothing is NaN)
    q_out = torch.tensor([[0.0, 0.6, 0.0, 0.0, 0.4]])
    assert soft_ce(logp, in_vocab(q_out, draft_ids), one).item() == 0.0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("fitvocab")
    target = make_target(root / "target", seed=0, hidden_size=64, intermediate_size=128,
                         num_heads=2, num_kv_heads=1)
    w = load_file(str(target / "model.safetensors"))
    w["lm_head.weight"] *= 25  # a sharper target (see test_train_fit)
    save_file(w, str(target / "model.safetensors"))
    (root / "chatml.jinja").write_text(CHATML)
    convs = synthetic_conversations(12)
    (root / "convs.jsonl").write_text("".join(json.dumps(c) + "\n" for c in convs))
    generate(target, root / "convs.jsonl", root / "data", max_len=96, topk=10,
             chat_template=str(root / "chatml.jinja"), progress=False)
    return root, target


def run(root, target, name, **kw):
    args = dict(target=str(target), data=str(root / "data"), out=str(root / name), epochs=1,
                lr=3e-3, batch_tokens=512, eval_samples=2, eval_steps=2, dtype="float32",
                lm_head_dtype="float32", log_every=1000, force=True)
    return fit(**{**args, **kw})


def test_a_vocabulary_of_every_token_trains_exactly_like_the_full_one(tiny):
    """The same losses and gradients when D is all V tokens (in any order): the vocabulary
    path only renames columns."""
    from vllm_hass.head import HassHead
    from vllm_hass.train.fit import load_shared

    root, target = tiny
    cfg = head_config(target_config(target))
    embed, lm_head = load_shared(target)
    batch = collate([Samples(root / "data")[i] for i in range(3)])
    perm = torch.randperm(cfg.vocab_size, generator=torch.Generator().manual_seed(0))
    vocab = DraftVocab.from_ids(perm, cfg.vocab_size, {})
    r = Recipe(steps=2)
    grads, stats = [], []
    for v in (None, vocab):
        torch.manual_seed(0)
        head = HassHead(cfg).float()
        rows = None if v is None else lm_head[v.ids]
        stats.append(batch_forward(head, batch, embed, lm_head, r, 1.0, None, True, v, rows))
        grads.append({n: p.grad.clone() for n, p in head.named_parameters()})
    assert stats[0]["loss"] == pytest.approx(stats[1]["loss"], rel=1e-5)
    for a, b in zip(stats[0]["steps"], stats[1]["steps"]):
        assert a["hit"] == b["hit"] and a["topk"] == pytest.approx(b["topk"], rel=1e-5)
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-6)


def test_fit_with_a_draft_vocabulary_saves_it_with_the_head(tiny):
    root, target = tiny
    V = target_config(target)["vocab_size"]
    res = run(root, target, "dv", draft_vocab=48)
    out = root / "dv"
    ids, meta = read_vocab(out)
    # built from the training samples' assistant tokens (the held-out ones are the last 2)
    samples = Samples(root / "data")
    n_train = len(samples) - 2
    counts = count_tokens((samples.tokens(i).numpy() for i in range(n_train)), V)
    want, _ = build(counts, special_ids(target, V), 48, "")
    assert ids.tolist() == want.tolist()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["draft_vocab_size"] == 48 and cfg["hass"]["draft_vocab"]["size"] == 48
    assert meta["tokens_counted"] == counts.sum() and meta["special_tokens"] == 2
    assert meta["holdout_tokens"] > 0 and 0 < meta["holdout_coverage"] <= 1
    assert json.loads((out / "training.json").read_text())["draft_vocab"]["size"] == 48
    check_against_target(parse_spec(str(out / "hass.json")), target_config(target))
    assert res["history"] and math.isfinite(res["history"][0])
    # `train eval` evaluates it over its vocabulary: drafts are target ids again
    m = evaluate_heads(str(target), str(root / "data"), [str(out)], n=2, steps=2,
                       lm_head_dtype="float32")[str(out)]
    assert m["contexts"] > 0 and 0 <= m["step_acc"][0] <= 1

    # a prefix of a stored vocabulary, through the CLI
    p = subprocess.run([sys.executable, "-m", "vllm_hass.train", "fit", "--target", str(target),
                        "--data", str(root / "data"), "--out", str(root / "dv16"), "--epochs", "1",
                        "--draft-vocab", "16", "--draft-vocab-from", str(out), "--dtype", "float32",
                        "--lm-head-dtype", "float32", "--eval-samples", "2", "--force"],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    ids16, meta16 = read_vocab(root / "dv16")
    assert ids16.tolist() == ids[:16].tolist()
    assert f"the first 16 of the 48 in {out}" in meta16["source"]


def test_fit_vocabulary_errors(tiny, tmp_path):
    root, target = tiny
    V = target_config(target)["vocab_size"]
    cases = [
        (dict(draft_vocab=-1), "--draft-vocab -1: expected 0 \\(the full vocabulary\\) or a size below"),
        (dict(draft_vocab=V), f"--draft-vocab {V}: expected 0"),
        (dict(draft_vocab=1), "--draft-vocab 1: below the 2 special tokens"),
        (dict(draft_vocab_from=str(tmp_path / "nope")), "--draft-vocab-from .*nope: no such head directory"),
        (dict(draft_vocab_from=str(root / "data")), "--draft-vocab-from .*data: .*config.json"),
    ]
    for kw, msg in cases:
        with pytest.raises(UserError, match=msg):
            run(root, target, "bad", **kw)
    # a head without a vocabulary, and a prefix longer than the stored vocabulary
    run(root, target, "plain", limit=4, eval_samples=0)
    with pytest.raises(UserError, match="--draft-vocab-from .*plain: the head has no draft vocabulary"):
        run(root, target, "bad", draft_vocab_from=str(root / "plain"))
    write_vocab(root / "plain", np.arange(20), V, {"special_tokens": 2})
    with pytest.raises(UserError, match="--draft-vocab 21: must be <= the 20 tokens stored in"):
        run(root, target, "bad", draft_vocab=21, draft_vocab_from=str(root / "plain"))


def test_resume_needs_the_same_vocabulary(tiny):
    root, target = tiny
    run(root, target, "r", draft_vocab=32, limit=4, eval_samples=0)
    with pytest.raises(UserError, match="--resume: .* was trained with a 32-token draft vocabulary"):
        run(root, target, "r", limit=4, eval_samples=0, resume=True, force=False)
