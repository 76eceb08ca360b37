"""Loaded models shared by the runs of one process: a sweep loads each model once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.models import EditableModel, LoadContext, ModelLoadError, load_model
from bench.runner.errors import UserError
from bench.runner.resolve import Resolved


class ModelCache:
    """Loaded models keyed by (name, content identity, device, task kind, dtype, device map): a sweep loads each once."""


    def __init__(self) -> None:
        self._models: dict[tuple[str, str | None, str, str, str, str | None], EditableModel] = {}


    def get(self, res: Resolved, results_dir: Path, progress: Any) -> EditableModel:
        key = (res.cfg.model, res.config.get("model_id"), str(res.device), res.task.kind, res.cfg.dtype,
               res.cfg.device_map)
        if key not in self._models:
            ctx = LoadContext(res.cfg.model, results_dir, str(res.device), res.task.kind, res.cfg.seed, progress,
                              dtype=res.cfg.dtype, device_map=res.cfg.device_map)
            try:
                self._models[key] = load_model(ctx)
            except ModelLoadError as e:
                raise UserError(str(e)) from None
        return self._models[key]
