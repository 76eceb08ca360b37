"""Where a file task's data comes from: the shipped subset or the public full files, and the network checks.

`source` (a task option, `--set source=...`): `shipped` reads the files under `tasks/data/`; `full`
reads the public files the ROME/MEMIT code downloads (kmeng01/rome `dsets/zsre.py`,
`dsets/counterfact.py`: `https://rome.baulab.info/data/dsets/<name>`; kmeng01/memit names the
same files under `https://memit.baulab.info`); `auto` is `full` when those files are cached or
their server answers, the shipped subset otherwise. The default is `shipped`: a run with no
`source` never opens a network connection and gives the same row on every machine; `full` and
`auto` are what a user asks for, and only `auto` probes the server (it uses the answer).

This module only describes the files and checks reachability. Fetching, caching and verifying
them is `bench/runner/download.py` (it uses the cache entries of `bench/core/cachefs.py`; `tasks` never
imports `bench`), which hands the local copies to the task (`FileTask(config, downloaded=...)`).
Standard library only.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from urllib.parse import urlparse

SOURCES = ("auto", "full", "shipped")
DEFAULT_ROOT = "https://rome.baulab.info/data/dsets"
ROOT_ENV = "EDITBENCH_DATA_URL"  # a mirror of DEFAULT_ROOT (the tests point it at a localhost server)
# Any of these set (not 0/false): no network probe, no download; EDITBENCH_OFFLINE is this project's own.
OFFLINE_ENVS = ("EDITBENCH_OFFLINE", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


@dataclass(frozen=True)
class RemoteFile:
    """One public data file: its name under the data root and which split(s) it feeds."""

    name: str
    role: str  # "train", "eval", or "both" (one file split by the task's `full_train_indices`)
    about: str = ""  # what the file is, for messages and docs

    @property
    def url(self) -> str:
        """The file's URL under the data root (`EDITBENCH_DATA_URL` or rome.baulab.info)."""
        return f"{data_root()}/{self.name}"


def data_root() -> str:
    """The URL folder the full files are downloaded from, without a trailing slash."""
    return (os.environ.get(ROOT_ENV) or DEFAULT_ROOT).rstrip("/")


def offline_reason() -> str | None:
    """`NAME=value` of the first offline environment variable that is set, or None."""
    for name in OFFLINE_ENVS:
        value = os.environ.get(name, "")
        if value.strip().lower() not in ("", "0", "false", "no", "off"):
            return f"{name}={value}"
    return None


def reachable(url: str, timeout_s: float = 2.0) -> bool:
    """Whether the host of `url` accepts a TCP connection within `timeout_s` (fails fast, never retries)."""
    parts = urlparse(url)
    if not parts.hostname:
        return False
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout_s).close()
        return True
    except OSError:  # DNS failure, refused, unreachable, timeout
        return False


def check_source(source: str) -> None:
    """ValueError unless `source` is one of SOURCES."""
    if source not in SOURCES:
        raise ValueError(f"source must be one of {', '.join(SOURCES)}, got {source!r}")


HF_PREFIX = "hf:"


def is_hub_spec(path: object) -> bool:
    """Whether a --data / --train-data value names a Hugging Face dataset (`hf:ORG/NAME[:CONFIG][@SPLIT]`)."""
    return isinstance(path, str) and path.startswith(HF_PREFIX)
