"""Hyper-network checkpoints: safetensors weights + JSON sidecar under `<cache>/checkpoints/<hash>/`."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import Tensor

from tasks.base import EditRequest

WEIGHTS = "hypernet.safetensors"
SIDECAR = "meta.json"
FORMAT = 2  # bump when training code changes what a given key produces


def requests_digest(requests: Sequence[EditRequest]) -> str:
    """Hash of the training requests, so a changed train split never reuses a stale checkpoint."""
    h = hashlib.sha256()
    for r in requests:
        h.update(json.dumps([r.prompt, r.target, list(r.rephrases), r.locality_prompt, r.locality_answer],
                            ensure_ascii=False).encode())
    return h.hexdigest()


def checkpoint_key(**parts: Any) -> str:
    """Short hash of everything the trained weights depend on (canonical JSON)."""
    blob = json.dumps({"format": FORMAT, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def checkpoint_dir(results_dir: Path, key: str) -> Path:
    return Path(results_dir) / "checkpoints" / key


def load_checkpoint(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]] | None:
    """(state dict, sidecar) of a complete checkpoint, or None if there is none."""
    w, s = path / WEIGHTS, path / SIDECAR
    if not (w.exists() and s.exists()):
        return None
    return load_file(str(w)), json.loads(s.read_text())


def save_checkpoint(path: Path, state: dict[str, Tensor], sidecar: dict[str, Any]) -> None:
    """Write weights and sidecar into a temporary folder, then rename it into place (atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp / WEIGHTS))
        (tmp / SIDECAR).write_text(json.dumps(sidecar, indent=1, sort_keys=True, default=str))
        if path.exists():  # a concurrent run finished first; its checkpoint is equivalent
            shutil.rmtree(tmp)
            return
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
