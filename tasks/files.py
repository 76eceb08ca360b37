"""Tasks whose requests come from data files: format detection, validation, splits, provenance.

A `FileTask` reads its shipped files, or the user's (`TaskConfig.data` replaces the evaluation
pool, `TaskConfig.train_data` the meta-training data), and records in `data_info` each file's
sha256, record count and format, so the run's config hash separates runs on different data.
Records are parsed with the standard library (`read_records`), not `datasets`: arrow's type
inference fails on a whole column and cannot say which record is malformed.
"""

from __future__ import annotations

import hashlib
from abc import abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from tasks.base import (
    DATA_DIR,
    DataError,
    EditRequest,
    Field,
    Origin,
    Task,
    Unparsed,
    check_record,
    read_records,
    split_indices,
)

SPLIT_SEED = 1234  # fixed so that splits never depend on the run seed


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
    sha256: str
    n_records: int
    format: str
    indices: list[int]  # position in the file of each request
    requests: list[EditRequest]
    skipped: int
    fields: dict[str, str] = field(default_factory=dict)  # RecordFormat.fields of its format


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
    records = read_records(path, skip_bad)
    fmt = detect_format(path, records, formats, task)
    out = LoadedFile(path, file_sha256(path), len(records), fmt.name, [], [], 0, fmt.fields)
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


def _rel(path: Path) -> str:
    """Shipped files are named relative to tasks/data so that hashes agree across machines."""
    try:
        return str(path.resolve().relative_to(DATA_DIR.resolve()))
    except ValueError:
        return str(path)


class FileTask(Task):
    """A task read from files, with the shipped data as default and user files as overrides."""

    shipped_train: ClassVar[str]  # path under tasks/data/
    shipped_eval: ClassVar[str]  # same path as shipped_train: split it by `train_fraction`
    train_fraction: ClassVar[float] = 0.4

    def __init__(self, config: Any = None):
        super().__init__(config)
        self._splits = self._load()  # "train" / "eval" -> [(origin, request)]

    @abstractmethod
    def formats(self) -> list[RecordFormat]:
        """Accepted record formats, tried in order on a file's first record."""

    def train_split(self) -> list[EditRequest]:
        """Meta-training requests; never shares an edit prompt with the evaluation pool."""
        return [r for _, r in self._splits["train"]]

    def eval_split(self) -> list[EditRequest]:
        """The evaluation pool that `sample` draws edits from."""
        return [r for _, r in self._splits["eval"]]

    def _origins(self, split: str) -> list[Origin]:
        """File and record of each request of `split`."""
        return [o for o, _ in self._splits[split]]

    def _drop(self, split: str, positions: Sequence[int]) -> bool:
        """Remove requests that do not fit the model; `data_info` counts them as `<split>_too_long`."""
        gone = set(positions)
        self._splits[split] = [p for k, p in enumerate(self._splits[split]) if k not in gone]
        self.data_info[f"{split}_too_long"] = self.data_info.get(f"{split}_too_long", 0) + len(gone)
        self.data_info[f"{split}_requests"] = len(self._splits[split])
        return True

    def _read(self, path: str | Path, skip_bad: bool) -> LoadedFile:
        f = load_file(path, self.formats(), self.name, skip_bad)
        self.n_skipped += f.skipped
        return f

    def _describe(self, role: str, f: LoadedFile, source: str, n_used: int) -> None:
        self.data_info.update({
            f"{role}_source": source,
            f"{role}_path": _rel(f.path) if source == "shipped" else str(f.path),
            f"{role}_sha256": f.sha256,
            f"{role}_records": f.n_records,
            f"{role}_format": f.format,
            f"{role}_skipped": f.skipped,
            f"{role}_requests": n_used,
        })

    def _load(self) -> dict[str, list[tuple[Origin, EditRequest]]]:
        cfg = self.config
        shipped_train, shipped_eval = DATA_DIR / self.shipped_train, DATA_DIR / self.shipped_eval
        one_file = shipped_train == shipped_eval
        cache: dict[Path, LoadedFile] = {}

        def shipped(path: Path) -> LoadedFile:
            # Shipped files are valid as shipped; records unusable under an option (e.g. an empty
            # `alt` with target=alt) are skipped and counted rather than failing a default run.
            if path not in cache:
                cache[path] = self._read(path, skip_bad=True)
            return cache[path]

        def requests(f: LoadedFile, source: str) -> list[tuple[Origin, EditRequest]]:
            return [(Origin(str(f.path), i, f.fields, shipped=source == "shipped"), r)
                    for i, r in zip(f.indices, f.requests, strict=True)]

        def part(f: LoadedFile, train: bool) -> list[tuple[Origin, EditRequest]]:
            if not one_file:
                return requests(f, "shipped")
            keep = set(split_indices(f.n_records, self.train_fraction, SPLIT_SEED)[0 if train else 1])
            return [(o, r) for o, r in requests(f, "shipped") if o.index in keep]

        if cfg.data:
            ev_file = self._read(cfg.data, cfg.skip_bad)
            eval_reqs, eval_source = requests(ev_file, "user"), "user"
        else:
            ev_file = shipped(shipped_eval)
            eval_reqs, eval_source = part(ev_file, train=False), "shipped"
        if cfg.train_data:
            tr_file = self._read(cfg.train_data, cfg.skip_bad)
            train_reqs, train_source = requests(tr_file, "user"), "user"
        else:
            tr_file = shipped(shipped_train)
            train_reqs, train_source = part(tr_file, train=True), "shipped"
        # Meta-training on an evaluated edit would inflate the scores; drop shared prompts.
        eval_prompts = {r.prompt for _, r in eval_reqs}
        kept = [(o, r) for o, r in train_reqs if r.prompt not in eval_prompts]
        self._describe("eval", ev_file, eval_source, len(eval_reqs))
        self._describe("train", tr_file, train_source, len(kept))
        self.data_info["train_overlap_dropped"] = len(train_reqs) - len(kept)
        if one_file and not cfg.data and not cfg.train_data:
            self.data_info["split"] = f"{self.train_fraction:.0%} train / rest eval, shuffle seed {SPLIT_SEED}"
        if cfg.data and not cfg.train_data:
            self.data_info["train_note"] = "no train_data given: meta-training uses the shipped train split"
        return {"train": kept, "eval": eval_reqs}
