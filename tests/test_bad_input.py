"""Issue 16, item 5: bad input, one case each. Every case is either served correctly or
refused with one line (UserError) naming the file or field and what was expected; what
the user gave is byte-identical afterwards and nothing is half-written.

Cases test_converter.py and test_spec_config.py already cover are not repeated here (the
converter: wrong hidden size, missing/extra weight, fc shape, malformed config.json, no
SRC, no weights, existing OUT, RoPE mismatch; hass.json: see test_spec_config.BAD).
Request-level options with trees are in test_bad_requests.py.
"""

import hashlib
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vllm_hass import fixtures
from vllm_hass.config import parse_spec
from vllm_hass.converters.convert import convert
from vllm_hass.converters.layout import load_checkpoint
from vllm_hass.errors import UserError

from helpers import write_head

SHAPE = dict(hidden_size=64, intermediate_size=128, num_heads=2, num_kv_heads=1)
VOCAB = 96


def digest(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return fixtures.make_target(tmp_path_factory.mktemp("bad") / "target", with_tokenizer=False,
                                vocab_size=VOCAB, **SHAPE)


class Marker:
    """Unpickling this runs `touch PATH`: what a malicious .bin does."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def make_src(d: Path, target: Path, *, fmt="safetensors", edit=None, cfg_edit=None, seed=0):
    """A head as the HASS/EAGLE repos save it; `edit(sd)` / `cfg_edit(cfg)` break it."""
    tcfg = fixtures.target_config(target)
    sd = fixtures.random_head_state(fixtures.head_config_for(tcfg, fc_bias=True), seed=seed)
    if edit:
        edit(sd)
    cfg = {k: tcfg[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                "num_key_value_heads", "vocab_size", "rope_theta")}
    cfg.update(architectures=["LlamaForCausalLM"], bias=True)
    if cfg_edit:
        cfg_edit(cfg)
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(cfg))
    if fmt == "safetensors":
        save_file(sd, str(d / "model.safetensors"))
    else:
        torch.save(sd, d / "pytorch_model.bin")
    return d


def sharded(d: Path, target: Path, shard_name):
    """Two shards; the index names the second one `shard_name`."""
    make_src(d, target)
    sd = load_file(str(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    names = sorted(sd)
    save_file({k: sd[k] for k in names[:4]}, str(d / "model-00001-of-00002.safetensors"))
    save_file({k: sd[k] for k in names[4:]}, str(d / "model-00002-of-00002.safetensors"))
    wm = {k: "model-00001-of-00002.safetensors" for k in names[:4]}
    wm.update({k: shard_name for k in names[4:]})
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    return d


def set_(key, value):
    return lambda x: x.__setitem__(key, value)


def truncate(n):
    def f(d):
        p = next(d.glob("*.safetensors"), None) or d / "pytorch_model.bin"
        b = p.read_bytes()
        p.write_bytes(b[:n(len(b))])
    return f


def evil_bin(d: Path, obj):
    with open(d / "pytorch_model.bin", "wb") as f:
        pickle.dump(obj, f)


# name -> (setup(root, src, target) -> (src, target, kwargs), expected message | None = served)
def _case_sharded(name):
    return lambda root, src, target: (sharded(src, target, name), target, {})


def _plain(fmt="safetensors", post=None, **kw):
    def setup(root, src, target):
        make_src(src, target, fmt=fmt, **kw)
        if post:
            post(src)
        return src, target, {}
    return setup


def _evil_torch_save(root, src, target):
    make_src(src, target, fmt="bin")
    torch.save({"fc.weight": Marker(root / "PWNED")}, src / "pytorch_model.bin")
    return src, target, {}


def _evil_raw_pickle(root, src, target):
    make_src(src, target, fmt="bin")
    evil_bin(src, {"fc.weight": Marker(root / "PWNED")})
    return src, target, {}


def _evil_target_bin(root, src, target):
    """The head's own embedding is compared with the target's, read from its .bin."""
    tgt = root / "evil_target"
    tgt.mkdir()
    (tgt / "config.json").write_text((target / "config.json").read_text())
    torch.save({"model.embed_tokens.weight": Marker(root / "PWNED")}, tgt / "pytorch_model.bin")
    make_src(src, target, edit=set_("embed_tokens.weight", torch.randn(VOCAB, 64)))
    return src, tgt, {}


def _not_a_state_dict(root, src, target):
    make_src(src, target, fmt="bin")
    torch.save([torch.zeros(2)], src / "pytorch_model.bin")
    return src, target, {}


def _target_not_json(root, src, target):
    tgt = root / "t"
    tgt.mkdir()
    (tgt / "config.json").write_text("hidden_size: 64\n")
    return make_src(src, target), tgt, {}


def _out_under_a_file(root, src, target):
    (root / "afile").write_text("x")
    return make_src(src, target), target, {"out": root / "afile" / "out"}


def _spec_tokens(n):
    return lambda root, src, target: (make_src(src, target), target, {"num_speculative_tokens": n})


def _fc(shape):
    return _plain(edit=set_("fc.weight", torch.zeros(*shape)))


def _nan(sd):
    sd["fc.weight"][3, 5] = float("nan")


def _inf(sd):
    sd["layers.0.post_attention_layernorm.weight"][0] = float("-inf")


def _own(name, seed):
    g = torch.Generator().manual_seed(seed)
    return lambda sd: sd.__setitem__(name, torch.randn(VOCAB, 64, generator=g))


def _tied_differ(sd):
    _own("embed_tokens.weight", 1)(sd)
    _own("lm_head.weight", 2)(sd)


CONVERTER = {
    "truncated_safetensors": (_plain(post=truncate(lambda n: n // 2)),
                              "model.safetensors: cannot load weights (SafetensorError"),
    "truncated_safetensors_header": (_plain(post=truncate(lambda n: 5)), "header too small"),
    "empty_safetensors": (_plain(post=truncate(lambda n: 0)), "model.safetensors: cannot load weights"),
    "truncated_bin": (_plain(fmt="bin", post=truncate(lambda n: n - 100)),
                      "pytorch_model.bin: cannot load weights"),
    "index_names_missing_shard": (_case_sharded("model-00009-of-00009.safetensors"),
                                  "shard 'model-00009-of-00009.safetensors' listed in weight_map does not exist"),
    "index_shard_absolute_path": (_case_sharded("/etc/hostname"),
                                  "weight_map names shard '/etc/hostname'; expected a file name inside"),
    "index_shard_dotdot": (_case_sharded("../target/model.safetensors"),
                           "weight_map names shard '../target/model.safetensors'; expected a file name inside"),
    "index_shard_not_a_string": (_case_sharded(7), "weight_map names shard 7"),
    "index_empty_weight_map": (_plain(post=lambda d: (d / "model.safetensors.index.json").write_text(
        '{"weight_map": {}}')), "field 'weight_map' must be a non-empty object"),
    "nan_weight": (_plain(edit=_nan), "weight 'fc.weight' has 1 NaN/Inf values, expected finite values"),
    "inf_weight": (_plain(edit=_inf), "weight 'layers.0.post_attention_layernorm.weight' has 1 NaN/Inf"),
    "int_weights": (_plain(edit=lambda sd: sd.__setitem__("fc.weight", sd["fc.weight"].to(torch.int32))),
                    "weight 'fc.weight' has dtype int32, expected a floating-point dtype"),
    "bool_weights": (_plain(edit=lambda sd: sd.__setitem__("fc.bias", sd["fc.bias"] > 0)),
                     "weight 'fc.bias' has dtype bool, expected a floating-point dtype"),
    "float64_weights_served": (_plain(edit=lambda sd: sd.update({k: v.double() for k, v in sd.items()})),
                               None),
    "fc_transposed": (_fc((128, 64)), "weight 'fc.weight' has shape [128, 64], expected [64, 128]"),
    "fc_bias_wrong_shape": (_plain(edit=set_("fc.bias", torch.zeros(128))),
                            "weight 'fc.bias' has shape [128], expected [64]"),
    "tied_config_but_different_lm_head": (
        _plain(edit=_tied_differ, cfg_edit=set_("tie_word_embeddings", True)),
        "'tie_word_embeddings' is true but lm_head.weight differs from embed_tokens.weight"),
    "tied_config_own_embedding_only_served": (
        _plain(edit=_own("embed_tokens.weight", 1), cfg_edit=set_("tie_word_embeddings", True)), None),
    "config_binary": (_plain(post=lambda d: (d / "config.json").write_bytes(b"\x80\x04\x95garbage")),
                      "config.json: not a JSON text file (not UTF-8)"),
    "config_a_list": (_plain(post=lambda d: (d / "config.json").write_text("[64, 128]")),
                      "config.json: expected a JSON object, got list"),
    "config_hidden_size_string": (_plain(cfg_edit=set_("hidden_size", "64")),
                                  "field 'hidden_size' must be a positive integer, got '64'"),
    "config_zero_heads": (_plain(cfg_edit=set_("num_attention_heads", 0)),
                          "field 'num_attention_heads' must be a positive integer, got 0"),
    "config_vocab_float": (_plain(cfg_edit=set_("vocab_size", 96.0)),
                           "field 'vocab_size' must be a positive integer, got 96.0"),
    "config_missing_vocab_size": (_plain(cfg_edit=lambda c: c.pop("vocab_size")),
                                  "missing field 'vocab_size'"),
    "bin_pickle_runs_code_torch_save": (_evil_torch_save,
                                        "refused: the pickle holds objects other than tensors"),
    "bin_pickle_runs_code_raw": (_evil_raw_pickle, "refused: the pickle holds objects other than tensors"),
    "target_bin_pickle_runs_code": (_evil_target_bin, "refused: the pickle holds objects other than tensors"),
    "bin_not_a_state_dict": (_not_a_state_dict, "expected a dict of tensors (a state dict), got list"),
    "target_config_not_json": (_target_not_json, "t/config.json: malformed JSON at line 1"),
    "out_under_a_file": (_out_under_a_file, "afile/out: cannot write there (a parent is a file)"),
    "num_speculative_tokens_0": (_spec_tokens(0), "--num-speculative-tokens must be between 1 and 127, got 0"),
    "num_speculative_tokens_500": (_spec_tokens(500), "--num-speculative-tokens must be between 1 and 127"),
}


@pytest.mark.parametrize("name", CONVERTER)
def test_converter_input(tmp_path, target, name):
    setup, expect = CONVERTER[name]
    src, tgt, kw = setup(tmp_path, tmp_path / "src", target)
    out = kw.pop("out", tmp_path / "out")
    given = digest(tmp_path)
    target_before = digest(target)
    if expect is None:
        convert(src, tgt, out, **kw)
        ck = load_checkpoint(out)
        ref = load_checkpoint(src).weights
        assert sorted(ck.weights) == sorted(ref)
        for k, v in ref.items():  # the target's dtype, float32
            assert ck.weights[k].dtype == torch.float32 and torch.equal(ck.weights[k], v.float()), k
        assert {k: v for k, v in digest(tmp_path).items() if not k.startswith("out/")} == given
    else:
        with pytest.raises(UserError) as e:
            convert(src, tgt, out, **kw)
        msg = str(e.value)
        assert expect in msg and "\n" not in msg, msg
        assert digest(tmp_path) == given  # nothing written, nothing the user gave changed
        assert not out.exists()
    assert digest(target) == target_before
    assert not (tmp_path / "PWNED").exists()  # no pickled code ran


def test_tied_target_lm_head_is_its_embedding(tmp_path, target):
    """A target with tie_word_embeddings serves its embedding as lm_head, whatever stale
    lm_head.weight its file holds. A head lm_head equal to that stale entry is not the
    target's: it is kept (it used to be dropped as 'identical', and the draft then ran
    on the embedding)."""
    import shutil

    tgt = tmp_path / "tied"
    shutil.copytree(target, tgt)
    cfg = json.loads((tgt / "config.json").read_text())
    cfg["tie_word_embeddings"] = True
    (tgt / "config.json").write_text(json.dumps(cfg))
    stale = load_file(str(tgt / "model.safetensors"))["lm_head.weight"]
    src = make_src(tmp_path / "src", target, edit=set_("lm_head.weight", stale.clone()))
    _, notes = convert(src, tgt, tmp_path / "out")
    assert "lm_head.weight: differs from the target's, kept" in notes
    assert torch.equal(load_checkpoint(tmp_path / "out").weights["lm_head.weight"], stale)
    emb = load_file(str(tgt / "model.safetensors"))["model.embed_tokens.weight"]
    src2 = make_src(tmp_path / "src2", target, edit=set_("lm_head.weight", emb.clone()))
    _, notes = convert(src2, tgt, tmp_path / "out2")
    assert "lm_head.weight: identical to the target's, shared at load time" in notes


CLI_CASES = ["truncated_safetensors", "bin_pickle_runs_code_torch_save", "index_shard_dotdot"]


@pytest.mark.parametrize("name", CLI_CASES)
def test_converter_cli_one_line(tmp_path, target, name):
    """Through `python -m vllm_hass.cli convert`: exit 2, one line on stderr, no traceback."""
    setup, expect = CONVERTER[name]
    src, tgt, _ = setup(tmp_path, tmp_path / "src", target)
    given = digest(tmp_path)
    r = subprocess.run([sys.executable, "-m", "vllm_hass.cli", "convert", str(src), "--target",
                        str(tgt), "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("vllm-hass convert: error: ") and expect in lines[0], \
        r.stderr
    assert r.stdout == "" and digest(tmp_path) == given and not (tmp_path / "PWNED").exists()


# --- hass.json ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def head(tmp_path_factory, target):
    return write_head(tmp_path_factory.mktemp("badhead") / "head", target, fixtures.random_head_state)


TREE = {"depth": 4, "top_k": 3, "total_tokens": 10}


def _model(value):
    return lambda root, head: {"method": "hass", "model": value(root, head), "num_speculative_tokens": 3}


def _head_with_config(text: bytes):
    def model(root, head):
        d = root / "h"
        d.mkdir()
        (d / "config.json").write_bytes(text)
        return str(d)
    return _model(model)


def _with(**kw):
    def spec(root, head):
        d = {"method": "hass", "model": str(head), **kw}
        return {k: v for k, v in d.items() if v is not ...}
    return spec


def _tree(**kw):
    return _with(tree={k: v for k, v in {**TREE, **kw}.items() if v is not ...})


def _head_dir_file(root, head):
    (root / "file").write_text("x")
    return str(root / "file")


def _bias_head(root, head):
    import shutil

    shutil.copytree(head, root / "h")
    cfg = json.loads((root / "h" / "config.json").read_text())
    (root / "h" / "config.json").write_text(json.dumps({**cfg, "bias": True}))
    return str(root / "h")


# name -> (spec(root, head) -> dict written to hass.json | bytes, expected message | None = accepted)
SPEC = {
    "method_missing": (_with(method=..., num_speculative_tokens=3), "'method' must be \"hass\", got None"),
    "model_missing": (_with(model=..., num_speculative_tokens=3), "'model' is required"),
    "model_not_a_string": (_model(lambda r, h: 7), "'model' must be a directory path string, got 7"),
    "model_empty_string": (_model(lambda r, h: ""), "'model' must be a directory path string, got ''"),
    "model_is_a_file": (_model(_head_dir_file), "file is not a directory"),
    "model_without_config": (_model(lambda r, h: str(r)), "has no config.json"),
    "model_config_binary": (_head_with_config(b"\xff\xfe\x00"), "config.json: not a JSON text file"),
    "model_config_a_list": (_head_with_config(b"[]"), "config.json: expected a JSON object, got list"),
    "model_config_with_bias_key": (_model(_bias_head), "key 'bias' would be read by vLLM as attention bias"),
    "unknown_key_case": (_with(num_speculative_tokens=3, Tree=TREE), "unknown key 'Tree'"),
    "num_speculative_tokens_float": (_with(num_speculative_tokens=3.0),
                                     "'num_speculative_tokens' must be an integer >= 1, got 3.0"),
    "num_speculative_tokens_negative": (_with(num_speculative_tokens=-1),
                                        "'num_speculative_tokens' must be an integer >= 1, got -1"),
    "num_speculative_tokens_128": (_with(num_speculative_tokens=128),
                                   "'num_speculative_tokens' must be <= 127, got 128"),
    "num_speculative_tokens_huge": (_with(num_speculative_tokens=10**9), "must be <= 127, got 1000000000"),
    "num_speculative_tokens_127_accepted": (_with(num_speculative_tokens=127), None),
    "num_speculative_tokens_right_with_tree_accepted": (_with(tree=TREE, num_speculative_tokens=9), None),
    "tree_null": (_with(tree=None), "'tree' must be an object with depth, top_k, total_tokens"),
    "tree_depth_missing": (_tree(depth=...), "'tree.depth' is required"),
    "tree_top_k_string": (_tree(top_k="3"), "'tree.top_k' must be an integer >= 1, got '3'"),
    "tree_top_k_float": (_tree(top_k=3.0), "'tree.top_k' must be an integer >= 1, got 3.0"),
    "tree_top_k_0": (_tree(top_k=0), "'tree.top_k' must be an integer >= 1, got 0"),
    "tree_depth_bool": (_tree(depth=True), "'tree.depth' must be an integer >= 1, got True"),
    "tree_total_tokens_1": (_tree(total_tokens=1), "'tree.total_tokens' must be an integer >= 2, got 1"),
    "tree_total_tokens_129": (_tree(depth=6, top_k=10, total_tokens=129),
                              "'tree.total_tokens' must be <= 128, got 129"),
    "tree_total_tokens_128_accepted": (_tree(depth=6, top_k=10, total_tokens=128), None),
    "tree_deeper_than_its_nodes": (_tree(depth=12), "'tree.depth' must be <= total_tokens - 1 = 9, got 12"),
    "tree_depth_huge": (_tree(depth=10**6), "'tree.depth' must be <= total_tokens - 1 = 9"),
    "tree_top_k_above_vocab": (_tree(depth=2, top_k=VOCAB + 1, total_tokens=100),
                               f"'tree.top_k' must be <= the head's vocabulary ({VOCAB}), got {VOCAB + 1}"),
    "tree_top_k_vocab_accepted": (_tree(depth=2, top_k=VOCAB, total_tokens=100), None),
    "max_model_len_0": (_with(num_speculative_tokens=3, max_model_len=0),
                        "'max_model_len' must be an integer >= 1, got 0"),
    "max_model_len_string": (_with(num_speculative_tokens=3, max_model_len="2048"),
                             "'max_model_len' must be an integer >= 1, got '2048'"),
    "max_model_len_below_tree": (_with(tree={"depth": 6, "top_k": 10, "total_tokens": 60}, max_model_len=60),
                                 "'max_model_len' must be > 60 (the drafts need 60 positions after the "
                                 "prompt), got 60"),
    "max_model_len_above_tree_accepted": (_with(tree=TREE, max_model_len=64), None),
    "enforce_eager_string": (_with(num_speculative_tokens=3, enforce_eager="yes"),
                             "'enforce_eager' must be a bool, got 'yes'"),
    "quantization_int": (_with(num_speculative_tokens=3, quantization=8), "'quantization' must be a str, got 8"),
    "revision_list": (_with(num_speculative_tokens=3, revision=["main"]), "'revision' must be a str"),
    "file_a_json_list": (lambda r, h: b"[1, 2]", "expected a JSON object, got list"),
    "file_binary": (lambda r, h: b"\x89PNG\r\n\x1a\n\x00", "not a JSON text file (not UTF-8)"),
    "file_empty": (lambda r, h: b"", "malformed JSON at line 1 column 1"),
}


@pytest.mark.parametrize("name", SPEC)
def test_hass_json(tmp_path, head, name):
    make, expect = SPEC[name]
    body = make(tmp_path, head)
    f = tmp_path / "hass.json"
    f.write_bytes(body if isinstance(body, bytes) else json.dumps(body).encode())
    given, head_before = digest(tmp_path), digest(head)
    if expect is None:
        spec = parse_spec(str(f))
        assert spec.model == str(head)
    else:
        with pytest.raises(UserError) as e:
            parse_spec(str(f))
        msg = str(e.value)
        assert msg.startswith(f"{f}: ") or msg.startswith(str(tmp_path)), msg  # names the file
        assert expect in msg and "\n" not in msg, msg
    assert digest(tmp_path) == given and digest(head) == head_before


def test_spec_not_a_path_or_object():
    with pytest.raises(UserError, match="expected a JSON object, a JSON string or a path to a .json file, got int"):
        parse_spec(3)


@pytest.mark.slow
def test_vllm_serve_bad_hass_json_is_one_line(tmp_path, head, target):
    """Through `vllm serve`: argparse's usage line and one error line naming the file and
    field, no traceback (~20 s: vLLM's imports)."""
    f = tmp_path / "hass.json"
    f.write_text(json.dumps({"method": "hass", "model": str(head), "tree": {**TREE, "depth": 12}}))
    vllm = Path(sys.executable).parent / "vllm"
    r = subprocess.run([str(vllm), "serve", str(target), "--speculative-config", str(f)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    errors = [ln for ln in r.stderr.splitlines() if "error:" in ln]
    assert errors == [f"vllm serve: error: argument --speculative-config/-sc: {f}: "
                      "'tree.depth' must be <= total_tokens - 1 = 9, got 12"], r.stderr


# --- train fit --resume ---------------------------------------------------------------------

def test_resume_state_that_runs_code_is_refused(tmp_path):
    """`train fit --resume` unpickles with weights_only=True: a state file whose pickle
    would run code is refused in one line and runs nothing; a real state still loads."""
    from vllm_hass.converters.layout import load_plain_pickle

    bad = tmp_path / "out.state.pt"
    torch.save({"head": {}, "epoch": Marker(tmp_path / "PWNED")}, bad)
    given = digest(tmp_path)
    with pytest.raises(UserError) as e:
        load_plain_pickle(bad, "training state")
    assert "refused: the pickle holds objects other than tensors" in str(e.value)
    assert "training state are not loaded" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "PWNED").exists() and digest(tmp_path) == given
    # what fit.save_state writes: tensors, optimizer/scheduler state, RNG state, numbers
    w = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(w.parameters(), lr=1e-3, betas=(0.9, 0.95))
    w(torch.randn(2, 4)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    state = {"head": w.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
             "gen": torch.Generator().manual_seed(0).get_state(), "epoch": 1, "pos": 2, "step": 3,
             "tokens": 4, "seconds": 5.0}
    torch.save(state, tmp_path / "good.pt")
    back = load_plain_pickle(tmp_path / "good.pt", "training state")
    assert back["opt"]["param_groups"][0]["betas"] == (0.9, 0.95) and back["seconds"] == 5.0
    assert torch.equal(back["head"]["weight"], w.state_dict()["weight"])


def test_fit_resume_refuses_a_malicious_state(tmp_path):
    """The same through `train fit --resume`: one line, nothing ran, nothing written."""
    from vllm_hass.train.data import generate
    from vllm_hass.train.fit import fit

    tgt = fixtures.make_target(tmp_path / "target", hidden_size=64, intermediate_size=128,
                               num_heads=2, num_kv_heads=1)
    (tmp_path / "t.jinja").write_text("{% for m in messages %}{{ m['content'] }}\n{% endfor %}")
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"conversations": [
        {"from": "human", "value": "the quick brown fox"},
        {"from": "gpt", "value": "jumps over the lazy dog " * (i + 2)}]}) + "\n" for i in range(4)))
    generate(tgt, tmp_path / "c.jsonl", tmp_path / "data", max_len=64, topk=10,
             chat_template=str(tmp_path / "t.jinja"), progress=False)
    torch.save({"head": {}, "opt": Marker(tmp_path / "PWNED")}, tmp_path / "head.state.pt")
    given = digest(tmp_path)
    with pytest.raises(UserError) as e:
        fit(target=str(tgt), data=str(tmp_path / "data"), out=str(tmp_path / "head"), resume=True,
            epochs=1, dtype="float32", lm_head_dtype="float32", eval_samples=0)
    assert str(e.value).startswith(f"{tmp_path / 'head.state.pt'}: refused: the pickle holds objects")
    assert not (tmp_path / "PWNED").exists() and digest(tmp_path) == given
