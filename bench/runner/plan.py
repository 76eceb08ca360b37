"""`plan`: what `execute` would do for a resolved config, found without loading a model (`--dry-run`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import editors
from bench.models import MODEL_ALIASES, ModelLoadError
from bench.runner.resolve import Resolved
from bench.store import ResultStore


def plan(res: Resolved, results_dir: str | Path, cache_dir: str | Path | None = None,
         force: bool = False) -> dict[str, Any]:
    """What `execute` would do for `res`, found without loading a model: `bench run --dry-run`.


    The stored `ok` twin (skip) and the model's cache folder are known now; the keys of hyper-network
    checkpoints and MEMIT statistics include the loaded model's key and layer shapes, so whether those
    are reused is decided after the model loads.
    """
    results_dir = Path(results_dir)
    cache = Path(cache_dir) if cache_dir is not None else results_dir
    old = None if force else ResultStore(results_dir).find_ok(res.config_hash)
    cfg = res.cfg
    return {
        "editor": cfg.editor, "model": cfg.model, "task": cfg.task, "n_edits": cfg.n_edits, "seed": cfg.seed,
        "device": res.device.type,
        "config_hash": res.config_hash,
        "hparams": res.config["hparams"],
        "task_config": {k: v for k, v in res.config["task_config"].items() if v is not None},
        "stored_ok_run": old["run_id"] if old else None,
        "action": "skip" if old else "run",
        "model_cache": model_cache_plan(cfg.model, res, cache),
        "prepare": ("nothing to prepare" if res.editor_cls.prepare is editors.Editor.prepare else
                    "checkpoint/statistics reused or computed: decided after the model loads (their key "
                    "needs the loaded model)"),
        "notes": list(res.notes),
    }


def model_cache_plan(model: str, res: Resolved, cache: Path) -> dict[str, Any]:
    """Where the model comes from and whether it is cached, without loading it."""
    alias = MODEL_ALIASES.get(model)
    if alias is not None:
        try:
            folder = alias.folder(cache)
        except ModelLoadError as e:  # its package is not installed
            return {"source": "alias", "folder": None, "cached": False, "note": str(e)}
        cached = folder.is_dir()
        return {"source": "alias", "folder": str(folder), "cached": cached,
                "note": "cached" if cached else f"not cached: {alias.first_use} on first use (minutes)"}
    model_id = res.config.get("model_id")
    extra = ("; the FEVER classifier fine-tuned from it: decided after the model loads"
             if res.task.kind == "cls" else "")
    if Path(model).is_dir():
        return {"source": "folder", "folder": model, "cached": True, "note": f"local folder ({model_id}){extra}"}
    if model_id is not None:
        return {"source": "hub", "folder": None, "cached": True, "note": f"in the Hugging Face cache{extra}"}
    return {"source": "hub", "folder": None, "cached": False,
            "note": f"not in the Hugging Face cache: downloaded on load (needs network){extra}"}
