"""The result store: one JSON object per run in `runs.jsonl`, appended under a lock and fsynced.

Guarantees: a row is on disk whole (every byte written, fsynced) or `append` raises `StoreWriteError`
and the file is cut back to where it was; a line that is not a whole row (a killed writer's partial
line, bad UTF-8, JSON that is not a row object, a field the readers use of the wrong type: `ROW_SCHEMA`)
is skipped by every reader with one warning; identical configs run one at a time under
`lock(config_hash)` (`locks/<hash>.lock`).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.store.schema import JSON_TYPES, ROW_SCHEMA, Row, row_problem

__all__ = ["ROW_SCHEMA", "ResultStore", "StoreError", "StoreWriteError", "ensure_cache", "ensure_dir", "parse_row",
           "row_problem"]

STORE_NAME = "runs.jsonl"
LOCKS_DIR = "locks"


class StoreError(Exception):
    """A folder or store file the command needs cannot be created, written or read (the CLI exits 2)."""


class StoreWriteError(StoreError):
    """A finished run's row could not be written to the store (the CLI exits 1: the result is lost)."""


def _reason(e: OSError) -> str:
    return e.strerror or str(e)


def ensure_dir(path: str | Path, what: str = "--results") -> Path:
    """Create the folder `path` if needed and prove a file can be created in it; StoreError naming it otherwise."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise StoreError(f"{what} {path}: is a file, not a folder") from None
    except NotADirectoryError:
        raise StoreError(f"{what} {path}: cannot create the folder, a part of the path is a file") from None
    except OSError as e:
        raise StoreError(f"{what} {path}: cannot create the folder ({_reason(e)})") from None
    try:  # a real file, not os.access: read-only mounts, ACLs and quotas only show when creating one
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-check-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise StoreError(f"{what} {path}: the folder is not writable ({_reason(e)})") from None
    return path


# The cache's subfolders (models, hyper-network checkpoints, MEMIT statistics, downloaded data).
CACHE_SUBDIRS = ("models", "checkpoints", "stats", "data")


def ensure_cache(path: str | Path, what: str = "--cache-dir") -> Path:
    """`ensure_dir`, and a StoreError naming it where one of `CACHE_SUBDIRS` exists but is not a folder."""
    path = ensure_dir(path, what)
    for sub in CACHE_SUBDIRS:
        p = path / sub
        if (p.exists() or p.is_symlink()) and not p.is_dir():
            raise StoreError(f"{what} {path}: {p} is not a folder; the cache keeps its {sub} there "
                             "(move the file away)")
    return path


def parse_row(raw: bytes) -> tuple[Row | None, str]:
    """One stored line -> (row, "") or (None, why it is not a row)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, f"is not valid UTF-8 (byte {e.start + 1})"
    try:
        row = json.loads(text)
    except (ValueError, RecursionError):
        return None, "is not valid JSON"
    if not isinstance(row, dict):
        return None, f"is a JSON {JSON_TYPES.get(type(row), type(row).__name__)}, not a row object"
    if why := row_problem(row):
        return None, why
    return row, ""


def _write_all(fd: int, data: bytes) -> None:
    """os.write until every byte is written: a write may be short (file-size limit, signal, full disk)."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        if n <= 0:  # pragma: no cover - regular files report the error instead
            raise OSError(errno.EIO, "write wrote nothing")
        view = view[n:]


class ResultStore:
    """Append-only JSONL store; existing lines are never rewritten."""

    def __init__(self, results_dir: str | Path):
        self.dir = Path(results_dir)
        self.path = self.dir / STORE_NAME

    def ensure_writable(self, what: str = "--results") -> None:
        """Create the folder and check that rows can be stored there, before any work; StoreError otherwise."""
        ensure_dir(self.dir, what)
        if self.path.exists() and (not self.path.is_file() or not os.access(self.path, os.R_OK | os.W_OK)):
            raise StoreError(f"{what} {self.dir}: the store {self.path} is not a readable and writable file")

    @contextmanager
    def lock(self, config_hash: str, log: Callable[[str], Any] | None = None) -> Iterator[None]:
        """Hold this config's lock (`locks/<hash>.lock`): identical runs check, run and store one at a time."""
        from filelock import FileLock, Timeout

        path = self.dir / LOCKS_DIR / f"{config_hash}.lock"
        lock = FileLock(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                lock.acquire(timeout=0)
            except Timeout:
                if log is not None:
                    log(f"waiting: another run of this config (hash {config_hash}) holds {path}")
                lock.acquire()
        except OSError as e:
            raise StoreError(f"cannot take the run lock {path}: {_reason(e)}") from None
        try:
            yield
        finally:
            lock.release()

    def append(self, row: Row) -> None:
        """Append one row as a whole line under an exclusive lock, fsynced; StoreWriteError if it cannot be."""
        line = (json.dumps(row, sort_keys=True, allow_nan=True) + "\n").encode()
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as e:
            raise StoreWriteError(f"could not store the row in {self.path}: {_reason(e)}") from e
        try:
            size = self._append_locked(fd, line)
        except OSError as e:
            raise StoreWriteError(f"could not store the row in {self.path}: {_reason(e)}; "
                                  "the run's result is not stored") from e
        finally:
            os.close(fd)  # also releases the lock
        if size == 0:  # a new file: its directory entry must reach the disk too
            self._fsync_dir()

    @staticmethod
    def _append_locked(fd: int, line: bytes) -> int:
        """Write `line` whole at the end under flock and fsync; on failure cut the file back. Returns the old size."""
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        # A crashed writer may have left a partial last line; start on a fresh line so it stays isolated.
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = b"\n" + line
        try:
            _write_all(fd, line)
            os.fsync(fd)
        except OSError:
            try:  # remove the half row: we hold the lock, so nothing was appended after it
                os.ftruncate(fd, size)
            except OSError:
                pass  # the partial line stays; readers skip it and the next append starts a fresh line
            raise
        return size

    def _fsync_dir(self) -> None:
        try:
            fd = os.open(self.dir, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(fd)
        except OSError:
            pass  # some file systems cannot fsync a directory; the row itself is fsynced
        finally:
            os.close(fd)

    def rows(self) -> Iterator[Row]:
        """All whole rows; a line that is not one (killed writer, bad byte, not a row object) is skipped with a warning."""
        try:
            f = open(self.path, "rb")  # bytes, decoded per line: one bad byte loses only its line
        except FileNotFoundError:
            return
        except NotADirectoryError:
            raise StoreError(f"--results {self.dir}: is not a folder") from None
        except OSError as e:
            raise StoreError(f"cannot read the result store {self.path}: {_reason(e)}") from None
        with f:
            for i, raw in enumerate(f):
                if not raw.strip():
                    continue
                row, why = parse_row(raw)
                if row is None:
                    warnings.warn(f"{self.path}: line {i + 1} {why}; ignored", stacklevel=2)
                else:
                    yield row

    def find_ok(self, config_hash: str) -> Row | None:
        """The newest `ok` row with this config hash, if any."""
        found = None
        for row in self.rows():
            if row.get("config_hash") == config_hash and row.get("status") == "ok":
                found = row
        return found
