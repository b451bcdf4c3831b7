"""hass.json: accepted as dict, JSON string or file; every mistake is one line before
any engine starts."""

import argparse
import json

import pytest

from vllm_hass.config import parse_spec
from vllm_hass.errors import UserError


@pytest.fixture()
def head_dir(identity_head):
    return identity_head


def test_forms_agree(head_dir, tmp_path):
    d = {"method": "hass", "model": str(head_dir), "num_speculative_tokens": 4}
    f = tmp_path / "spec.json"
    f.write_text(json.dumps(d))
    a, b, c = parse_spec(d), parse_spec(json.dumps(d)), parse_spec(str(f))
    assert a.model == b.model == c.model == str(head_dir)
    assert a.num_speculative_tokens == c.num_speculative_tokens == 4
    assert a.tree is None


def test_relative_model_resolves_against_the_file(head_dir):
    spec = parse_spec(str(head_dir / "hass.json"))  # written by convert with "model": "."
    assert spec.model == str(head_dir)


def test_tree_sets_vllm_spec_tokens(head_dir):
    spec = parse_spec({"method": "hass", "model": str(head_dir),
                       "tree": {"depth": 6, "top_k": 10, "total_tokens": 60}})
    assert spec.tree.to_dict() == {"depth": 6, "top_k": 10, "total_tokens": 60}
    assert spec.num_speculative_tokens == 59  # max(total_tokens - 1, top_k * (depth - 1))
    spec = parse_spec({"method": "hass", "model": str(head_dir),
                       "tree": {"depth": 8, "top_k": 8, "total_tokens": 32}})
    assert spec.num_speculative_tokens == 56  # the draft's expansion scratch dominates


BAD = [
    ({"num_speculative_tokens": 3, "speculative_tokens": 2}, "unknown key 'speculative_tokens'"),
    ({"num_speculative_tokens": "3"}, "'num_speculative_tokens' must be an integer >= 1, got '3'"),
    ({"num_speculative_tokens": 0}, "'num_speculative_tokens' must be an integer >= 1, got 0"),
    ({"num_speculative_tokens": True}, "'num_speculative_tokens' must be an integer"),
    ({}, "'num_speculative_tokens' is required without a 'tree'"),
    ({"tree": {"depth": 6, "top_k": 10}}, "'tree.total_tokens' is required"),
    ({"tree": {"depth": 6, "top_k": 10, "total_tokens": 60, "width": 3}}, "unknown key 'tree.width'"),
    ({"tree": {"depth": 0, "top_k": 10, "total_tokens": 60}}, "'tree.depth' must be an integer >= 1"),
    ({"tree": {"depth": 6, "top_k": 10, "total_tokens": 200}}, "'tree.total_tokens' must be <= 128"),
    ({"tree": {"depth": 2, "top_k": 2, "total_tokens": 10}}, "exceeds 1 + the 6 nodes"),
    ({"tree": {"depth": 6, "top_k": 10, "total_tokens": 60}, "num_speculative_tokens": 5},
     "'num_speculative_tokens' is total_tokens - 1 = 59 with a tree"),
    ({"tree": [6, 10, 60]}, "'tree' must be an object"),
    ({"num_speculative_tokens": 3, "draft_tensor_parallel_size": "2"},
     "'draft_tensor_parallel_size' must be an integer"),
    # not a SpeculativeConfig field in vLLM 0.32/0.33 (it would fail deep in pydantic)
    ({"num_speculative_tokens": 3, "disable_by_batch_size": 8}, "unknown key 'disable_by_batch_size'"),
]


@pytest.mark.parametrize("extra,message", BAD, ids=[m for _, m in BAD])
def test_bad_fields(head_dir, extra, message):
    with pytest.raises(UserError) as e:
        parse_spec({"method": "hass", "model": str(head_dir), **extra})
    assert message in str(e.value) and "\n" not in str(e.value)


def test_bad_sources(tmp_path, head_dir, random_target):
    f = tmp_path / "bad.json"
    f.write_text('{"method": "hass", "model": ')
    cases = [
        ('{"method": "hass",', "malformed JSON at column"),
        (str(f), f"{f}: malformed JSON at line 1"),
        (str(tmp_path / "missing.json"), "is neither JSON nor an existing file"),
        ({"method": "hass", "model": str(tmp_path / "nohead"), "num_speculative_tokens": 3},
         "does not exist"),
        ({"method": "hass", "model": str(random_target), "num_speculative_tokens": 3},
         "expected [\"EagleHassLlamaForCausalLM\"]; run `vllm-hass convert"),
        ({"method": "eagle", "model": str(head_dir)}, "'method' must be \"hass\""),
    ]
    for value, message in cases:
        with pytest.raises(UserError) as e:
            parse_spec(value)
        assert message in str(e.value), (value, str(e.value))


def test_cli_type_reports_the_file(tmp_path, head_dir):
    from vllm_hass.vllm_patches import json_or_path

    f = tmp_path / "hass.json"
    f.write_text(json.dumps({"method": "hass", "model": str(head_dir), "k": 3}))
    with pytest.raises(argparse.ArgumentTypeError) as e:
        json_or_path(str(f))
    assert str(e.value).startswith(f"{f}: unknown key 'k'")
    spec = json_or_path(str(head_dir / "hass.json"))
    assert spec["model"] == str(head_dir)  # relative "." resolved against the file


def test_target_mismatch_is_caught_before_the_engine(head_dir, tmp_path):
    """A head converted for another target: named dims, raised while building the config."""
    from vllm.engine.arg_utils import EngineArgs

    from vllm_hass import fixtures

    other = fixtures.make_target(tmp_path / "other", hidden_size=256, num_heads=4)
    args = EngineArgs(model=str(other), speculative_config=str(head_dir / "hass.json"),
                      enforce_eager=True, dtype="float32", max_model_len=256)
    with pytest.raises(UserError) as e:
        args.create_engine_config()
    assert "hidden_size: head 128, target 256" in str(e.value)


def test_user_dict_is_not_modified(head_dir, bigram_target):
    from vllm.engine.arg_utils import EngineArgs

    user = {"method": "hass", "model": str(head_dir), "num_speculative_tokens": 2}
    snapshot = json.dumps(user, sort_keys=True)
    cfg = EngineArgs(model=str(bigram_target), speculative_config=user, enforce_eager=True,
                     dtype="float32", max_model_len=256).create_engine_config()
    assert json.dumps(user, sort_keys=True) == snapshot
    assert cfg.speculative_config.method == "hass"
    assert cfg.speculative_config.num_speculative_tokens == 2
    assert cfg.speculative_config.use_eagle()
