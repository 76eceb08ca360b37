"""Hyper-network checkpoints: safetensors weights + JSON sidecar under `<cache>/checkpoints/<hash>/`.

Each checkpoint is one cache entry (bench/core/cachefs.py): written atomically with a manifest of sha256s,
verified on load, moved aside and retrained when broken.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import Tensor

from bench.core.cachefs import check_entry, write_entry
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
    """(state dict, sidecar) of a complete, verified checkpoint; None if absent or broken (then moved aside)."""
    if not check_entry(Path(path), required=(WEIGHTS, SIDECAR)):
        return None
    return load_file(str(path / WEIGHTS)), json.loads((path / SIDECAR).read_text())


def save_checkpoint(path: Path, state: dict[str, Tensor], sidecar: dict[str, Any]) -> None:
    """Write weights and sidecar as one cache entry (bench/core/cachefs.py); a valid one already there is kept."""

    def fill(tmp: Path) -> None:
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp / WEIGHTS))
        (tmp / SIDECAR).write_text(json.dumps(sidecar, indent=1, sort_keys=True, default=str))

    write_entry(Path(path), fill)  # a concurrent run that finished first wrote an equivalent checkpoint

