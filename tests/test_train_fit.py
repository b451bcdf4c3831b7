"""A tiny end-to-end run: tiny Llama target + synthetic conversations -> features ->
EAGLE and HASS training -> checkpoints the plugin and the converter accept."""

import json
import random
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from vllm_hass.converters.convert import convert
from vllm_hass.converters.layout import PLUGIN_ARCH, check_weights, load_checkpoint
from vllm_hass.errors import UserError
from vllm_hass.fixtures import make_target
from vllm_hass.train.data import generate
from vllm_hass.train.fit import Recipe, fit, load_head

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
          "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|im_start|>assistant\\n' }}{% endif %}")
WORDS = ("the quick brown fox jumps over lazy dog speculative decoding drafts tokens "
         "with small model and verifies them robot poems add return print range").split()


def synthetic_conversations(n, seed=0):
    rng = random.Random(seed)
    say = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
    return [{"conversations": [{"from": "human", "value": say(6)},
                               {"from": "gpt", "value": say(rng.randint(15, 30))}]}
            for _ in range(n)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("fit")
    # head_dim 32: the smallest vLLM's CPU attention takes, so the trained head can be served
    target = make_target(root / "target", seed=0, hidden_size=64, intermediate_size=128,
                         num_heads=2, num_kv_heads=1)
    # a random Llama is nearly uniform over its vocabulary; a sharper one gives the
    # draft something to learn
    w = load_file(str(target / "model.safetensors"))
    w["lm_head.weight"] *= 25
    save_file(w, str(target / "model.safetensors"))
    (root / "chatml.jinja").write_text(CHATML)
    convs = synthetic_conversations(24)
    (root / "convs.jsonl").write_text("".join(json.dumps(c) + "\n" for c in convs))
    generate(target, root / "convs.jsonl", root / "data", max_len=128, topk=10,
             chat_template=str(root / "chatml.jinja"), progress=False)
    return root, target


def run(root, target, name, method="hass", **kw):
    args = dict(target=str(target), data=str(root / "data"), out=str(root / name), method=method,
                epochs=4, lr=3e-3, batch_tokens=512, eval_samples=4, eval_steps=3,
                dtype="float32", lm_head_dtype="float32", log_every=1000, force=True)
    return fit(**{**args, **kw})


@pytest.fixture(scope="module")
def trained(tiny):
    root, target = tiny
    return run(root, target, "hass", repo_out=str(root / "hass-repo"))


def test_hass_training_lowers_the_loss_and_writes_loadable_heads(tiny, trained):
    root, target = tiny
    res = trained
    hist = res["history"]
    assert len(hist) == 4 and hist[-1] < 0.8 * hist[0], hist

    # plugin format: what vLLM loads
    ckpt = load_checkpoint(root / "hass")
    assert ckpt.layout == "plugin" and ckpt.config["architectures"] == [PLUGIN_ARCH]
    check_weights(ckpt.weights, ckpt.head_config, "hass")
    assert ckpt.head_config.fc_bias
    assert json.loads((root / "hass" / "hass.json").read_text())["method"] == "hass"
    trained = res["head"].head_state_dict()
    for k, v in ckpt.weights.items():
        torch.testing.assert_close(v, trained[k])

    # the HASS repo's layout converts with the plugin's converter
    repo = load_checkpoint(root / "hass-repo")
    assert repo.layout == "eagle" and repo.config["bias"] is True
    out, _ = convert(root / "hass-repo", target, root / "hass-converted", dtype="float32")
    conv = load_checkpoint(out)
    assert set(conv.weights) == set(ckpt.weights)  # embed_tokens: identical to the target's
    for k, v in conv.weights.items():
        torch.testing.assert_close(v, ckpt.weights[k])

    # and a head loaded back evaluates the same as the one in memory
    assert load_head(root / "hass").state_dict().keys() == res["head"].state_dict().keys()


def test_same_seed_same_head_and_eagle_differs(tiny):
    root, target = tiny
    small = dict(epochs=1, limit=12, eval_samples=0)
    a = run(root, target, "a", **small)["head"].head_state_dict()
    b = run(root, target, "b", **small)["head"].head_state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    e = run(root, target, "e", method="eagle", **small)["head"].head_state_dict()
    assert not torch.equal(a["fc.weight"], e["fc.weight"])
    assert json.loads((root / "e" / "config.json").read_text())["hass"]["kind"] == "eagle"


def test_two_stage_recipe_has_no_topk_term_before_its_epoch(tiny, capsys):
    root, target = tiny
    r = Recipe(steps=2, topk_w=1.0, topk_from_epoch=1)
    res = run(root, target, "two", recipe=r, epochs=2, limit=12, eval_samples=0, log_every=1)
    assert len(res["history"]) == 2
    log = capsys.readouterr().out
    assert "epoch 0 " in log and "epoch 1 " in log


def test_init_starts_from_the_given_head(tiny, trained):
    """HASS as stage 2 on top of a trained head: with lr 0 the saved head is the init head,
    and its first-epoch loss is far below a fresh head's."""
    root, target = tiny
    small = dict(epochs=1, limit=12, eval_samples=0, lr=0.0)
    cont = run(root, target, "cont", init=str(root / "hass"), **small)
    start = load_head(root / "hass").head_state_dict()
    for k, v in cont["head"].head_state_dict().items():
        assert torch.equal(v, start[k]), k
    fresh = run(root, target, "fresh", **small)
    assert cont["history"][0] < 0.8 * fresh["history"][0], (cont["history"], fresh["history"])

    with pytest.raises(UserError, match=r"--init .*differs.*\['fc_bias'\]"):
        run(root, target, "nobias", init=str(root / "hass"), fc_bias=False, **small)
    with pytest.raises(UserError, match="--init .*no such head directory"):
        run(root, target, "missing", init=str(root / "nope"), **small)


def test_topk_larger_than_stored_is_a_user_error(tiny):
    root, target = tiny
    with pytest.raises(UserError, match="stores only the top 10"):
        run(root, target, "bad", recipe=Recipe(topk=20))


def test_cli_reports_bad_input_without_traceback(tiny):
    root, target = tiny
    p = subprocess.run([sys.executable, "-m", "vllm_hass.train", "fit", "--target", str(target),
                        "--data", str(root / "nope"), "--out", str(root / "x")],
                       capture_output=True, text=True)
    assert p.returncode == 2 and "no meta.json" in p.stderr and "Traceback" not in p.stderr


def test_resume_continues_exactly(tiny, monkeypatch):
    import vllm_hass.train.fit as fit_mod

    root, target = tiny
    kw = dict(epochs=2, limit=12, eval_samples=0, save_every=1)
    whole = run(root, target, "whole", **kw)["head"].head_state_dict()

    calls = {"n": 0}
    real = fit_mod.collate

    def interrupted(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:  # mid-way through the second epoch
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(fit_mod, "collate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(root, target, "part", **kw)
    monkeypatch.setattr(fit_mod, "collate", real)
    resumed = run(root, target, "part", resume=True, **kw)["head"].head_state_dict()
    for k in whole:
        assert torch.equal(whole[k], resumed[k]), k


@pytest.mark.engine
def test_trained_head_serves_in_vllm(tiny):
    """Self-distilled data (the target writes the replies, as at serving time) -> HASS head
    -> vLLM: output identical to no speculation, and it accepts far more than an untrained
    head of the same shape."""
    from helpers import free_llm, make_llm, spec_metrics, token_ids
    from transformers import AutoTokenizer
    from vllm import SamplingParams

    root, target = tiny
    convs = synthetic_conversations(40, seed=1)
    (root / "convs-sd.jsonl").write_text("".join(json.dumps(c) + "\n" for c in convs[:32]))
    generate(target, root / "convs-sd.jsonl", root / "data-sd", max_len=128, topk=10,
             chat_template=str(root / "chatml.jinja"), regen=True, max_new_tokens=32, progress=False)
    run(root, target, "sd", data=str(root / "data-sd"), epochs=6)
    run(root, target, "untrained", data=str(root / "data-sd"), epochs=1, limit=1, lr=1e-9,
        eval_samples=0)

    tok = AutoTokenizer.from_pretrained(str(target))
    texts = [tok.apply_chat_template([{"role": "user", "content": c["conversations"][0]["value"]}],
                                     chat_template=CHATML, add_generation_prompt=True, tokenize=False)
             for c in convs[32:]]  # prompts the head never trained on
    ps = [{"prompt_token_ids": tok.encode(t, add_special_tokens=False)} for t in texts]
    greedy = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    base = make_llm(target)
    want = token_ids(base.generate(ps, greedy))
    free_llm(base)
    rates = {}
    for name in ("sd", "untrained"):
        llm = make_llm(target, str(root / name / "hass.json"))
        got = token_ids(llm.generate(ps, greedy))
        m = spec_metrics(llm)
        free_llm(llm)
        assert got == want, name
        rates[name] = m["num_accepted_tokens"] / m["num_draft_tokens"]
    # Offline the head agrees with the target's top-1 ~65% of the time; served, less: the
    # replies were regenerated as text and re-tokenised, and this toy BPE re-tokenises the
    # target's own tokens differently, so serving shows it token sequences it never saw.
    assert rates["sd"] > 0.1 and rates["sd"] > 3 * rates["untrained"], rates
