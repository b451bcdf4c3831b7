"""`vllm-hass convert` / `inspect`: every source layout round-trips exactly, bad input
gets its own one-line error, and the source is never touched."""

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vllm_hass import cli, fixtures
from vllm_hass.converters import convert as convert_mod
from vllm_hass.converters.layout import PLUGIN_ARCH, load_checkpoint

EAGLE_NORM_NAMES = {  # plugin name -> name some HASS/EAGLE forks save under
    "embed_norm.weight": "embed_layernorm.weight",
    "layers.0.input_layernorm.weight": "hidden_layernorm.weight",
    "lm_head_norm.weight": "lm_head_layernorm.weight",
}


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return fixtures.make_target(tmp_path_factory.mktemp("conv") / "target", seed=5)


def make_source(dir_: Path, target: Path, *, fmt="bin", sharded=False, fc_bias=True,
                embed="none", bias_key=True, norms=False, prefix="", seed=0):
    """A head saved the way the HASS/EAGLE repos save it."""
    tcfg = fixtures.target_config(target)
    flags = dict(fc_bias=fc_bias)
    if norms:
        flags.update(embed_norm=True, input_layernorm=True, lm_head_norm=True)
    hc = fixtures.head_config_for(tcfg, **flags)
    sd = fixtures.random_head_state(hc, seed=seed)
    for name in list(sd):
        if name in EAGLE_NORM_NAMES:
            sd[EAGLE_NORM_NAMES[name]] = sd.pop(name) + 0.5  # non-trivial norm weights
    if embed == "same":
        sd["embed_tokens.weight"] = load_file(str(target / "model.safetensors"))[
            "model.embed_tokens.weight"].clone()
    elif embed == "own":
        sd["embed_tokens.weight"] = torch.randn(hc.vocab_size, hc.hidden_size)
    sd = {prefix + k: v.contiguous() for k, v in sd.items()}
    dir_.mkdir(parents=True)
    cfg = {k: tcfg[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                "num_key_value_heads", "vocab_size", "rms_norm_eps",
                                "rope_theta", "max_position_embeddings", "hidden_act")}
    cfg.update(architectures=["LlamaForCausalLM"], model_type="llama", num_hidden_layers=1,
               torch_dtype="float32")
    if bias_key is not None:
        cfg["bias"] = bias_key
    (dir_ / "config.json").write_text(json.dumps(cfg))
    names = sorted(sd)
    shards = [names[: len(names) // 2], names[len(names) // 2:]] if sharded else [names]
    ext = "bin" if fmt == "bin" else "safetensors"
    base = "pytorch_model" if fmt == "bin" else "model"
    weight_map = {}
    for i, keys in enumerate(shards):
        fname = f"{base}-{i + 1:05d}-of-{len(shards):05d}.{ext}" if sharded else f"{base}.{ext}"
        part = {k: sd[k] for k in keys}
        if fmt == "bin":
            torch.save(part, dir_ / fname)
        else:
            save_file(part, str(dir_ / fname))
        weight_map.update({k: fname for k in keys})
    if sharded:
        (dir_ / f"{base}.{ext}.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return {k.removeprefix(prefix): v for k, v in sd.items()}


def digest(dir_: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(dir_.iterdir())}


def run_cli(capsys, *argv):
    rc = cli.main(list(map(str, argv)))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


LAYOUTS = [
    dict(fmt="bin"),
    dict(fmt="safetensors"),
    dict(fmt="bin", sharded=True),
    dict(fmt="safetensors", sharded=True),
    dict(fmt="bin", fc_bias=False, bias_key=False),
    dict(fmt="bin", bias_key=None),
    dict(fmt="safetensors", embed="same"),
    dict(fmt="safetensors", embed="own"),
    dict(fmt="bin", norms=True),
    dict(fmt="safetensors", prefix="model."),
]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda d: "-".join(f"{k}={v}" for k, v in d.items()))
def test_round_trip(tmp_path, target, capsys, layout):
    src = tmp_path / "src"
    weights = make_source(src, target, **layout)
    before = digest(src)
    rc, out, err = run_cli(capsys, "convert", src, "--target", target, "--out",
                           tmp_path / "out", "--dtype", "float32")
    assert rc == 0, err
    assert digest(src) == before
    conv = load_checkpoint(tmp_path / "out")
    assert conv.layout == "plugin"
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["architectures"] == [PLUGIN_ARCH] and "bias" not in cfg
    expected = {}
    aliases = {v: k for k, v in EAGLE_NORM_NAMES.items()}
    for k, v in weights.items():
        expected[aliases.get(k, k)] = v
    if layout.get("embed") == "same":  # identical to the target's: shared, not copied
        del expected["embed_tokens.weight"]
        assert "shared at load time" in out
    assert sorted(conv.weights) == sorted(expected)
    for k, v in expected.items():
        assert torch.equal(conv.weights[k], v.float()), k
    assert cfg["hass"]["fc_bias"] == layout.get("fc_bias", True)
    assert cfg["hass"]["has_embed_tokens"] == (layout.get("embed") == "own")
    assert cfg["hass"]["input_layernorm"] == layout.get("norms", False)
    spec = json.loads((tmp_path / "out" / "hass.json").read_text())
    assert spec == {"method": "hass", "model": ".", "num_speculative_tokens": 3}


def test_inspect_describes_both_layouts(tmp_path, target, capsys):
    src = tmp_path / "src"
    make_source(src, target, fmt="bin", norms=True)
    rc, out, _ = run_cli(capsys, "inspect", src)
    assert rc == 0
    assert "HASS/EAGLE-1/2 repo format" in out and "fc.bias     yes" in out
    assert "embed_norm, input_layernorm, lm_head_norm" in out
    assert "'bias': True" in out
    run_cli(capsys, "convert", src, "--target", target, "--out", tmp_path / "out")
    rc, out, _ = run_cli(capsys, "inspect", tmp_path / "out", "--json")
    info = json.loads(out)
    tcfg = fixtures.target_config(target)
    assert info["layout"] == "vllm-hass plugin format"
    assert info["dtype"] == "float32"  # the target's dtype by default
    assert info["target_dims"]["hidden_size"] == tcfg["hidden_size"]
    H, I = tcfg["hidden_size"], tcfg["intermediate_size"]
    q = tcfg["num_attention_heads"] * tcfg["head_dim"]
    kv = tcfg["num_key_value_heads"] * tcfg["head_dim"]
    n = 2 * H * H + H + 2 * H * q + 2 * H * kv + 3 * H * I + 4 * H
    assert info["parameters"] == n


def test_converted_head_computes_like_the_source(tmp_path, target, capsys):
    """Same outputs from HassHead before and after conversion (names, aliases, bias)."""
    from vllm_hass.head import HassHead

    src = tmp_path / "src"
    make_source(src, target, fmt="bin", norms=True)
    run_cli(capsys, "convert", src, "--target", target, "--out", tmp_path / "out", "--dtype",
            "float32")
    a, b = load_checkpoint(src), load_checkpoint(tmp_path / "out")
    heads = []
    for ck in (a, b):
        h = HassHead(ck.head_config)
        h.load_head_state_dict(ck.weights)
        heads.append(h)
    torch.manual_seed(0)
    H = a.head_config.hidden_size
    e, h, pos = torch.randn(1, 5, H), torch.randn(1, 5, H), torch.arange(5)[None]
    assert torch.equal(heads[0](e, h, pos)[0], heads[1](e, h, pos)[0])


# --- bad input: one specific line each, SRC untouched, OUT never half-written --------


def wrong_hidden_target(tmp_path):
    d = tmp_path / "wide"
    d.mkdir()
    cfg = fixtures.llama_config_dict(475, hidden_size=256, num_heads=4)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize("case", ["hidden", "missing", "extra", "shape", "malformed",
                                  "nosrc", "noweights", "overwrite"])
def test_bad_input(tmp_path, target, capsys, case):
    src = tmp_path / "src"
    make_source(src, target, fmt="safetensors")
    out = tmp_path / "out"
    tgt = target
    if case == "hidden":
        tgt, expect = wrong_hidden_target(tmp_path), "hidden_size: head 128, target 256"
    elif case == "missing":
        sd = load_file(str(src / "model.safetensors"))
        del sd["layers.0.mlp.up_proj.weight"]
        save_file(sd, str(src / "model.safetensors"))
        expect = "missing weight 'layers.0.mlp.up_proj.weight'"
    elif case == "extra":
        sd = load_file(str(src / "model.safetensors"))
        sd["layers.1.mlp.up_proj.weight"] = torch.zeros(2)
        save_file(sd, str(src / "model.safetensors"))
        expect = "unexpected weight 'layers.1.mlp.up_proj.weight'"
    elif case == "shape":
        sd = load_file(str(src / "model.safetensors"))
        sd["fc.weight"] = torch.zeros(128, 128)
        save_file(sd, str(src / "model.safetensors"))
        expect = "weight 'fc.weight' has shape [128, 128], expected [128, 256]"
    elif case == "malformed":
        (src / "config.json").write_text('{"hidden_size": 128,')
        expect = "config.json: malformed JSON at line 1"
    elif case == "nosrc":
        src, expect = tmp_path / "nope", "nope: no such directory"
    elif case == "noweights":
        (src / "model.safetensors").unlink()
        expect = "no weights found"
    elif case == "overwrite":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
        expect = "already exists (pass --force to replace it)"
    before = digest(src) if src.exists() else None
    rc, _, err = run_cli(capsys, "convert", src, "--target", tgt, "--out", out)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and expect in lines[0], err
    if before is not None:
        assert digest(src) == before
    if case == "overwrite":
        assert (out / "keep.txt").read_text() == "mine"
    else:
        assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_failed_write_leaves_nothing(tmp_path, target, capsys, monkeypatch):
    src = tmp_path / "src"
    make_source(src, target)
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("previous conversion")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(convert_mod.json, "dumps", boom)
    with pytest.raises(OSError):
        convert_mod.convert(src, target, out, force=True)
    assert (out / "old.txt").read_text() == "previous conversion"  # --force kept the old OUT
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def test_force_replaces(tmp_path, target, capsys):
    src = tmp_path / "src"
    make_source(src, target)
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("x")
    rc, _, err = run_cli(capsys, "convert", src, "--target", target, "--out", out, "--force")
    assert rc == 0, err
    assert not (out / "old.txt").exists() and (out / "model.safetensors").exists()


def test_output_has_the_users_umask_not_private_temp_modes(tmp_path, target, capsys):
    import os
    import stat

    src = tmp_path / "src"
    make_source(src, target)
    old = os.umask(0o022)
    try:
        rc, _, err = run_cli(capsys, "convert", src, "--target", target, "--out", tmp_path / "out")
    finally:
        os.umask(old)
    assert rc == 0, err
    out = tmp_path / "out"
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert {f.name: stat.S_IMODE(f.stat().st_mode) for f in out.iterdir()} == {
        "model.safetensors": 0o644, "config.json": 0o644, "hass.json": 0o644}


def test_rope_mismatch_named_and_resolvable(tmp_path, target, capsys):
    src = tmp_path / "src"
    make_source(src, target)
    cfg = json.loads((src / "config.json").read_text())
    cfg["rope_theta"] = 500000.0
    (src / "config.json").write_text(json.dumps(cfg))
    rc, _, err = run_cli(capsys, "convert", src, "--target", target, "--out", tmp_path / "o1")
    assert rc == 2 and "rope_theta: head 500000.0, target 10000.0" in err
    assert "--rope-from" in err
    rc, _, err = run_cli(capsys, "convert", src, "--target", target, "--out", tmp_path / "o2",
                         "--rope-from", "target")
    assert rc == 0, err
    assert json.loads((tmp_path / "o2" / "config.json").read_text())["rope_theta"] == 10000.0
