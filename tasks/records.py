"""Data records of one file or dataset: the accepted formats, their detection, validation and conversion.

`load_file` reads a file with `tasks.base.read_records`; `convert_records` checks and converts records
however they were read (a file, or an `hf:` dataset in tasks/hub_data.py), so both kinds of data go through
the same validation. `tasks/files.py` (the `FileTask`) and `tasks/hub_data.py` both build on this module.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.base import DataError, EditRequest, Field, Unparsed, check_record, read_records


@dataclass(frozen=True)
class RecordFormat:
    """One accepted record schema: how to recognise, validate and convert its records."""

    name: str
    marker_fields: tuple[str, ...]  # all present in a file's first record -> this format
    check: Callable[[str | Path, int, Any], None]
    convert: Callable[[dict], EditRequest]
    # EditRequest field -> the record's field, for errors found after conversion ("[]": list item)
    fields: dict[str, str] = field(default_factory=dict)


@dataclass
class LoadedFile:
    """The valid requests of one data file and where they came from."""

    path: Path
    sha256: str | None  # None for a Hub dataset: its `info["revision"]` identifies the content
    n_records: int
    format: str
    indices: list[int]  # position in the file of each request
    requests: list[EditRequest]
    skipped: int
    fields: dict[str, str] = field(default_factory=dict)  # RecordFormat.fields of its format
    info: dict[str, Any] = field(default_factory=dict)  # extra provenance (url, dataset revision) for data_info


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_nested(path: str | Path, index: int, rec: dict, key: str, spec: Sequence[Field]) -> None:
    """Validate the object under `rec[key]`; errors name the dotted field (e.g. 'a.b')."""
    sub = rec.get(key)
    if sub is None:
        raise DataError(path, index, key, "missing field")
    if not isinstance(sub, dict):
        raise DataError(path, index, key, f"expected an object, got {type(sub).__name__}")
    try:
        check_record(path, index, sub, spec)
    except DataError as e:
        raise DataError(path, index, f"{key}.{e.field_name}", e.problem) from None


def detect_format(path: Path, records: Sequence[Any], formats: Sequence[RecordFormat], task: str) -> RecordFormat:
    """The format whose marker fields the file's first readable record has; a clear error otherwise."""
    at, first = next(((i, r) for i, r in enumerate(records) if not isinstance(r, Unparsed)), (0, records[0]))
    if isinstance(first, Unparsed):
        raise DataError(path, None, None, f"no line could be read; the first: {first.problem}")
    if not isinstance(first, dict):
        raise DataError(path, at, None, f"record is {type(first).__name__}, expected an object")
    for fmt in formats:
        if all(k in first for k in fmt.marker_fields):
            return fmt
    expected = "; ".join(f"{f.name} (fields {', '.join(f.marker_fields)})" for f in formats)
    raise DataError(path, at, None, f"not a {task} file: first record has fields {sorted(first)}; "
                                   f"accepted formats: {expected}")


def load_file(path: str | Path, formats: Sequence[RecordFormat], task: str, skip_bad: bool) -> LoadedFile:
    """Read, detect the format of, validate and convert one data file."""
    path = Path(path)
    records = read_records(path, skip_bad)  # first: a missing file or a folder is a DataError naming it
    return convert_records(path, file_sha256(path), records, formats, task, skip_bad)


def convert_records(path: Path, sha256: str | None, records: Sequence[Any], formats: Sequence[RecordFormat],
                    task: str, skip_bad: bool) -> LoadedFile:
    """Detect the format of, validate and convert records read from `path` (a file, or a dataset's name)."""
    fmt = detect_format(path, records, formats, task)
    out = LoadedFile(path, sha256, len(records), fmt.name, [], [], 0, fmt.fields)
    for i, rec in enumerate(records):
        try:
            fmt.check(path, i, rec)
        except DataError:
            if not skip_bad:
                raise
            out.skipped += 1
            continue
        out.indices.append(i)
        out.requests.append(fmt.convert(rec))
    if not out.requests:
        raise DataError(path, None, None, f"no valid records ({out.skipped} skipped)")
    return out
