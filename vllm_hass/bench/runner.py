"""Plan the bench's configurations, run each in a fresh process, collect the numbers.

A configuration is a name plus the `speculative_config` handed to `vllm.LLM`
(None for no speculation); the oracle is one more process. HASS chain and tree
are plain configurations too: the spec file's dict, minus or plus `tree`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from vllm_hass.bench.worker import PROGRESS
from vllm_hass.errors import UserError


@dataclasses.dataclass
class Config:
    name: str
    speculative_config: dict | None
    oracle: str | None = None  # the oracle shape with the same drafting
    notes: list[str] = dataclasses.field(default_factory=list)
    skip: str | None = None  # why it is not run


def load_spec(path: Path):
    """The head's hass.json, validated the way the plugin validates it."""
    from vllm_hass.config import parse_spec

    return parse_spec(path)


def plugin_available() -> bool:
    return importlib.util.find_spec("vllm_hass.plugin") is not None


def chain_k(settings: dict, spec) -> int:
    """Chain length: --chain-k, else the spec's (chain spec), else the tree's depth (so both
    draft the same number of levels)."""
    if settings["chain_k"]:
        return settings["chain_k"]
    if spec.tree is None:
        return spec.num_speculative_tokens
    return (settings["tree"] or spec.tree.to_dict())["depth"]


def plan(settings: dict, spec, out: Path) -> tuple[list[Config], list[dict]]:
    """Engine configurations and oracle shapes for this run (spec: a HassSpec or None)."""
    wanted = settings["configs"]
    configs: list[Config] = []
    shapes: list[dict] = []
    if spec is None:
        return [Config("nospec", None)], []
    k = chain_k(settings, spec)
    # a spec with "tree": "auto": hass-tree runs its bounds as a fixed tree (the largest)
    fixed = {k: v for k, v in spec.tree.to_dict().items() if k != "auto"} if spec.tree else None
    tree = settings["tree"] or fixed
    chain_shape = f"oracle-chain-k{k}"
    tree_shape = f"oracle-tree-{tree['depth']}-{tree['top_k']}-{tree['total_tokens']}" if tree else None
    if "nospec" in wanted:
        configs.append(Config("nospec", None))
    if "eagle" in wanted:
        from vllm_hass.bench.stock import stock_copy

        path, dropped = stock_copy(spec.model, out / "stock-head")
        notes = [f"stock drops {', '.join(dropped)}"] if dropped else []
        configs.append(Config("eagle", {"method": "eagle", "model": str(path.resolve()),
                                        "num_speculative_tokens": k}, chain_shape, notes))
    no_plugin = None if plugin_available() else "vllm_hass.plugin is not installed"
    # --draft-vocab V1,V2: every HASS configuration (and oracle shape) once per draft
    # vocabulary size, named ...-v4096 / ...-vfull; without it the spec's own.
    vocabs = settings.get("draft_vocab") or [spec.draft_vocab_size]
    if settings.get("draft_vocab"):
        from vllm_hass.config import check_model_dir, resolve_draft_vocab

        head_cfg = check_model_dir("--spec", Path(spec.model))
        for v in vocabs:
            resolve_draft_vocab("--draft-vocab", v, head_cfg, Path(spec.model), (tree or {}).get("top_k", 1))
    for v in vocabs:
        sfx = "" if not settings.get("draft_vocab") else f"-v{v or 'full'}"
        hass = {"method": "hass", "model": spec.model, **spec.passthrough, "draft_vocab_size": v}
        if "hass-chain" in wanted:
            configs.append(Config(f"hass-chain{sfx}", {**hass, "num_speculative_tokens": k},
                                  chain_shape + sfx, skip=no_plugin))
        if "hass-tree" in wanted:
            skip = no_plugin or (None if tree else "no tree: give the spec a 'tree' or pass --tree")
            configs.append(Config(f"hass-tree{sfx}", {**hass, "tree": tree} if tree else None,
                                  tree_shape + sfx if tree else None, skip=skip))
        if "hass-auto" in wanted:  # the plugin picks each step's shape (its choices: report)
            configs.append(Config(f"hass-auto{sfx}", {**hass, "tree": "auto"}, None, skip=no_plugin))
        if "oracle" in wanted:
            shapes.append({"name": chain_shape + sfx, "k": k, "draft_vocab_size": v})
            if tree:
                shapes.append({"name": tree_shape + sfx, "tree": tree, "draft_vocab_size": v})
    return configs, shapes


def worker_env(device: str) -> dict:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if device == "cpu":
        # In-process engine core: get_metrics() reads the counters in this process,
        # and CPU runs avoid a second copy of the model.
        env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        # vLLM's CPU spec decode wants Intel OpenMP; without it timings swing wildly.
        iomp = Path(sys.prefix) / "lib" / "libiomp5.so"
        if iomp.exists() and "libiomp5" not in env.get("LD_PRELOAD", ""):
            env["LD_PRELOAD"] = ":".join(p for p in (str(iomp), env.get("LD_PRELOAD", "")) if p)
    return env


def run_worker(job: dict, name: str, jobs_dir: Path, device: str, on_progress,
               resume: bool = False) -> tuple[dict | None, str | None]:
    """Run one job in a fresh process. Returns (result, None) or (None, one-line error).

    With resume, a finished result whose job file is identical to this job is reused
    (an interrupted bench then redoes only what it had not finished)."""
    jobs_dir = jobs_dir.resolve()
    job_path, result_path, log_path = (jobs_dir / f"{name}.{ext}" for ext in ("job.json", "result.json", "log"))
    if resume and result_path.exists() and job_path.exists():
        try:
            same = json.loads(job_path.read_text()) == json.loads(json.dumps(job))
        except ValueError:
            same = False
        if same:
            result = json.loads(result_path.read_text())
            for _ in range(job_units(job)):
                on_progress()
            return result, None
    job_path.write_text(json.dumps(job))
    result_path.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "vllm_hass.bench.worker", str(job_path), str(result_path)]
    with open(log_path, "w") as log:
        # cwd away from the repo root: its triton_kernels/ folder would shadow OpenAI's
        # package of that name, which vLLM probes for.
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=worker_env(device), bufsize=1, cwd=jobs_dir)
        for line in proc.stdout:
            if line.startswith(PROGRESS):
                on_progress()
            else:
                log.write(line)
        rc = proc.wait()
    if rc == 0 and result_path.exists():
        return json.loads(result_path.read_text()), None
    return None, f"exit {rc}: {last_error(log_path, rc)} (log: {log_path})"


def job_units(job: dict) -> int:
    """Progress-bar units a job reports: one per engine run, one per oracle prompt and shape."""
    if job["kind"] == "oracle":
        return len(job["shapes"]) * len(job["prompts"])
    return len(job["batch_sizes"]) * len(job["temperatures"])


EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt): ")


def last_error(log_path: Path, rc: int) -> str:
    """The final exception line of the worker's log, else how it died."""
    text = log_path.read_text(errors="replace") if log_path.exists() else ""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if EXCEPTION_LINE.match(ln):
            return ln[:200]
    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return lines[-1][:200] if lines else "no output"


def merge_rounds(results: list[dict]) -> dict:
    """One result per configuration from its rounds: the first round's counters and tokens
    (identical across rounds: same prompts, seeds and greedy/seeded sampling), each run's
    elapsed time the median over rounds, every round's kept in elapsed_rounds."""
    import statistics

    merged = json.loads(json.dumps(results[0]))
    for i, run in enumerate(merged["runs"]):
        times = [r["runs"][i]["elapsed_s"] for r in results]
        run["elapsed_rounds"] = times
        run["elapsed_s"] = statistics.median(times)
    return merged


class Bench:
    def __init__(self, settings: dict):
        self.s = settings

    @classmethod
    def from_settings(cls, settings: dict) -> "Bench":
        return cls(settings)

    def device(self) -> str:
        import torch

        want = self.s["device"]
        has_cuda = torch.cuda.is_available()
        if want == "cuda" and not has_cuda:
            raise UserError("--device cuda: torch sees no CUDA device here (use --device cpu)")
        return want if want != "auto" else ("cuda" if has_cuda else "cpu")

    def prompts(self) -> list[list[int]]:
        from transformers import AutoTokenizer

        from vllm_hass.bench import datasets

        texts = datasets.load_texts(self.s["dataset"], self.s["num_prompts"])
        tok = AutoTokenizer.from_pretrained(str(self.s["target"]))
        return datasets.encode(texts, tok, self.s["max_prompt_len"])

    def max_model_len(self, prompts, configs) -> int:
        from vllm_hass.converters.convert import target_config

        margin = 8
        for c in configs:
            sc = c.speculative_config or {}
            tree = sc.get("tree") if isinstance(sc.get("tree"), dict) else {}
            if sc.get("tree") == "auto":  # sized by the default bounds (the largest tree)
                margin = max(margin, 60 + 10 * 6 + 8)
            margin = max(margin, sc.get("num_speculative_tokens", 0) + 8, tree.get("total_tokens", 0)
                         + tree.get("top_k", 0) * tree.get("depth", 0) + 8)
        need = max(map(len, prompts)) + self.s["max_tokens"] + margin
        limit = target_config(self.s["target"]).get("max_position_embeddings")
        if limit and need > limit:
            raise UserError(
                f"--max-tokens {self.s['max_tokens']}: longest prompt ({max(map(len, prompts))} tokens) "
                f"+ output + draft margin = {need} exceeds the target's max_position_embeddings {limit}"
            )
        return need

    def run(self) -> int:
        from tqdm import tqdm

        from vllm_hass.bench import report

        s = self.s
        device = self.device()
        out = s["out"]
        jobs_dir = out / "jobs"
        jobs_dir.mkdir(parents=True, exist_ok=True)
        spec = load_spec(s["spec"]) if s["spec"] else None
        prompts = self.prompts()
        configs, shapes = plan(s, spec, out)
        vllm_dtype = s["dtype"] if s["dtype"] != "auto" else ("float32" if device == "cpu" else "auto")
        oracle_dtype = s["dtype"] if s["dtype"] != "auto" else "float32"
        eager = device == "cpu" or s["eager"]
        max_len = self.max_model_len(prompts, configs)
        runnable = [c for c in configs if c.skip is None]
        total = (len(runnable) * len(s["batch_sizes"]) * len(s["temperatures"]) * s.get("rounds", 1)
                 + len(shapes) * len(prompts))
        engine_results: dict[str, dict] = {}
        oracle_results: list[dict] = []
        t0 = time.perf_counter()
        with tqdm(total=total, unit="run", dynamic_ncols=True) as bar:
            # Rounds alternate the configurations (A B A B ...): machine drift hits all
            # alike; each run's time is the median over rounds (merge_rounds).
            rounds: dict[str, list[dict]] = {}
            for rnd in range(s.get("rounds", 1)):
                for c in runnable:
                    if c.skip is not None:
                        continue
                    bar.set_description(c.name if s.get("rounds", 1) == 1 else f"{c.name} r{rnd + 1}")
                    job = {
                        "kind": "engine", "target": str(s["target"].resolve()),
                        "speculative_config": c.speculative_config, "prompts": prompts,
                        "batch_sizes": s["batch_sizes"], "temperatures": s["temperatures"],
                        "max_tokens": s["max_tokens"], "dtype": vllm_dtype, "enforce_eager": eager,
                        "max_model_len": max_len, "seed": s["seed"],
                    }
                    if (c.speculative_config or {}).get("tree") == "auto":
                        job["auto_stats"] = str((jobs_dir / f"{c.name}.r{rnd + 1}.auto.json").resolve())
                    name = c.name if rnd == 0 else f"{c.name}.r{rnd + 1}"
                    result, err = run_worker(job, name, jobs_dir, device, lambda: bar.update(1),
                                             s.get("resume", False))
                    if err:
                        c.skip = f"failed: {err}"
                        tqdm.write(f"{c.name}: {c.skip}")
                        rounds.pop(c.name, None)
                    else:
                        rounds.setdefault(c.name, []).append(result)
            engine_results = {name: merge_rounds(rs) for name, rs in rounds.items()}
            if shapes:
                bar.set_description("oracle")
                job = {"kind": "oracle", "target": str(s["target"].resolve()), "head": spec.model,
                       "prompts": prompts, "max_tokens": s["max_tokens"], "shapes": shapes,
                       "dtype": oracle_dtype, "device": device}
                result, err = run_worker(job, "oracle", jobs_dir, device, lambda: bar.update(1),
                                         s.get("resume", False))
                if err:
                    tqdm.write(f"oracle: failed: {err}")
                    oracle_results = [{"name": sh["name"], "error": err} for sh in shapes]
                else:
                    oracle_results = result["oracle"]
        meta = {
            "target": str(s["target"]), "spec": str(s["spec"]) if s["spec"] else None,
            "head": spec.model if spec else None, "dataset": s["dataset"],
            "num_prompts": len(prompts), "max_tokens": s["max_tokens"],
            "batch_sizes": s["batch_sizes"], "temperatures": s["temperatures"],
            "device": device, "dtype": vllm_dtype, "oracle_dtype": oracle_dtype,
            "enforce_eager": eager, "max_model_len": max_len, "seed": s["seed"], "resumed": s.get("resume", False),
            "rounds": s.get("rounds", 1), "draft_vocab": s.get("draft_vocab"),
            "wall_s": round(time.perf_counter() - t0, 1), **report.versions(),
            "command": " ".join(sys.argv),
        }
        results = report.assemble(meta, configs, engine_results, oracle_results)
        paths = report.write(results, out)
        print(report.markdown(results))
        print("wrote " + ", ".join(str(p) for p in paths))
        return 0 if "nospec" not in s["configs"] or "nospec" in engine_results else 1
