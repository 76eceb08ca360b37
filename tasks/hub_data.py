"""Edit requests from Hugging Face datasets: `--data hf:ORG/NAME[:CONFIG][@SPLIT]`.

After `hf:` comes what `datasets.load_dataset` takes as a path: a Hub dataset id (e.g. EasyEdit's
`zjunlp/KnowEdit`) or a local folder of data files (JSON, JSON Lines, CSV, Parquet); `:CONFIG`
names a configuration and `@SPLIT` a split (needed when the dataset has several). Its records go
through the task's formats and validation exactly as a file's do, so they must be in one of the
formats the task accepts (docs/data.md); errors name `hf:...`, the record index and the field.

Provenance in the row (`<role>_` = `eval_` / `train_`): `_dataset` (the Hub id; None for a folder),
`_config`, `_split` and `_revision`: the Hub commit `datasets` resolved, or for a local folder the
sha256 over its files' names and contents (also `_sha256`). Offline (an offline variable set, or
the Hub not answering a short TCP probe) only the local Hugging Face cache is tried, at once; a
dataset not in it is one DataError line, not minutes of retries.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.base import DataError
from tasks.records import LoadedFile, RecordFormat, convert_records, file_sha256
from tasks.sources import HF_PREFIX, offline_reason, reachable


@dataclass(frozen=True)
class HubRef:
    """A parsed `hf:` value."""

    name: str  # Hub id or local folder
    config: str | None
    split: str | None


def parse_spec(spec: str) -> HubRef:
    """`hf:ORG/NAME[:CONFIG][@SPLIT]` -> HubRef; DataError when nothing names a dataset."""
    rest = spec.removeprefix(HF_PREFIX)
    rest, at, split = rest.rpartition("@") if "@" in rest else (rest, "", "")
    name, colon, config = rest.partition(":")
    if not name.strip() or (colon and not config) or (at and not split):
        raise DataError(spec, None, None, "expected hf:ORG/NAME[:CONFIG][@SPLIT] (or hf:FOLDER)")
    return HubRef(name.strip(), config or None, split or None)


def folder_digest(folder: Path) -> str:
    """sha256 over the relative names and sha256 of every non-hidden file under `folder`."""
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*"), key=lambda q: q.relative_to(folder).as_posix()):
        rel = p.relative_to(folder)
        if p.is_file() and not any(part.startswith(".") for part in rel.parts):
            h.update(f"{rel.as_posix()}\0{file_sha256(p)}\n".encode())
    return h.hexdigest()


@contextlib.contextmanager
def _offline(on: bool) -> Iterator[None]:
    """Make `datasets` and `huggingface_hub` use their caches only (both read these flags at call time)."""
    if not on:
        yield
        return
    import datasets.config as ds_config
    import huggingface_hub.constants as hub_constants

    saved = ds_config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE
    ds_config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        ds_config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved


def _hub_offline() -> str | None:
    """Why the Hub cannot be used now (an offline variable, or no answer), or None."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    return offline_reason() or (None if reachable(endpoint) else f"{endpoint} is not reachable")


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:240]}"


def load_records(spec: str) -> tuple[list[Any], dict[str, Any], str | None]:
    """(records, provenance, content sha256 or None) of the split `spec` names."""
    ref = parse_spec(spec)
    local = Path(ref.name).expanduser()
    if local.is_file():
        raise DataError(spec, None, None, "is a file; hf: takes a Hub dataset id or a folder (give a file as --data FILE)")
    is_folder = local.is_dir()
    offline = None if is_folder else _hub_offline()
    import datasets

    try:
        with _offline(offline is not None):
            builder = datasets.load_dataset_builder(str(local) if is_folder else ref.name, name=ref.config)
            builder.download_and_prepare()
    except ConnectionError as e:  # offline, and not in the local Hugging Face cache
        raise DataError(spec, None, None, f"the Hugging Face Hub cannot be used ({offline or _first_line(e)}) and the "
                                          "dataset is not in the local Hugging Face cache; run once online, or "
                                          "use --data FILE") from None
    except Exception as e:  # noqa: BLE001 - the library raises many types (missing dataset, config, files); one line each
        raise DataError(spec, None, None, f"cannot load the dataset ({_first_line(e)})") from None
    splits = list(builder.info.splits or {})
    split = ref.split or (splits[0] if len(splits) == 1 else None)
    if split is None or split not in splits:
        what = "has several splits" if ref.split is None else f"has no split {ref.split!r}"
        raise DataError(spec, None, None, f"{what}: {', '.join(splits) or 'none'}; choose one with @SPLIT")
    records = builder.as_dataset(split=split).to_list()
    digest = folder_digest(local) if is_folder else None
    info = {"dataset": None if is_folder else ref.name, "config": builder.config.name, "split": split,
            "revision": f"sha256:{digest}" if digest else builder.hash}
    return records, info, digest


def load_hub(spec: str, formats: Sequence[RecordFormat], task: str, skip_bad: bool) -> LoadedFile:
    """Load an `hf:` dataset split and validate and convert its records as `load_file` does a file's."""
    records, info, digest = load_records(spec)
    if not records:
        raise DataError(spec, None, None, f"split {info['split']!r} holds no records")
    out = convert_records(Path(spec), digest, records, formats, task, skip_bad)
    out.info.update(info)
    return out
