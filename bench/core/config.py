"""Run configuration, its canonical JSON and the config hash."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

DEFAULT_EDITOR = "malmen"
DEFAULT_MODEL = "smollm2-135m"
DEFAULT_TASK = "zsre"
DEFAULT_EDITS = 32


@dataclass(frozen=True)
class RunConfig:
    """What the user asked for; `bench.runner.run.resolve` turns it into the full recorded config."""

    editor: str = DEFAULT_EDITOR
    model: str = DEFAULT_MODEL
    task: str = DEFAULT_TASK
    n_edits: int = DEFAULT_EDITS
    seed: int = 0
    device: str = "auto"
    overrides: dict[str, str] = field(default_factory=dict)
    data: str | None = None
    train_data: str | None = None
    skip_bad: bool = False
    dtype: str = "float32"  # the model's weights: float32 | bfloat16 | float16 (bench.models.DTYPES)
    device_map: str | None = None  # "auto" etc.: from_pretrained spreads the model over the devices (accelerate)
    batches: int | str = 1  # disjoint batches of n_edits, each edited from the unedited model; "all": every full one
    generation: bool = True  # es_gen / gs_gen / ls_gen: greedy decoding from the prompt (bench/evaluation/eval_extra.py)
    cf_scores: bool = True  # CounterFact's probability scores where requests carry target_true
    fluency: bool = False  # ROME's Generation Entropy where requests carry generation prompts (costly: opt-in)
    log_samples: bool = False  # per-probe records in <results>/samples/<run_id>.jsonl
    sequential: int = 0  # T >= 1: T batches of n_edits applied one after another without restoring (bench/runner/sequential.py)


def canonical_json(obj: Any) -> str:
    """Deterministic JSON (sorted keys, no whitespace) used for hashing."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def stable_hash(obj: Any, n: int = 16) -> str:
    """Short sha256 of the canonical JSON of `obj`."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:n]


def parse_sets(items: list[str] | None) -> dict[str, str]:
    """`["k=v", ...]` -> dict; raises ValueError on an item without '='."""
    out: dict[str, str] = {}
    for it in items or []:
        if "=" not in it:
            raise ValueError(f"--set expects key=value, got {it!r}")
        k, v = it.split("=", 1)
        out[k.strip()] = v.strip()
    return out
