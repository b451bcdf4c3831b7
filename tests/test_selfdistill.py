"""Self-distilled data at token level: `train gen` keeps the ids vLLM produced, `train data
--tokens` computes the features on exactly those ids (no detokenize/retokenize), evaluation
prompts never enter, and the trainer's packed q from the stored normaliser is the softmax."""

import json
import shutil
import types

import pytest
import torch

from vllm_hass.errors import UserError
from vllm_hass.fixtures import make_target
from vllm_hass.train.data import Samples, collate, generate
from vllm_hass.train.selfdistill import encode_record, is_greedy, read_records

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
          "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|im_start|>assistant\\n' }}{% endif %}")


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return make_target(tmp_path_factory.mktemp("sd") / "target", seed=0)


@pytest.mark.parametrize("f, n, want", [(0.75, 8, 6), (0.5, 10, 5), (0.0, 5, 0), (1.0, 5, 5),
                                        (0.3, 10, 3)])
def test_the_greedy_mix_is_what_was_asked_and_spread_evenly(f, n, want):
    picks = [is_greedy(i, f) for i in range(n)]
    assert sum(picks) == want
    if 0 < f < 1:  # never two sampled prompts in a row when most are greedy, and vice versa
        runs = "".join("g" if p else "s" for p in picks)
        assert ("ss" not in runs) if f >= 0.5 else ("gg" not in runs)


def write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_features_are_computed_on_exactly_the_generated_ids(target, tmp_path):
    """Ids that do not survive decode -> encode (a word spelled in single-byte tokens) stay
    as they are: what the draft learns is the token sequence the target emitted."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(target))
    prompt = tok("The quick brown fox")["input_ids"]
    reply = [tok.convert_tokens_to_ids(c) for c in "jumps"] + [1]  # byte tokens, then </s>
    assert tok(tok.decode(reply[:-1]))["input_ids"] != reply[:-1]  # a round trip would change them
    recs = [{"id": "a", "prompt_ids": prompt, "output_ids": reply, "temperature": 0.0},
            {"id": "b", "prompt_ids": prompt[:2], "output_ids": prompt[2:] + reply,
             "temperature": 1.0, "seed": 7}]
    stats = generate(target, None, tmp_path / "data", tokens=write(tmp_path / "t.jsonl", recs),
                     topk=4, progress=False)
    assert stats["written"] == 2 and stats["assistant_tokens"] == len(reply) * 2 + len(prompt) - 2
    samples = Samples(tmp_path / "data")
    assert samples.has_lse and samples.meta["tokens"] == str((tmp_path / "t.jsonl").absolute())
    model = AutoModelForCausalLM.from_pretrained(str(target)).eval()
    for r, i in zip(recs, range(2)):
        s = samples[i]
        assert s["input_ids"].tolist() == r["prompt_ids"] + r["output_ids"]
        assert s["loss_mask"].tolist() == [0] * len(r["prompt_ids"]) + [1] * len(r["output_ids"])
        with torch.no_grad():
            ref = model(input_ids=s["input_ids"].long()[None], output_hidden_states=True)
        torch.testing.assert_close(s["hidden"], ref.hidden_states[-1][0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(s["lse"], ref.logits[0].logsumexp(-1), rtol=1e-5, atol=1e-5)
        p, ids = ref.logits[0].softmax(-1).topk(4, dim=-1)
        assert torch.equal(s["topk_ids"].long(), ids)
        torch.testing.assert_close(s["topk_p"], p)
    from safetensors import safe_open

    with safe_open(str(samples.files[1]), "pt") as f:
        assert json.loads(f.metadata()["messages"]) == {
            "id": "b", "source": None, "temperature": 1.0, "seed": 7, "finish_reason": None}


@pytest.mark.parametrize("line, msg", [
    ("not json", "t.jsonl:2: not JSON"),
    ('["a list"]', "t.jsonl:2: expected an object"),
    ('{"prompt_ids": [1, 2]}', "t.jsonl:2: 'output_ids' must be a non-empty list"),
    ('{"prompt_ids": [1, -2], "output_ids": [3]}', "t.jsonl:2: 'prompt_ids' must be"),
    ('{"prompt_ids": [1, true], "output_ids": [3]}', "t.jsonl:2: 'prompt_ids' must be"),
    ('{"prompt_ids": [], "output_ids": [3]}', "t.jsonl:2: 'prompt_ids' must be"),
])
def test_bad_tokens_files_are_one_line_errors(tmp_path, line, msg):
    path = tmp_path / "t.jsonl"
    path.write_text('{"prompt_ids": [1], "output_ids": [2]}\n' + line + "\n")
    with pytest.raises(UserError, match=msg.replace("[", r"\[")):
        read_records(path)
    with pytest.raises(UserError, match="no such file"):
        read_records(tmp_path / "missing.jsonl")


def test_ids_outside_the_vocabulary_and_mixed_sources_are_refused(target, tmp_path):
    with pytest.raises(UserError, match="record 1: token id 999999 is outside"):
        generate(target, None, tmp_path / "d", progress=False,
                 tokens=write(tmp_path / "t.jsonl", [{"prompt_ids": [1], "output_ids": [999999]}]))
    with pytest.raises(UserError, match="exactly one of --conversations and --tokens"):
        generate(target, tmp_path / "c.jsonl", tmp_path / "d2", tokens=tmp_path / "t.jsonl")
    with pytest.raises(UserError, match="--regenerate: not with --tokens"):
        generate(target, None, tmp_path / "d3", tokens=tmp_path / "t.jsonl", regen=True)
    assert encode_record({"prompt_ids": [1, 2], "output_ids": [3, 4]}, 3, 10, "x") == ([1, 2, 3], [0, 0, 1])


def test_q_from_the_stored_normaliser_equals_the_full_softmax(target, tmp_path):
    """The trainer's fast path (q over the draft vocabulary = exp(f W_D^T - lse)) gives the
    losses and gradients of the full softmax restricted to D."""
    from vllm_hass.fixtures import head_config_for, target_config
    from vllm_hass.head import HassHead
    from vllm_hass.train.draft_vocab import DraftVocab
    from vllm_hass.train.fit import Recipe, batch_forward, load_shared

    recs = [{"prompt_ids": [5, 6, 7], "output_ids": list(range(20 + 9 * k, 40 + 9 * k))}
            for k in range(3)]
    generate(target, None, tmp_path / "data", tokens=write(tmp_path / "t.jsonl", recs), topk=10,
             progress=False)
    samples = Samples(tmp_path / "data")
    batch = collate([samples[i] for i in range(3)])
    assert "lse" in batch
    cfg = head_config_for(target_config(target))
    embed, lm_head = load_shared(target)
    vocab = DraftVocab.from_ids(torch.arange(0, cfg.vocab_size, 3), cfg.vocab_size, {})
    rows = lm_head[vocab.ids].contiguous()
    out = []
    for f32 in (None, rows):  # the full softmax, then the stored normaliser
        torch.manual_seed(0)
        head = HassHead(cfg).float()
        st = batch_forward(head, batch, embed, lm_head, Recipe(steps=2), 1.0, None, True,
                           vocab, rows, lm_draft_f32=f32)
        out.append((st, {n: p.grad.clone() for n, p in head.named_parameters()}))
    (a, ga), (b, gb) = out
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    for x, y in zip(a["steps"], b["steps"]):
        assert x["n"] == y["n"] > 0 and x["hit"] == y["hit"]
        assert x["p"] == pytest.approx(y["p"], rel=1e-5)
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], rtol=1e-4, atol=1e-7)


@pytest.mark.engine
def test_gen_writes_vllms_own_ids_and_leaves_evaluation_prompts_out(bigram_target, tmp_path):
    """vLLM answers in one batched run; greedy replies are the target's greedy tokens
    (transformers agrees on the bigram target), the mix is the one asked for, and an
    MT-bench question in the prompt file never becomes training data."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_hass.bench.datasets import load_texts
    from vllm_hass.train.selfdistill import run_gen

    tgt = tmp_path / "target"
    shutil.copytree(bigram_target, tgt)
    cfg_p = tgt / "tokenizer_config.json"
    cfg = json.loads(cfg_p.read_text())
    cfg_p.write_text(json.dumps({**cfg, "chat_template": CHATML}))
    mt = load_texts("mtbench", 1)[0]
    texts = ["The quick brown fox", mt, "def add(a, b):", "Once upon a time", "for i in range"]
    prompts = write(tmp_path / "p.jsonl", [{"prompt": t} for t in texts])
    args = types.SimpleNamespace(target=str(tgt), prompts=str(prompts), num_prompts=4, skip=0,
                                 max_prompt_tokens=64, max_tokens=6, greedy_fraction=0.5, seed=3,
                                 out=str(tmp_path / "t.jsonl"), force=False, eval_data=False)
    assert run_gen(args) == 0
    recs = read_records(tmp_path / "t.jsonl")
    tok = AutoTokenizer.from_pretrained(str(tgt))
    kept = [t for t in texts if t != mt]
    assert [r["prompt_ids"] for r in recs] == [
        tok(tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                    add_generation_prompt=True), add_special_tokens=False)["input_ids"]
        for t in kept]
    assert [r["temperature"] for r in recs] == [1.0, 0.0, 1.0, 0.0]  # is_greedy(i, 0.5)
    model = AutoModelForCausalLM.from_pretrained(str(tgt), dtype=torch.float32)
    for r in recs:
        assert 1 <= len(r["output_ids"]) <= 6 and r["finish_reason"] in ("stop", "length")
        if r["temperature"] == 0:
            x = torch.tensor([r["prompt_ids"]])
            g = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=6,
                               do_sample=False, eos_token_id=1, pad_token_id=0)[0, x.shape[1]:].tolist()
            assert r["output_ids"] == (g[:g.index(1) + 1] if 1 in g else g)
    with pytest.raises(UserError, match="exists"):
        run_gen(args)


def test_evaluation_prompts_never_become_training_data(target, tmp_path):
    """`train gen --prompts mtbench` needs --eval-data; data made from such records is
    marked, and `train fit` refuses it in one line."""
    from vllm_hass.train.fit import fit
    from vllm_hass.train.selfdistill import run_gen

    args = types.SimpleNamespace(target=str(target), prompts="mtbench", num_prompts=4, skip=0,
                                 max_prompt_tokens=64, max_tokens=6, greedy_fraction=1.0, seed=0,
                                 out=str(tmp_path / "t.jsonl"), force=False, eval_data=False)
    with pytest.raises(UserError, match="--prompts mtbench: an evaluation set; pass --eval-data"):
        run_gen(args)
    args.prompts, args.eval_data = "sharegpt", True
    with pytest.raises(UserError, match="--eval-data: expects"):
        run_gen(args)
    recs = [{"prompt_ids": [5, 6, 7], "output_ids": list(range(20, 40)), "eval": True}] * 6
    generate(target, None, tmp_path / "data", tokens=write(tmp_path / "e.jsonl", recs), progress=False)
    assert Samples(tmp_path / "data").meta["eval_only"] is True
    with pytest.raises(UserError, match="made from evaluation prompts"):
        fit(target=str(target), data=str(tmp_path / "data"), out=str(tmp_path / "h"), epochs=1)
