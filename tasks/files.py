"""Tasks whose requests come from data files: format detection, validation, splits, provenance.

A `FileTask` reads its shipped files, or the user's (`TaskConfig.data` replaces the evaluation
pool, `TaskConfig.train_data` the meta-training data), and records in `data_info` each file's
sha256, record count and format, so the run's config hash separates runs on different data.
Records are parsed with the standard library (`read_records`), not `datasets`: arrow's type
inference fails on a whole column and cannot say which record is malformed. The public full files
(`source=full`, tasks/sources.py) replace the shipped ones when the caller passes their local
copies (`downloaded=`); `hf:` data (tasks/hub_data.py) goes through the same validation.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from tasks.base import (
    DATA_DIR,
    DataError,
    EditRequest,
    Origin,
    Task,
    split_indices,
)
from tasks.records import LoadedFile, RecordFormat, load_file
from tasks.sources import DEFAULT_ROOT, RemoteFile, check_source, is_hub_spec

SPLIT_SEED = 1234  # fixed so that splits never depend on the run seed


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
    # The public full data (`source=full`, tasks/sources.py); bench/runner/download.py fetches it.
    full_files: ClassVar[tuple[RemoteFile, ...]] = ()
    full_split: ClassVar[str] = ""  # how a full file with role "both" is split, for data_info["split"]

    def __init__(self, config: Any = None, *, downloaded: Mapping[str, str | Path] | None = None):
        """`downloaded`: RemoteFile name -> local copy of the full files; given, they replace the shipped ones."""
        super().__init__(config)
        self.downloaded = {name: Path(p) for name, p in (downloaded or {}).items()}
        self._full_train: dict[Path, set[int]] = {}
        self._check_source()
        self._splits = self._load()  # "train" / "eval" -> [(origin, request)]

    @abstractmethod
    def formats(self) -> list[RecordFormat]:
        """Accepted record formats, tried in order on a file's first record."""

    def full_train_indices(self, f: LoadedFile) -> set[int]:
        """Record indices of a full file with role "both" that are meta-training; the rest are evaluation."""
        raise NotImplementedError(f"task '{self.name}' has no rule to split {f.path.name}")

    def _check_source(self) -> None:
        """ValueError for an unknown `source`, or `source=full` without the downloaded files it needs."""
        source = getattr(self.config, "source", "shipped")
        check_source(source)
        if source == "shipped" and self.downloaded:
            raise ValueError(f"{self.name}: source=shipped, but downloaded files were given")
        uses_defaults = not (self.config.data and self.config.train_data)
        if source == "full" and uses_defaults and not self.downloaded:
            raise ValueError(f"{self.name}: source=full needs the downloaded files "
                             f"({', '.join(f.name for f in self.full_files) or 'none defined'}); "
                             "bench run fetches them (bench/runner/download.py)")

    def _full_path(self, role: str) -> Path:
        """The local copy of the full file that feeds `role` ("train" or "eval")."""
        for f in self.full_files:
            if f.role in (role, "both"):
                if f.name not in self.downloaded:
                    raise ValueError(f"{self.name}: downloaded files lack {f.name}")
                return self.downloaded[f.name]
        raise ValueError(f"{self.name}: no full file for the {role} split")

    def _full_part(self, f: LoadedFile, role: str,
                   reqs: list[tuple[Origin, EditRequest]]) -> list[tuple[Origin, EditRequest]]:
        """The requests of full file `f` that belong to `role`: all of them, or its share of a "both" file."""
        both = any(rf.name == f.path.name and rf.role == "both" for rf in self.full_files)
        if not both:
            return reqs
        if f.path not in self._full_train:  # one rule, read once for both splits
            self._full_train[f.path] = self.full_train_indices(f)
        train = self._full_train[f.path]
        return [(o, r) for o, r in reqs if (o.index in train) == (role == "train")]

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

    def _without_duplicates(self, reqs: list[tuple[Origin, EditRequest]],
                            source: str) -> list[tuple[Origin, EditRequest]]:
        """The evaluation pool without repeated edit requests (same prompt and target): one fact is edited and
        scored once. In a user's file they are a DataError naming the count and the first; with `skip_bad`,
        and always in the shipped and full data, every repeat after the first is dropped and counted
        (`n_skipped`, `data_info["eval_duplicates"]`, recorded only when there are any)."""
        first: dict[tuple[str, Any], Origin] = {}
        keep: list[tuple[Origin, EditRequest]] = []
        dups: list[tuple[Origin, Origin]] = []
        for o, r in reqs:
            key = (r.prompt, r.target)
            if key in first:
                dups.append((o, first[key]))
            else:
                first[key] = o
                keep.append((o, r))
        if not dups:
            return reqs
        if not (self.config.skip_bad or source in ("shipped", "full")):
            o, was = dups[0]
            raise DataError(o.path, o.index, None,
                            f"{len(dups)} duplicate edit request(s) (same prompt and target) in the evaluation data; "
                            f"the first repeats record {was.index}: each fact must be edited and scored once; "
                            "remove them, or pass --skip-bad to drop the repeats")
        self.n_skipped += len(dups)
        self.data_info["eval_duplicates"] = len(dups)
        return keep

    def _read(self, path: str | Path, skip_bad: bool) -> LoadedFile:
        if is_hub_spec(path):
            from tasks.hub_data import load_hub  # imports `datasets` only when a dataset is asked for

            f = load_hub(str(path), self.formats(), self.name, skip_bad)
        else:
            f = load_file(path, self.formats(), self.name, skip_bad)
        self.n_skipped += f.skipped
        return f

    def _describe(self, role: str, f: LoadedFile, source: str, n_used: int) -> None:
        # A full file is named by its file name (its local folder differs between machines).
        shown = {"shipped": _rel(f.path), "full": f.path.name}.get(source, str(f.path))
        self.data_info.update({
            f"{role}_source": source,
            f"{role}_path": shown,
            f"{role}_sha256": f.sha256,
            f"{role}_records": f.n_records,
            f"{role}_format": f.format,
            f"{role}_skipped": f.skipped,
            f"{role}_requests": n_used,
        })
        self.data_info.update({f"{role}_{k}": v for k, v in f.info.items()})  # only full and hf: files have info

    def _load(self) -> dict[str, list[tuple[Origin, EditRequest]]]:
        cfg = self.config
        shipped_train, shipped_eval = DATA_DIR / self.shipped_train, DATA_DIR / self.shipped_eval
        one_file = shipped_train == shipped_eval
        cache: dict[Path, LoadedFile] = {}

        def shipped(path: Path) -> LoadedFile:
            # Shipped files are valid as shipped; records unusable under an option (e.g. an empty
            # `alt` with target=alt) are skipped and counted rather than failing a default run.
            # The public full files are treated alike: nobody here can fix them.
            if path not in cache:
                cache[path] = self._read(path, skip_bad=True)
            return cache[path]

        def requests(f: LoadedFile, source: str) -> list[tuple[Origin, EditRequest]]:
            return [(Origin(str(f.path), i, f.fields, shipped=source in ("shipped", "full")), r)
                    for i, r in zip(f.indices, f.requests, strict=True)]

        def part(f: LoadedFile, train: bool) -> list[tuple[Origin, EditRequest]]:
            if not one_file:
                return requests(f, "shipped")
            keep = set(split_indices(f.n_records, self.train_fraction, SPLIT_SEED)[0 if train else 1])
            return [(o, r) for o, r in requests(f, "shipped") if o.index in keep]

        def default(role: str) -> tuple[LoadedFile, list[tuple[Origin, EditRequest]], str]:
            """(file, requests, source) of a split the user gave no file for: a full file, or the shipped one."""
            if self.downloaded:
                f = shipped(self._full_path(role))
                f.info["url"] = f"{DEFAULT_ROOT}/{f.path.name}"  # the public file (a mirror serves the same bytes)
                return f, self._full_part(f, role, requests(f, "full")), "full"
            f = shipped(shipped_train if role == "train" else shipped_eval)
            return f, part(f, train=role == "train"), "shipped"

        def user(path: str) -> tuple[LoadedFile, list[tuple[Origin, EditRequest]], str]:
            f, source = self._read(path, cfg.skip_bad), "hf" if is_hub_spec(path) else "user"
            return f, requests(f, source), source

        ev_file, eval_reqs, eval_source = user(cfg.data) if cfg.data else default("eval")
        eval_reqs = self._without_duplicates(eval_reqs, eval_source)
        tr_file, train_reqs, train_source = user(cfg.train_data) if cfg.train_data else default("train")
        # Meta-training on an evaluated edit would inflate the scores; drop shared prompts.
        eval_prompts = {r.prompt for _, r in eval_reqs}
        kept = [(o, r) for o, r in train_reqs if r.prompt not in eval_prompts]
        self._describe("eval", ev_file, eval_source, len(eval_reqs))
        self._describe("train", tr_file, train_source, len(kept))
        self.data_info["train_overlap_dropped"] = len(train_reqs) - len(kept)
        if one_file and not cfg.data and not cfg.train_data and not self.downloaded:
            self.data_info["split"] = f"{self.train_fraction:.0%} train / rest eval, shuffle seed {SPLIT_SEED}"
        if self.downloaded and self.full_split and not cfg.data and not cfg.train_data:
            self.data_info["split"] = self.full_split
        if cfg.data and not cfg.train_data:
            self.data_info["train_note"] = ("no train_data given: meta-training uses the "
                                            f"{'full' if self.downloaded else 'shipped'} train split")
        return {"train": kept, "eval": eval_reqs}
