"""The public full task data (`--set source=full|auto`): downloaded once into the cache, verified on reuse.

Which files a task has is declared in `tasks` (`FileTask.full_files`, URLs in tasks/sources.py:
ROME's `https://rome.baulab.info/data/dsets/`); fetching them is here because the cache is
`bench/core/cachefs.py` and `tasks` never imports `bench`. Each file is one cache entry
`<cache>/data/<stem>/<name>` (written atomically with its sha256 manifest; a broken entry is moved
aside and fetched again). The sha256 of the first download is pinned in `<cache>/data/<name>.sha256`
(trust on first use): a later download, or a cached copy, with other bytes is an error, never used.
A download is streamed to a temporary file with a progress bar; a short read (fewer bytes than
Content-Length), an HTTP error or a body that is not a JSON data file leaves nothing in the cache.

`python -m bench.runner.download --task zsre` fetches a task's files and prints their sizes, sha256 and
request counts (how the paper's numbers are checked where the files can be downloaded).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.core.cachefs import cached_file_sha256, check_entry, ensure_entry
from tasks.base import DataError, read_records
from tasks.sources import RemoteFile, data_root, offline_reason, reachable

CHUNK = 1 << 20
TIMEOUT_S = 30.0  # per socket operation: a stalled server fails the download, it does not hang the run


class DownloadError(Exception):
    """A full data file could not be fetched or does not match its pinned sha256; the message is one line."""


@dataclass(frozen=True)
class FullData:
    """What `full_data` decided: the local copies (None: use the shipped subset) and why."""

    files: dict[str, Path] | None
    why_not: str | None = None  # set when `auto` fell back to the shipped subset
    notes: tuple[str, ...] = ()  # one line per file downloaded now


def entry_dir(cache: Path, rf: RemoteFile) -> Path:
    """The cache entry folder of one full file."""
    return Path(cache) / "data" / Path(rf.name).stem


def pin_path(cache: Path, rf: RemoteFile) -> Path:
    """Where the sha256 of the first download is kept; outside the entry, so it outlives a rebuilt entry."""
    return Path(cache) / "data" / f"{rf.name}.sha256"


def _read_pin(cache: Path, rf: RemoteFile) -> str | None:
    p = pin_path(cache, rf)
    try:
        return p.read_text().split()[0]
    except FileNotFoundError:
        return None
    except (OSError, IndexError) as e:
        raise DownloadError(f"unreadable sha256 pin {p} ({e}); delete it to trust the next download") from None


def _write_pin(cache: Path, rf: RemoteFile, sha: str) -> None:
    p = pin_path(cache, rf)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.tmp-", dir=p.parent)
    with os.fdopen(fd, "w") as fh:
        fh.write(f"{sha}  {rf.name}\n")  # sha256sum's format
    os.chmod(tmp, 0o644)
    os.replace(tmp, p)


def cached(cache: Path, rf: RemoteFile) -> Path | None:
    """The verified cached copy of `rf`, or None when absent (or broken: then moved aside with a warning)."""
    folder = entry_dir(cache, rf)
    if not check_entry(folder, [rf.name]):
        return None
    return _pinned(cache, rf, folder / rf.name)


def _pinned(cache: Path, rf: RemoteFile, path: Path) -> Path:
    """`path` after checking its sha256 against the pin (pinning it when there is none yet)."""
    sha = cached_file_sha256(path)
    pin = _read_pin(cache, rf)
    if pin is None:
        _write_pin(cache, rf, sha)
    elif pin != sha:
        raise DownloadError(f"{path}: sha256 {sha} differs from {pin}, pinned when {rf.name} was first "
                            f"downloaded ({pin_path(cache, rf)}); delete {path.parent} and the pin to trust a new copy")
    return path


def _transfer(url: str, dest: Path, bar: Any, label: str) -> int:
    """Stream `url` into `dest`; the number of bytes. DownloadError on HTTP errors and short reads."""
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as resp, dest.open("wb") as out:
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            task = bar.add_task(label, total=total)
            got = 0
            while chunk := resp.read(CHUNK):
                out.write(chunk)
                got += len(chunk)
                bar.update(task, advance=len(chunk))
    except urllib.error.HTTPError as e:
        raise DownloadError(f"download of {url} failed: HTTP {e.code} {e.reason}") from None
    except http.client.IncompleteRead as e:
        raise DownloadError(f"download of {url} was truncated (the connection closed {e.expected} bytes early); "
                            "nothing was cached, run again to retry") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", None) or e
        raise DownloadError(f"download of {url} failed: {type(e).__name__}: {reason}") from None
    if total is not None and got != total:
        raise DownloadError(f"download of {url} was truncated: {got} of {total} bytes; nothing was cached, "
                            "run again to retry")
    return got


def _progress_bar(enabled: bool) -> Any:
    """A byte-counting rich progress bar on stderr (disabled: library use and tests)."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                    TimeRemainingColumn(), console=Console(stderr=True), disable=not enabled)


def fetch(rf: RemoteFile, cache: Path, progress: Any = None) -> tuple[Path, bool]:
    """The verified local copy of `rf`, downloaded into the cache if needed; (path, downloaded now)."""
    if (path := cached(cache, rf)) is not None:
        return path, False
    if (reason := offline_reason()) is not None:
        raise DownloadError(f"{rf.name} is not in the cache ({entry_dir(cache, rf)}) and {reason} forbids "
                            "downloading it")
    url = rf.url

    def fill(tmp: Path) -> None:
        target = tmp / rf.name
        with _progress_bar(progress is not None) as bar:
            _transfer(url, target, bar, f"downloading {rf.name}")
        try:  # an error page served with status 200, or a file cut without Content-Length
            read_records(target)
        except DataError as e:
            raise DownloadError(f"download of {url} is not a JSON data file ({e.problem}); nothing was cached") from None
        pin = _read_pin(cache, rf)
        sha = cached_file_sha256(target)
        if pin is not None and pin != sha:
            raise DownloadError(f"{url} changed since it was first downloaded: sha256 {sha}, pinned {pin} "
                                f"({pin_path(cache, rf)}); nothing was cached. Delete the pin to trust the new file")

    built = ensure_entry(entry_dir(cache, rf), fill, [rf.name])
    return _pinned(cache, rf, entry_dir(cache, rf) / rf.name), built


def full_data(files: Iterable[RemoteFile], source: str, cache: Path, progress: Any = None,
              probe: Callable[[str], bool] = reachable) -> FullData:
    """Resolve `source` (auto|full|shipped) for these full files: fetch them, or say why the shipped subset is used.

    `auto` uses the full files when all are cached or their server answers a TCP connection (one
    short probe, skipped when an offline variable is set); once it decides to download, a failed
    download is an error, not a silent fallback.
    """
    files = list(files)
    if source == "shipped" or not files:
        return FullData(None)
    have = {rf.name: p for rf in files if (p := cached(cache, rf)) is not None}
    if len(have) < len(files):
        missing = ", ".join(rf.name for rf in files if rf.name not in have)
        root = data_root()
        reason = offline_reason() or (None if probe(root) else f"{root} is not reachable")
        if reason is not None:
            if source == "full":
                raise DownloadError(f"--set source=full: {missing} not in the cache ({Path(cache) / 'data'}) and "
                                    f"cannot be downloaded ({reason}); use --set source=shipped for the shipped subset")
            return FullData(None, why_not=reason)
    notes = []
    for rf in files:
        if rf.name in have:
            continue
        path, built = fetch(rf, cache, progress)
        have[rf.name] = path
        if built:
            notes.append(f"downloaded {rf.url} into {path} ({path.stat().st_size:,} bytes, sha256 "
                         f"{cached_file_sha256(path)}; pinned)")
    return FullData(have, notes=tuple(notes))


def main(argv: list[str] | None = None) -> int:
    """`python -m bench.runner.download --task T`: fetch a task's full files, print sizes, sha256 and request counts."""
    import tasks

    ap = argparse.ArgumentParser(prog="python -m bench.runner.download", description=main.__doc__)
    ap.add_argument("--task", required=True, choices=sorted(n for n, c in tasks.TASKS.items()
                                                            if getattr(c, "full_files", ())))
    ap.add_argument("--cache-dir", type=Path, default=Path("results"))
    args = ap.parse_args(argv)
    task_cls = tasks.TASKS[args.task]
    try:
        got = full_data(task_cls.full_files, "full", args.cache_dir, progress=True)
    except DownloadError as e:
        print(f"error: {e}")
        return 2
    assert got.files is not None
    try:
        task = task_cls(task_cls.config_cls(source="full"), downloaded=got.files)
    except DataError as e:
        print(f"error: bad data: {e}")
        return 2
    out: dict[str, Any] = {"task": args.task, "files": {
        rf.name: {"url": rf.url, "bytes": got.files[rf.name].stat().st_size, "sha256": cached_file_sha256(got.files[rf.name])}
        for rf in task_cls.full_files}}
    out["data"] = task.data_info
    out["train_requests"], out["eval_requests"] = len(task.train_split()), len(task.eval_split())
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
