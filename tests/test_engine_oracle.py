"""Plugin = oracle, step by step: at T = 0 every tree the plugin drafts inside vLLM (tokens
and parents) equals the pure-torch EAGLE-2 reference's (vllm_hass.bench.oracle, float64),
and so does the acceptance at every depth.

The target attends sharply and the heads' drafts depend on their attention, RoPE positions,
the target hidden states they are fed and their optional modules (fixtures.attentive_head_state):
a wrong draft mask, scratch slot, position, hidden-state gather, a dropped fc.bias or norm
changes the drafted trees, which this test sees even where it does not change tau.
"""

import pytest
import torch
from vllm import SamplingParams

from drafthooks import RecordDrafts
from helpers import free_llm, make_llm, prompts, spec_metrics, token_ids

pytestmark = pytest.mark.engine

MAX_TOKENS = 32
SHAPES = {"chain": (3, 1, 4), "tree": (4, 3, 10)}


def oracle_trees(target, head, ps, shape, draft_vocab_size=0):
    """Per prompt: the oracle's trees ((tokens, parents) without the root) and its output.
    shape: a TreeShape, or shape(prompt index, tree index) -> TreeShape."""
    from vllm_hass.bench import oracle as O

    o = O.Oracle.load(target, head, dtype=torch.float64, draft_vocab_size=draft_vocab_size)
    out = []
    for i, p in enumerate(ps):
        s = O.Session(o, p)
        trees = []
        while len(s.seq) - len(p) < MAX_TOKENS:
            tree = s.drafter.draft(s.seq, s.feats, shape(i, len(trees)) if callable(shape) else shape)
            trees.append((tree.tokens[1:], tree.parents[1:], tree.depths[1:]))
            n = len(s.seq) - 1
            h, logits = s.target.forward(tree.tokens, [n + d for d in tree.depths],
                                         O.tree_mask(tree.parents))
            path = O.accept(tree, logits.argmax(-1).tolist())
            s.target.keep(n, path)
            s.feats = torch.cat((s.feats, h[path]))
            s.seq += [tree.tokens[i] for i in path[1:]] + [int(logits[path[-1]].argmax())]
            trees[-1] += (len(path) - 1,)
        out.append((trees, s.seq[len(p):][:MAX_TOKENS]))
    return out


VOCAB_STORED, VOCAB_USED = 200, 120  # of the fixture's 475 tokens; hass.json takes a prefix


@pytest.fixture(scope="module")
def vocab_head(tmp_path_factory, sharp_target, attentive_head):
    """attentive_head with a draft vocabulary: the tokens the target emits most on other
    prompts than the test's, so some drafts fall outside it and the trees differ from the
    full vocabulary's."""
    import shutil

    from transformers import AutoModelForCausalLM

    from vllm_hass import vocab
    from vllm_hass.bench.oracle import greedy

    head = tmp_path_factory.mktemp("vocab") / "head"
    shutil.copytree(attentive_head, head)
    model = AutoModelForCausalLM.from_pretrained(str(sharp_target), dtype=torch.float32)
    outs = [greedy(model, p["prompt_token_ids"], 24) for p in prompts(12, length=(3, 30), seed=11)]
    V = model.config.vocab_size
    ids = vocab.build_draft_ids(vocab.count_tokens(outs, V), [0, 1], VOCAB_STORED)
    vocab.write_vocab(head, ids, V, {"source": "test", "special_tokens": 2})
    return head


@pytest.mark.parametrize("mode", ["chain", "tree"])
@pytest.mark.parametrize("which", ["plain", "fc_bias+norms", "draft vocab"])
def test_plugin_drafts_the_oracles_trees(sharp_target, attentive_head, attentive_full_head,
                                         monkeypatch, mode, which, request):
    from vllm_hass.bench.oracle import TreeShape

    head = {"plain": attentive_head, "fc_bias+norms": attentive_full_head}.get(which)
    vocab = VOCAB_USED if which == "draft vocab" else 0
    if which == "draft vocab":
        head = request.getfixturevalue("vocab_head")
    depth, top_k, total = SHAPES[mode]
    spec = ({"method": "hass", "model": str(head), "num_speculative_tokens": depth}
            if mode == "chain" else
            {"method": "hass", "model": str(head),
             "tree": {"depth": depth, "top_k": top_k, "total_tokens": total}})
    spec["draft_vocab_size"] = vocab
    ps = [p["prompt_token_ids"] for p in prompts(6, length=(3, 30), seed=3)]
    rec = RecordDrafts().install(monkeypatch)
    llm = make_llm(sharp_target, spec)
    got = token_ids(llm.generate([{"prompt_token_ids": p} for p in ps],
                                 SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True),
                                 use_tqdm=False))
    m = spec_metrics(llm)
    free_llm(llm)

    want = oracle_trees(sharp_target, head, ps, TreeShape(depth, top_k, total), vocab)
    steps, per_depth = 0, [0] * depth
    for p, out, (trees, ref_out) in zip(ps, got, want):
        assert out == ref_out
        mine = rec.trees[tuple(p)]
        # the plugin also drafts once more in the step a request finishes (never verified)
        assert len(mine) == len(trees) + 1
        for i, ((tok, par), (rtok, rpar, _, _)) in enumerate(zip(mine, trees)):
            assert (tok, par) == (list(rtok), list(rpar)), f"prompt {p}, step {i}"
        steps += len(trees)
        for *_, accepted in trees:
            for d in range(accepted):
                per_depth[d] += 1
    assert m["num_drafts"] == steps
    assert m["num_accepted_tokens_per_pos"][:depth] == per_depth
    assert sum(per_depth) > 0  # some drafts were accepted, some rejected
    assert per_depth[0] < steps
    if vocab:
        from vllm_hass.vocab import read_vocab

        inside = set(read_vocab(head)[0][:vocab].tolist())
        drafted = {t for trees in rec.trees.values() for tok, _ in trees for t in tok}
        assert drafted <= inside  # drafts come from the prefix hass.json chose


AUTO_SCHEDULE = ["4/3/10", "2/2/4", "6/10/60", "1/1/2", "3/1/4", "2/4/8"]


def test_auto_drafts_the_oracles_tree_of_each_steps_shape(sharp_target, attentive_head, monkeypatch):
    """"tree": "auto" with a forced schedule (a different shape every step, all within the
    bound 6/10/60): one request at a time, each step's tree equals the oracle's tree of
    that step's shape, and so does the output."""
    from vllm_hass.bench.oracle import TreeShape

    monkeypatch.setenv("VLLM_HASS_AUTO_SCHEDULE", ",".join(AUTO_SCHEDULE))
    ps = [p["prompt_token_ids"] for p in prompts(4, length=(3, 30), seed=5)]
    rec = RecordDrafts().install(monkeypatch)
    llm = make_llm(sharp_target, {"method": "hass", "model": str(attentive_head), "tree": "auto"},
                   max_num_seqs=1)
    got = token_ids(llm.generate([{"prompt_token_ids": p} for p in ps],
                                 SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True),
                                 use_tqdm=False))
    free_llm(llm)
    # one request at a time, one tree per engine step (its last one never verified): the
    # engine step of prompt i's tree j is the trees drafted before it
    offsets = [sum(len(rec.trees[tuple(q)]) for q in ps[:i]) for i in range(len(ps))]

    def shape(i, j):
        return TreeShape(*map(int, AUTO_SCHEDULE[(offsets[i] + j) % len(AUTO_SCHEDULE)].split("/")))

    want = oracle_trees(sharp_target, attentive_head, ps, shape)
    sizes = set()
    for i, (p, out, (trees, ref_out)) in enumerate(zip(ps, got, want)):
        assert out == ref_out
        mine = rec.trees[tuple(p)]
        assert len(mine) == len(trees) + 1
        for j, ((tok, par), (rtok, rpar, _, _)) in enumerate(zip(mine, trees)):
            assert (tok, par) == (list(rtok), list(rpar)), f"prompt {i}, tree {j}, shape {shape(i, j)}"
            sizes.add(len(tok))
    assert {9, 3, 59, 1, 7} <= sizes, sizes
