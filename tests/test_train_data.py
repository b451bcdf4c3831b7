"""Training data: chat template + assistant-only loss mask, features exactly as vLLM hands
them to an EAGLE drafter, resumable generation, self-distillation."""

import json

import pytest
import torch

from vllm_hass.errors import UserError
from vllm_hass.fixtures import make_target
from vllm_hass.train.data import Samples, batches, encode, generate, load_tokenizer, normalize

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
          "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|im_start|>assistant\\n' }}{% endif %}")

CONVS = [
    {"conversations": [{"from": "human", "value": "Tell me about the quick brown fox."},
                       {"from": "gpt", "value": "The quick brown fox jumps over the lazy dog."},
                       {"from": "human", "value": "And then?"},
                       {"from": "gpt", "value": "Once upon a time there was a little robot."}]},
    {"messages": [{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "Write code."},
                  {"role": "assistant", "content": "def add(a, b): return a + b"}]},
    {"conversations": [{"from": "gpt", "value": "A reply with no question"}]},  # nothing left
    {"conversations": [{"from": "human", "value": "for i in range(10): print(i * i)"},
                       {"from": "gpt", "value": "squares of the first ten numbers"}]},
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    target = make_target(root / "target", seed=0)
    (root / "chatml.jinja").write_text(CHATML)
    (root / "convs.jsonl").write_text("".join(json.dumps(c) + "\n" for c in CONVS))
    return root, target


def test_normalize_roles_and_alternation():
    msgs = normalize({"conversations": [
        {"from": "gpt", "value": "leading reply, dropped"},
        {"from": "human", "value": "q1"}, {"from": "gpt", "value": "a1"},
        {"from": "gpt", "value": "two replies in a row: cut here"},
        {"from": "human", "value": "q2"}]}, "x")
    assert msgs == [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}]
    with pytest.raises(UserError, match="turn needs"):
        normalize({"conversations": [{"from": "robot", "value": "hi"}]}, "x")


def test_loss_mask_covers_exactly_the_replies(tiny):
    root, target = tiny
    tok = load_tokenizer(target, str(root / "chatml.jinja"))
    msgs = normalize(CONVS[0], "x")
    ids, mask = encode(tok, msgs, max_len=10_000)
    assert len(ids) == len(mask)
    masked = tok.decode([t for t, m in zip(ids, mask) if m])
    assert masked == ("The quick brown fox jumps over the lazy dog.<|im_end|>\n"
                      "Once upon a time there was a little robot.<|im_end|>\n")
    short, short_mask = encode(tok, msgs, max_len=7)
    assert short == ids[:7] and short_mask == mask[:7]


def test_missing_chat_template_is_a_user_error(tiny):
    _, target = tiny
    with pytest.raises(UserError, match="no chat template"):
        load_tokenizer(target)


def test_generate_features_topk_and_resume(tiny):
    from transformers import AutoModelForCausalLM

    root, target = tiny
    out = root / "samples"
    kw = dict(max_len=160, topk=5, chat_template=str(root / "chatml.jinja"), progress=False)
    stats = generate(target, root / "convs.jsonl", out, **kw)
    assert stats["written"] == 3 and stats["skipped"] == 1  # CONVS[2] has no user turn
    again = generate(target, root / "convs.jsonl", out, **kw)
    assert again["written"] == 0 and again["existing"] == 4
    with pytest.raises(UserError, match="different settings"):
        generate(target, root / "convs.jsonl", out, **{**kw, "topk": 3})

    samples = Samples(out)
    assert len(samples) == 3 and samples.lengths == [len(samples[i]["input_ids"]) for i in range(3)]
    model = AutoModelForCausalLM.from_pretrained(str(target)).eval()
    s = samples[0]
    ids = s["input_ids"].long()[None]
    with torch.no_grad():
        ref = model(input_ids=ids, output_hidden_states=True)
        # what vLLM gives an EAGLE drafter: the last hidden state after the final norm
        post_norm = model.model(input_ids=ids).last_hidden_state[0]
    torch.testing.assert_close(s["hidden"], post_norm, rtol=1e-5, atol=1e-5)
    # ... which is the lm_head's input: it reproduces the target's logits and top-K
    torch.testing.assert_close(s["hidden"] @ model.lm_head.weight.T, ref.logits[0],
                               rtol=1e-4, atol=1e-4)
    p, i = ref.logits[0].softmax(-1).topk(5, dim=-1)
    assert torch.equal(s["topk_ids"].long(), i)
    torch.testing.assert_close(s["topk_p"], p)


def test_self_distillation_rewrites_replies_deterministically(tiny):
    from safetensors import safe_open

    root, target = tiny
    kw = dict(max_len=256, topk=2, chat_template=str(root / "chatml.jinja"), progress=False,
              regen=True, max_new_tokens=6, limit=2)
    msgs = []
    for name in ("regen_a", "regen_b"):
        generate(target, root / "convs.jsonl", root / name, **kw)
        with safe_open(str(root / name / "0000000.safetensors"), "pt") as f:
            msgs.append(json.loads(f.metadata()["messages"]))
    assert msgs[0] == msgs[1]
    assert [m["role"] for m in msgs[0]] == ["user", "assistant", "user", "assistant"]
    assert msgs[0][0]["content"] == CONVS[0]["conversations"][0]["value"]
    assert msgs[0][1]["content"] != CONVS[0]["conversations"][1]["value"]


def test_batches_respect_token_budget_and_cover_everything():
    lengths = [5, 100, 40, 40, 7, 90, 64, 3, 50, 128]
    got = batches(lengths, max_tokens=128, seed=3, window=4)
    assert sorted(i for b in got for i in b) == list(range(len(lengths)))
    assert all(len(b) * max(lengths[i] for i in b) <= 128 for b in got)
    assert got == batches(lengths, max_tokens=128, seed=3, window=4)
    assert got != batches(lengths, max_tokens=128, seed=4, window=4)
