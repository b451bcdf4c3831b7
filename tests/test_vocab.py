"""The reduced draft vocabulary: building it (order, specials, prefixes), storing it in a
head (d2t/t2d, atomically, weights untouched), the strict checks, hass.json's
`draft_vocab_size`, `inspect`, and `vllm-hass vocab` on a training-data directory."""

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from vllm_hass import cli, fixtures
from vllm_hass.config import check_against_target, parse_spec
from vllm_hass.converters.layout import check_weights, head_config_from
from vllm_hass.errors import UserError
from vllm_hass.vocab import (VOCAB_FILE, build, build_draft_ids, count_tokens, coverage, maps,
                             read_vocab, special_ids, write_vocab)

from helpers import write_head


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return fixtures.make_target(tmp_path_factory.mktemp("voc") / "target", bigram=True)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, target):
    return write_head(tmp_path_factory.mktemp("voc-head") / "head", target,
                      lambda hc: fixtures.random_head_state(hc, seed=1))


@pytest.fixture
def head(tmp_path, pristine):
    """A fresh copy of a converted head for each test."""
    return Path(shutil.copytree(pristine, tmp_path / "head"))


def vocab_size(target):
    return fixtures.target_config(target)["vocab_size"]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_cli(capsys, *argv):
    rc = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def store(head, target, size=40, seed=0):
    V = vocab_size(target)
    counts = np.random.default_rng(seed).integers(0, 100, V)
    ids, meta = build(counts, special_ids(target, V), size, "test counts")
    write_vocab(head, ids, V, meta)
    return ids


# Building ---------------------------------------------------------------------------

def test_specials_first_then_frequency_ties_by_ascending_id():
    counts = np.array([9, 0, 5, 7, 5, 0, 7, 1])  # ids 3/6 tie at 7, 2/4 at 5, 1/5 at 0
    ids = build_draft_ids(counts, special_ids=[5, 1], size=8)
    assert ids.tolist() == [1, 5, 0, 3, 6, 2, 4, 7]
    assert ids.dtype == np.int64
    # a special is kept even when it is the rarest token, and listed once
    assert build_draft_ids(counts, [5, 5, 1], 3).tolist() == [1, 5, 0]


def test_every_prefix_is_the_specials_plus_the_most_frequent():
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 20, 300)  # many ties
    specials = [0, 7, 299]
    full = build_draft_ids(counts, specials, 300)
    assert sorted(full.tolist()) == list(range(300))
    for n in (3, 4, 17, 150, 299):
        ids = build_draft_ids(counts, specials, n)
        assert ids.tolist() == full[:n].tolist()
        rest = ids[3:]
        outside = np.setdiff1d(np.arange(300), ids)
        outside = outside[~np.isin(outside, specials)]
        if rest.size and outside.size:  # nothing left out is more frequent than what is in
            assert counts[rest].min() >= counts[outside].max()


@pytest.mark.parametrize("size", [0, 2, 9, True, 2.0, -1])
def test_build_refuses_sizes_outside_specials_to_vocab(size):
    with pytest.raises(UserError, match=r"between 3 \(the 3 special tokens\) and 8"):
        build_draft_ids(np.ones(8), [0, 1, 2], size)


def test_count_and_coverage():
    counts = count_tokens([[1, 2, 2], np.array([3], dtype=np.int32), []], 5)
    assert counts.tolist() == [0, 1, 2, 1, 0] and counts.dtype == np.int64
    assert coverage([2, 3], [1, 2, 2, 3]) == 0.75
    assert coverage([2], []) == 1.0
    with pytest.raises(UserError, match="token id 5 outside the target's vocabulary"):
        count_tokens([[1, 5]], 5)


def test_special_ids_from_configs_and_tokenizer_files(tmp_path, target):
    assert special_ids(target, vocab_size(target)) == [0, 1]  # <s>, </s>
    d = tmp_path / "t"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, 9],
                                               "pad_token_id": None, "vocab_size": 100}))
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": 11}))
    (d / "tokenizer.json").write_text(json.dumps({
        "added_tokens": [{"id": 50, "content": "<x>", "special": True}, {"id": 500}],
        "model": {"vocab": {"<unk>": 3, "a": 4}}}))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "added_tokens_decoder": {"60": {"content": "<y>"}}, "unk_token": "<unk>"}))
    assert special_ids(d, 100) == [1, 2, 3, 9, 11, 50, 60]  # 500 is outside the vocabulary


# Storing ----------------------------------------------------------------------------

def test_write_read_round_trip_leaves_the_weights_untouched(head, target):
    before = {p.name: digest(p) for p in head.iterdir()}
    cfg_before = json.loads((head / "config.json").read_text())
    V = vocab_size(target)
    ids = store(head, target, size=40)

    assert digest(head / "model.safetensors") == before["model.safetensors"]
    assert digest(head / "hass.json") == before["hass.json"]
    assert sorted(p.name for p in head.iterdir()) == sorted([*before, VOCAB_FILE])  # no temp files
    cfg = json.loads((head / "config.json").read_text())
    assert cfg["draft_vocab_size"] == 40
    assert {k: v for k, v in cfg.items() if k != "draft_vocab_size"} | {"hass": {}} == \
        cfg_before | {"hass": {}}
    dv = cfg["hass"].pop("draft_vocab")
    assert cfg["hass"] == cfg_before["hass"]
    assert dv["file"] == VOCAB_FILE and dv["size"] == 40 and dv["special_tokens"] == 2
    assert dv["source"] == "test counts" and 0 < dv["coverage"] < 1 and dv["tokens_counted"] > 0

    t = load_file(str(head / VOCAB_FILE))
    assert set(t) == {"d2t", "t2d"}
    assert t["d2t"].dtype == torch.int64 and t["d2t"].shape == (40,)
    assert t["t2d"].dtype == torch.bool and t["t2d"].shape == (V,) and int(t["t2d"].sum()) == 40
    assert (torch.arange(40) + t["d2t"]).tolist() == ids.tolist()  # EAGLE-3: target = i + d2t[i]

    got, meta = read_vocab(head)
    assert got.dtype == torch.int64 and got.tolist() == ids.tolist()
    assert meta == dv
    # a head without one reads as none
    assert read_vocab(write_head(head.parent / "plain", target, fixtures.random_head_state)) == (None, None)


@pytest.mark.parametrize("fail", ["vocab file", "config"])
def test_a_failed_write_leaves_the_head_as_it_was(head, target, monkeypatch, fail):
    store(head, target, size=30)  # an existing vocabulary, to be replaced
    before = {p.name: digest(p) for p in head.iterdir()}
    if fail == "vocab file":
        import safetensors.torch

        monkeypatch.setattr(safetensors.torch, "save_file",
                            lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    else:
        real = Path.write_text
        monkeypatch.setattr(Path, "write_text", lambda self, *a, **k: (_ for _ in ()).throw(
            OSError("disk full")) if self.name.startswith(".config.json") else real(self, *a, **k))
    with pytest.raises(OSError, match="disk full"):
        store(head, target, size=50, seed=1)
    assert {p.name: digest(p) for p in head.iterdir()} == before
    assert read_vocab(head)[0].numel() == 30


def test_write_refuses_bad_ids(head, target):
    V = vocab_size(target)
    for ids, msg in (([1, 1, 2], "distinct"), ([1, V], "distinct"), (list(range(V)), "below vocab_size")):
        with pytest.raises(UserError, match=msg):
            write_vocab(head, ids, V, {})
    with pytest.raises(UserError, match="'vocab_size' is"):
        write_vocab(head, [1, 2], V + 1, {})


# The strict check (serving's up-front check and inspect) ---------------------------

def serve_check(head, target):
    check_against_target(parse_spec(str(head / "hass.json")), fixtures.target_config(target))


def rewrite(head, **changes):
    t = load_file(str(head / VOCAB_FILE))
    for k, v in changes.items():
        if v is None:
            del t[k]
        else:
            t[k] = v
    save_file(t, str(head / VOCAB_FILE))


def test_check_accepts_a_stored_vocabulary(head, target):
    store(head, target)
    serve_check(head, target)
    cfg = json.loads((head / "config.json").read_text())
    weights = load_file(str(head / "model.safetensors")) | load_file(str(head / VOCAB_FILE))
    check_weights(weights, head_config_from(cfg, weights, head), str(head))


BAD = {
    "d2t int32": (lambda t: dict(d2t=t["d2t"].int()), r"'d2t' is int32 \[40\], expected int64 \[40\]"),
    "d2t short": (lambda t: dict(d2t=t["d2t"][:39]), r"'d2t' is int64 \[39\], expected int64 \[40\]"),
    "t2d uint8": (lambda t: dict(t2d=t["t2d"].to(torch.uint8)), r"'t2d' is uint8 \[\d+\], expected bool"),
    "t2d short": (lambda t: dict(t2d=t["t2d"][:10]), r"'t2d' is bool \[10\], expected bool \[\d+\]"),
    "extra": (lambda t: dict(foo=torch.zeros(2)), "unexpected tensor 'foo' \\(expected only d2t and t2d\\)"),
    "missing t2d": (lambda t: dict(t2d=None), "missing tensor 't2d'"),
}


@pytest.mark.parametrize("case", BAD)
def test_check_refuses_a_wrong_vocabulary_file_in_one_line(head, target, case):
    store(head, target)
    change, msg = BAD[case]
    rewrite(head, **change(load_file(str(head / VOCAB_FILE))))
    for check in (lambda: serve_check(head, target), lambda: read_vocab(head)):
        with pytest.raises(UserError, match=msg) as e:
            check()
        assert str(e.value).startswith(f"{head / VOCAB_FILE}:") and "\n" not in str(e.value)


def test_check_refuses_file_and_config_that_disagree(head, target):
    store(head, target)
    cfg = json.loads((head / "config.json").read_text())
    (head / "config.json").write_text(json.dumps({**cfg, "draft_vocab_size": None}))
    with pytest.raises(UserError, match=f"{VOCAB_FILE}: present but config.json has no 'draft_vocab_size'"):
        serve_check(head, target)
    (head / "config.json").write_text(json.dumps(cfg))
    (head / VOCAB_FILE).unlink()
    with pytest.raises(UserError, match=f"'draft_vocab_size' is 40 but {VOCAB_FILE} is missing"):
        serve_check(head, target)
    with pytest.raises(UserError, match="is missing"):
        read_vocab(head)


def test_read_refuses_inconsistent_maps(head, target):
    store(head, target)
    t = load_file(str(head / VOCAB_FILE))
    d2t = t["d2t"].clone()
    d2t[1] = d2t[0] - 1  # draft id 1 -> the same target id as draft id 0
    rewrite(head, d2t=d2t)
    with pytest.raises(UserError, match="'d2t' must map draft ids to distinct target ids"):
        read_vocab(head)
    t2d = t["t2d"].clone()
    t2d[(~t["t2d"]).nonzero()[0, 0]] = True  # one more target id marked
    rewrite(head, d2t=t["d2t"], t2d=t2d)
    with pytest.raises(UserError, match="'t2d' does not mark exactly the 40 target ids"):
        read_vocab(head)


def test_weights_check_refuses_vocab_tensors_of_the_wrong_dtype():
    tcfg = fixtures.llama_config_dict(64)
    hc = fixtures.head_config_for(tcfg)
    w = fixtures.random_head_state(hc)
    hc.draft_vocab_size = 8
    d2t, t2d = maps(np.arange(8), 64)
    check_weights({**w, "d2t": d2t, "t2d": t2d}, hc, "weights")
    with pytest.raises(UserError, match=r"'d2t' is float32 \[8\], expected int64 \[8\]"):
        check_weights({**w, "d2t": d2t.float(), "t2d": t2d}, hc, "weights")
    hc.draft_vocab_size = 0
    with pytest.raises(UserError, match="present but config.json has no 'draft_vocab_size'"):
        check_weights({**w, "d2t": d2t, "t2d": t2d}, hc, "weights")


# hass.json's draft_vocab_size --------------------------------------------------------

def spec(head, tree=False, **kw):
    d = {"method": "hass", "model": str(head), **kw}
    if tree:
        d["tree"] = {"depth": 3, "top_k": 4, "total_tokens": 10}
    else:
        d["num_speculative_tokens"] = 3
    return parse_spec(d)


def test_draft_vocab_size_in_hass_json(head, target):
    assert spec(head).draft_vocab_size == 0  # a head without one: the full vocabulary
    assert spec(head, draft_vocab_size=0).draft_vocab_size == 0
    store(head, target, size=40)
    assert spec(head).draft_vocab_size == 40  # absent: all of the stored one
    assert spec(head, draft_vocab_size=0).draft_vocab_size == 0
    assert spec(head, draft_vocab_size=16).draft_vocab_size == 16
    assert spec(head, draft_vocab_size=1).draft_vocab_size == 1  # a chain drafts top-1
    assert spec(head, tree=True, draft_vocab_size=4).draft_vocab_size == 4


BAD_SIZES = [
    (41, r"'draft_vocab_size' must be <= 40 \(the vocabulary stored with .*\) or 0, got 41"),
    (-1, r"'draft_vocab_size' must be an integer >= 0 \(0 = full vocabulary\), got -1"),
    (True, r"'draft_vocab_size' must be an integer >= 0 .*got True"),
    ("16", r"'draft_vocab_size' must be an integer >= 0 .*got '16'"),
    (16.0, r"'draft_vocab_size' must be an integer >= 0 .*got 16.0"),
]


@pytest.mark.parametrize("value,msg", BAD_SIZES, ids=[repr(v) for v, _ in BAD_SIZES])
def test_bad_draft_vocab_size_is_one_line(head, target, value, msg):
    store(head, target, size=40)
    with pytest.raises(UserError, match=msg) as e:
        spec(head, draft_vocab_size=value)
    assert "\n" not in str(e.value)


def test_draft_vocab_size_below_top_k_or_without_a_vocabulary(head, target):
    with pytest.raises(UserError, match=r"'draft_vocab_size' is 8 but .* has no draft vocabulary "
                       r"\(build one with `vllm-hass vocab`, or use 0"):
        spec(head, draft_vocab_size=8)
    store(head, target, size=40)
    with pytest.raises(UserError, match=r"'draft_vocab_size' must be >= the tree's top_k \(4\) or 0, got 3"):
        spec(head, tree=True, draft_vocab_size=3)


# inspect ------------------------------------------------------------------------------

def test_inspect_shows_the_vocabulary(head, target, capsys):
    rc, out, _ = run_cli(capsys, "inspect", head)
    assert rc == 0 and "draft vocab none (drafts over the full" in out
    store(head, target, size=40)
    V = vocab_size(target)
    rc, out, _ = run_cli(capsys, "inspect", head)
    cov = json.loads((head / "config.json").read_text())["hass"]["draft_vocab"]["coverage"]
    assert rc == 0
    assert f"draft vocab 40 of {V} tokens (2 special); coverage {100 * cov:.2f}% of" in out
    rc, out, _ = run_cli(capsys, "inspect", head, "--json")
    info = json.loads(out)
    assert info["draft_vocab"]["size"] == 40 and info["draft_vocab"]["coverage"] == cov
    assert info["problem"] is None
    rewrite(head, d2t=torch.zeros(40, dtype=torch.int32))
    rc, out, _ = run_cli(capsys, "inspect", head)
    assert rc == 1 and f"PROBLEM: {head / VOCAB_FILE}: 'd2t' is int32 [40]" in out


# `vllm-hass vocab` on a training-data directory ------------------------------------------

def fake_data(d: Path, samples):
    """A `train data` directory holding only what counting reads: (ids, mask) pairs."""
    d.mkdir()
    (d / "meta.json").write_text(json.dumps({"topk": 1}))
    for n, (ids, mask) in enumerate(samples):
        save_file({"input_ids": torch.tensor(ids, dtype=torch.int32),
                   "loss_mask": torch.tensor(mask, dtype=torch.uint8)}, str(d / f"{n:07d}.safetensors"))
    return d


@pytest.fixture
def data(tmp_path):
    # prompts use 100..104, replies: 10 x7, 11 x5, 12 x3, 13 x1; the last record replies 14, 10
    s = [([100, 101, 10, 10, 10, 11, 11], [0, 0, 1, 1, 1, 1, 1]),
         ([102, 103, 104, 10, 11, 12, 12], [0, 0, 0, 1, 1, 1, 1]),
         ([100, 10, 10, 10, 11, 11, 12, 13], [0, 1, 1, 1, 1, 1, 1, 1]),
         ([100, 14, 10], [0, 1, 1])]
    return fake_data(tmp_path / "data", s)


def test_vocab_cli_counts_the_assistant_tokens(head, target, data, capsys):
    rc, out, err = run_cli(capsys, "vocab", "--target", target, "--data", data, "--size", 5,
                           "--out", head, "--holdout", "0.25")
    assert rc == 0, err
    ids, meta = read_vocab(head)
    assert ids.tolist() == [0, 1, 10, 11, 12]  # specials, then by frequency in the first 3 records
    assert meta["tokens_counted"] == 16 and meta["coverage"] == pytest.approx(15 / 16)
    assert meta["holdout_tokens"] == 2 and meta["holdout_coverage"] == pytest.approx(0.5)
    assert "assistant tokens of 3 records" in meta["source"]
    assert "coverage: 93.75% of the counted tokens; held-out 50.00% of 2 tokens" in out
    serve_check(head, target)

    # replacing needs --force; --with-prompts counts the prompts too: 100 x3 ties 12 x3
    # (all 4 records now), the lower id first, and 13/14 (x1) lose to them
    rc, _, err = run_cli(capsys, "vocab", "--target", target, "--data", data, "--size", 5, "--out", head)
    assert rc == 2 and "already has a draft vocabulary of 5 tokens (pass --force" in err
    rc, _, err = run_cli(capsys, "vocab", "--target", target, "--data", data, "--size", 6,
                         "--out", head, "--with-prompts", "--force")
    assert rc == 0, err
    assert read_vocab(head)[0].tolist() == [0, 1, 10, 11, 12, 100]


def test_vocab_cli_bad_input(head, target, data, tmp_path, capsys):
    V = vocab_size(target)
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    base = dict(target=target, data=data, size=5, out=head)
    cases = [
        (dict(data=tmp_path / "nope"), "--data .*nope: neither a training-data directory"),
        (dict(data="wikitext"), "--data wikitext: neither a training-data directory .*mtbench, "
                                "humaneval, sharegpt or FILE.jsonl"),
        (dict(data=tmp_path / "p.jsonl"), "--data .*p.jsonl: no such file"),
        (dict(data=tmp_path), "no meta.json \\(make it with `vllm-hass train data`\\)"),
        (dict(size=0), f"--size 0: expected 2 .. {V - 1}"),
        (dict(size=1), f"--size 1: expected 2 .. {V - 1} \\(at least the 2 special tokens"),
        (dict(size=V), f"--size {V}: expected 2 .. {V - 1}"),
        (dict(size=V + 5), f"--size {V + 5}: expected"),
        (dict(out=tmp_path / "missing"), "--out .*missing: no such head directory"),
        (dict(out=plain), "'architectures' is \\['LlamaForCausalLM'\\], expected \\[\"EagleHassLlamaForCausalLM\"\\]"),
        (dict(target=tmp_path / "nt"), "--target .*nt: no such directory"),
    ]
    for change, msg in cases:
        a = {**base, **change}
        argv = ["vocab"] + [x for k, v in a.items() for x in (f"--{k}", v)]
        rc, _, err = run_cli(capsys, *argv)
        assert rc == 2, (change, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        import re

        assert re.search(msg, err), (msg, err)
    for extra, msg in ((["--generate-tokens", "8"], "--generate-tokens/--num-prompts: only with a prompt dataset"),
                       (["--holdout", "1"], "--holdout 1.0: expected a fraction in \\[0, 1\\)"),
                       (["--holdout", "0.9"], "--holdout 0.9: leaves none of the 4 records")):
        rc, _, err = run_cli(capsys, "vocab", "--target", target, "--data", data, "--size", 5,
                             "--out", head, *extra)
        assert rc == 2 and msg.replace("\\", "") in err.replace("\\", ""), err
    assert read_vocab(head) == (None, None)  # nothing was written by any of them


@pytest.mark.engine
def test_vocab_cli_counts_the_targets_greedy_outputs(head, target, tmp_path, capsys):
    """The prompt-dataset path: vLLM writes the target's greedy replies, they are counted."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    texts = ["The quick brown fox", "def add(a, b):", "Once upon a time", "for i in range"]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    rc, out, err = run_cli(capsys, "vocab", "--target", target, "--data", tmp_path / "p.jsonl",
                           "--size", 12, "--out", head, "--generate-tokens", 6, "--holdout", "0.25")
    assert rc == 0, err
    ids, meta = read_vocab(head)
    # the same greedy tokens from transformers (a bigram target: each follows the last)
    tok = AutoTokenizer.from_pretrained(str(target))
    model = AutoModelForCausalLM.from_pretrained(str(target), dtype=torch.float32)
    outs = []
    for t in texts:
        x = torch.tensor([tok(t)["input_ids"]])
        g = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=6, do_sample=False,
                           eos_token_id=1, pad_token_id=0)
        o = g[0, x.shape[1]:].tolist()
        outs.append(o[:o.index(1) + 1] if 1 in o else o)  # vLLM stops at (and keeps) </s>
    V = vocab_size(target)
    counts = count_tokens(outs[:3], V)
    want, _ = build(counts, [0, 1], 12, "")
    assert ids.tolist() == want.tolist()
    assert meta["tokens_counted"] == counts.sum() and meta["holdout_tokens"] == len(outs[3])
    assert "greedy outputs of" in meta["source"] and "3 prompts, up to 6 tokens" in meta["source"]
