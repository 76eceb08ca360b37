"""Cache entries on disk: one folder per entry, written atomically, verified on load, rebuilt when broken.

An entry (a trained tiny model, a fine-tuned classifier, the converted SmolLM2, a hyper-network
checkpoint, one layer's MEMIT statistics) is a folder holding its files and a manifest
(`cache-entry.json`) with the sha256 and size of every other file in it. `write_entry` fills a
temporary sibling folder, writes the manifest, fsyncs files and folder and renames it into place in
one step, so a reader sees the whole entry or none. `check_entry` verifies an entry against its
manifest (sizes, then sha256, memoised per process by (path, size, mtime)); a broken one is renamed
to `<name>.broken-<timestamp>` with a `CacheWarning` naming its path, and the caller rebuilds it.
Entries written before manifests existed are accepted when their files are readable (required files
present, safetensors headers consistent with the file size, JSON parseable).

Standard library only (bench/core: it imports nothing of the project); `bench` and `editors` both import it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import struct
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

MANIFEST = "cache-entry.json"
FORMAT = 1


class CacheWarning(UserWarning):
    """A cache entry was broken (truncated, changed, incomplete) and was moved aside to be rebuilt."""


class BrokenEntry(Exception):
    """Why a cache entry cannot be trusted (raised by `verify_entry`)."""


class CacheEntryError(RuntimeError):
    """A broken cache entry could not be moved aside (e.g. a read-only cache); the message names it."""


# -- digests ----------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    # size and mtime are part of the memo key: a rewritten file is hashed again
    return _read_sha256(Path(path))


def _read_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks (no memo)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cached_file_sha256(path: str | Path) -> str:
    """sha256 of a file (symlinks followed), memoised in this process by (path, size, mtime)."""
    real = os.path.realpath(path)
    st = os.stat(real)
    return _sha256(real, st.st_size, st.st_mtime_ns)


def _files(folder: Path) -> list[Path]:
    """Regular files under `folder` (symlinks followed), hidden names skipped, sorted by relative path."""
    out = []
    for p in folder.rglob("*"):
        rel = p.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts) or not p.is_file():
            continue
        out.append(p)
    return sorted(out, key=lambda p: p.relative_to(folder).as_posix())


def weights_digest(folder: str | Path) -> str:
    """sha256 over the relative names and sha256s of every file of a model folder (weights, config, tokenizer)."""
    folder = Path(folder)
    h = hashlib.sha256()
    for p in _files(folder):
        h.update(f"{p.relative_to(folder).as_posix()}\0{cached_file_sha256(p)}\n".encode())
    return h.hexdigest()


# -- verification -----------------------------------------------------------------------------


def _check_safetensors(path: Path) -> None:
    """Raise BrokenEntry unless the header parses and the file is exactly as long as it says."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > size - 8:
                raise BrokenEntry(f"{path.name}: header length {n} beyond the file's {size} bytes")
            header = json.loads(fh.read(n))
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise BrokenEntry(f"{path.name}: unreadable safetensors header ({e})") from None
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (AttributeError, KeyError, TypeError, ValueError, IndexError) as e:
        raise BrokenEntry(f"{path.name}: malformed safetensors header ({e})") from None
    if 8 + n + end != size:
        raise BrokenEntry(f"{path.name}: {size} bytes, its header describes {8 + n + end}")


def _check_readable(folder: Path) -> None:
    """Entries without a manifest: safetensors consistent with their size, JSON parseable."""
    for p in _files(folder):
        if p.suffix == ".safetensors":
            _check_safetensors(p)
        elif p.suffix == ".json":
            try:
                json.loads(p.read_text())
            except (ValueError, UnicodeDecodeError) as e:
                raise BrokenEntry(f"{p.name}: not valid JSON ({e})") from None


def verify_entry(folder: Path, required: Sequence[str] = ()) -> None:
    """Raise BrokenEntry unless `folder` holds `required` and every file its manifest lists, unchanged."""
    missing = [r for r in required if not (folder / r).is_file()]
    if missing:
        raise BrokenEntry(f"missing {', '.join(missing)}")
    man = folder / MANIFEST
    if not man.is_file():
        _check_readable(folder)  # written before manifests existed
        return
    try:
        files = json.loads(man.read_text())["files"]
    except (ValueError, KeyError, TypeError) as e:
        raise BrokenEntry(f"unreadable {MANIFEST} ({e})") from None
    for rel, want in sorted(files.items()):
        p = folder / rel
        if not p.is_file():
            raise BrokenEntry(f"missing {rel}")
        if p.stat().st_size != want["bytes"]:
            raise BrokenEntry(f"{rel}: {p.stat().st_size} bytes, {want['bytes']} written")
        if cached_file_sha256(p) != want["sha256"]:
            raise BrokenEntry(f"{rel}: sha256 differs from the one written")


def move_aside(folder: Path, why: str) -> Path | None:
    """Rename a broken entry to `<name>.broken-<timestamp>` and warn with its path; None if it is gone."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    dest = folder.with_name(f"{folder.name}.broken-{stamp}-{uuid.uuid4().hex[:6]}")
    try:
        os.rename(folder, dest)
    except FileNotFoundError:  # another process moved it first
        return None
    except OSError as e:
        raise CacheEntryError(f"cache entry {folder} is broken ({why}) and could not be moved aside "
                              f"({type(e).__name__}: {e}); delete it to rebuild it") from None
    warnings.warn(f"cache entry {folder} is broken ({why}); moved aside to {dest.name}, rebuilding it", CacheWarning,
                  stacklevel=3)
    return dest


def check_entry(folder: Path, required: Sequence[str] = ()) -> bool:
    """True if `folder` is a valid entry; False if absent, or broken (then warned about and moved aside)."""
    if not folder.exists():
        return False
    try:
        verify_entry(folder, required)
    except BrokenEntry as e:
        move_aside(folder, str(e))
        return False
    except OSError as e:  # unreadable: permissions, I/O error
        move_aside(folder, f"{type(e).__name__}: {e}")
        return False
    return True


# -- writing ----------------------------------------------------------------------------------


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _seal(tmp: Path) -> None:
    """Write the manifest of everything in `tmp`, make it shareable, and fsync files and folder."""
    files = {p.relative_to(tmp).as_posix(): {"sha256": cached_file_sha256(p), "bytes": p.stat().st_size}
             for p in _files(tmp) if p.name != MANIFEST}
    (tmp / MANIFEST).write_text(json.dumps({"format": FORMAT, "files": files}, indent=1, sort_keys=True))
    tmp.chmod(0o755)  # mkdtemp makes the folder private; the cache is shared (CI jobs, users)
    for p in tmp.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
        _fsync(p)
    _fsync(tmp)


def write_entry(dest: Path, fill: Callable[[Path], Any], *, replace: bool = False) -> bool:
    """Build an entry with `fill(tmp_folder)` and rename it to `dest` atomically; False if an equal one won.

    An existing valid `dest` is kept (it has the same key, so the same content) unless `replace`
    (an entry whose settings differ, e.g. MEMIT statistics of another corpus); an invalid one is
    moved aside first.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        fill(tmp)
        _seal(tmp)
        old = None
        if dest.exists():
            if not replace and check_entry(dest):
                shutil.rmtree(tmp)
                return False
            if dest.exists():  # valid but replaced, or invalid and not moved (e.g. unreadable) aside
                old = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:8]}")
                os.rename(dest, old)
        try:
            os.rename(tmp, dest)
            placed = True
        except OSError:
            if not check_entry(dest):  # not a concurrent writer that finished first
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            placed = False
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        _fsync(dest.parent)
        return placed
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """Exclusive file lock at `path` (created), so parallel processes build a missing entry once."""
    from filelock import (
        FileLock,  # the run lock's package (bench/store/__init__.py), portable where fcntl is not
    )

    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(path):
        yield


def ensure_entry(folder: Path, fill: Callable[[Path], Any], required: Sequence[str] = ()) -> bool:
    """Make `folder` a valid entry, building it with `fill` under a lock if absent or broken; True if built here."""
    if check_entry(folder, required):
        return False
    with locked(folder.parent / f".{folder.name}.lock"):
        if check_entry(folder, required):  # another process built it while we waited
            return False
        write_entry(folder, fill)
        return True
