"""Where a run's numbers come from: the config hash and task key (data and model folders by content),
and the environment (versions, hardware, git state) recorded in the row."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

from bench.core.config import stable_hash
from bench.core.machine import cpu_env, cpu_model
from bench.store.schema import Env, RecordedConfig


def content_hashes(config: RecordedConfig, model_is_folder: bool) -> tuple[str, str]:
    """(config hash, task key): data files and model folders enter by content, not by their path.


    The paths stay in the recorded config as provenance. The task key (hyper-network checkpoints)
    of the shipped data is the one it always was.
    """
    task_cfg = {k: v for k, v in config["task_config"].items() if k not in ("data", "train_data")}
    data = content_only(config["data"])
    hashed = {**config, "task_config": task_cfg, "data": data}
    if model_is_folder:  # known by `model_id` alone
        del hashed["model"]
    task_key = stable_hash([{**config["task_config"], "data": None, "train_data": None}, data])
    return stable_hash(hashed), f"{config['task']}:{task_key}"


def content_only(data_info: dict[str, Any]) -> dict[str, Any]:
    """`data_info` without the paths of user files (their sha256 stays); shipped files keep their fixed names."""
    out = {}
    for k, v in data_info.items():
        role = k.removesuffix("_path")
        if k.endswith("_path") and data_info.get(f"{role}_source") in ("user", "hf"):
            continue  # FileTask: eval_path / train_path of a user file or dataset (hf: its revision identifies it)
        if k in ("data", "train_data") and isinstance(v, dict):  # FEVER: a user file's facts
            v = {kk: vv for kk, vv in v.items() if kk != "file"}
        out[k] = v
    return out


def environment(device: torch.device) -> Env:
    """Versions and hardware the run used."""
    import transformers


    commit, dirty = _git_state()
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": f"{device.type}: {dev}",
        "threads": torch.get_num_threads(),
        "cpu": cpu_env(),  # model, instruction sets, dispatched kernels, math libraries, pinning variables
        "git_commit": commit,
        "git_dirty": dirty,  # True: the code that ran had uncommitted changes on top of git_commit
    }


def _git_state() -> tuple[str | None, bool | None]:
    """HEAD commit of the checkout holding this code and whether tracked files differ from it."""
    here = Path(__file__).resolve().parent


    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, timeout=5).stdout.strip()


    try:
        commit = git("rev-parse", "HEAD") or None
        dirty = bool(git("status", "--porcelain", "--untracked-files=no")) if commit else None
    except (OSError, subprocess.SubprocessError):
        return None, None
    return commit, dirty
