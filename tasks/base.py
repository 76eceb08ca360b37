"""Edit requests, the Task interface, the task registry and record validation."""

from __future__ import annotations

import json
import random
import unicodedata
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

DATA_DIR = Path(__file__).parent / "data"


@dataclass(frozen=True)
class EditRequest:
    """One fact to edit, with its equivalent (rephrased) and unrelated probes.

    For causal-LM tasks `target` and `locality_answer` are answer strings; for classification
    tasks they are label names (e.g. "SUPPORTS").
    """

    prompt: str
    target: str
    rephrases: tuple[str, ...]
    locality_prompt: str
    locality_answer: str
    subject: str | None = None
    # CounterFact's probability scores (bench.evaluation.counterfact_scores): the true object the edit replaces,
    # every neighbourhood prompt (answered with target_true) and the fluency generation prompts.
    target_true: str | None = None
    neighborhood_prompts: tuple[str, ...] = ()
    generation_prompts: tuple[str, ...] = ()


class DataError(ValueError):
    """A malformed data record; the message names file, record index and field."""

    def __init__(self, path: str | Path, index: int | None, field_name: str | None, problem: str):
        self.path, self.index, self.field_name, self.problem = str(path), index, field_name, problem
        where = f"{path}"
        if index is not None:
            where += f", record {index}"
        if field_name is not None:
            where += f", field '{field_name}'"
        super().__init__(f"{where}: {problem}")


@dataclass
class TaskConfig:
    """Options shared by every task; `--set key=value` reaches these fields."""

    data: str | None = None  # user file replacing the shipped evaluation data
    train_data: str | None = None  # user file for meta-training
    skip_bad: bool = False  # skip malformed records (counted in the row) instead of failing


class Task(ABC):
    """A source of edit requests with a deterministic, disjoint train / eval split."""

    name: ClassVar[str]
    kind: ClassVar[str] = "lm"  # "lm" (causal LM, token metrics) or "cls" (classification)
    config_cls: ClassVar[type[TaskConfig]] = TaskConfig
    labels: ClassVar[tuple[str, ...]] = ()  # classification label names

    def __init__(self, config: TaskConfig | None = None):
        self.config = config or self.config_cls()
        self.n_skipped = 0
        self.data_info: dict[str, Any] = {}

    @abstractmethod
    def train_split(self) -> list[EditRequest]:
        """Requests for meta-training / statistics; disjoint from `eval_split`."""

    @abstractmethod
    def eval_split(self) -> list[EditRequest]:
        """Requests the benchmark edits."""

    def sample(self, n: int, seed: int) -> list[EditRequest]:
        """Draw `n` distinct evaluation requests, deterministically from `seed`."""
        pool = self.eval_split()
        if n > len(pool):
            raise ValueError(f"task '{self.name}' has {len(pool)} evaluation requests; cannot sample {n} edits")
        idx = random.Random(seed).sample(range(len(pool)), n)
        return [pool[i] for i in idx]

    def sample_batches(self, n: int, k: int, seed: int) -> list[list[EditRequest]]:
        """`k` disjoint batches of `n` evaluation requests, deterministically from `seed`; k = 1 is `sample`."""
        if k == 1:
            return [self.sample(n, seed)]
        pool = self.eval_split()
        if n * k > len(pool):
            raise ValueError(f"task '{self.name}' has {len(pool)} evaluation requests; cannot draw {k} batches of {n}")
        idx = random.Random(seed).sample(range(len(pool)), n * k)
        return [[pool[i] for i in idx[j * n:(j + 1) * n]] for j in range(k)]

    def check_lengths(self, tokenizer: Any, max_length: int, positions: int | None = None) -> None:
        """Check that every probe of every request fits the model, before the run.

        A probe (edit prompt, each rephrase, locality prompt, with its answer) is tokenised as
        `EditableModel.encode` does: the prompt's end is kept to fit `max_length`, the answer is
        never cut. It must tokenise to at least one answer token and fit the model's `positions`
        (`max_length` when unknown); beyond them the position embedding fails with an IndexError.
        A request that does not fit is a DataError naming file, record and field, or, with
        `skip_bad` (and always for shipped data, as for other records unusable under an option),
        dropped from its split and counted in `n_skipped`; requests that fit are never touched,
        so `sample` draws the same requests as before for data without such records.
        """
        if self.kind != "lm":
            return  # classifier inputs are truncated to the model's length and labels are not tokenised
        counter = TokenCounter(tokenizer)
        limit = positions or max_length
        for split in ("eval", "train"):
            self._check_split(split, counter, max_length, limit)

    def _check_split(self, split: str, counter: TokenCounter, max_length: int, limit: int) -> None:
        """`check_lengths` on one split: raise for the first request that does not fit, or drop them all."""
        requests = self.eval_split() if split == "eval" else self.train_split()
        origins = self._origins(split)
        bad: list[int] = []
        for k, (req, origin) in enumerate(zip(requests, origins, strict=True)):
            if (problem := _length_problem(counter, req, max_length, limit)) is None:
                continue
            if not (self.config.skip_bad or origin.shipped):
                raise DataError(origin.path, origin.index, origin.record_field(problem[0], problem[1]), problem[2])
            bad.append(k)
        if not bad:
            return
        first = origins[bad[0]]
        if not self._drop(split, bad):
            raise DataError(first.path, first.index, None, f"{len(bad)} requests do not fit the model's "
                                                           f"{limit} positions and cannot be skipped")
        if split == "eval" and len(bad) == len(requests):
            raise DataError(first.path, None, None, f"no request fits the model's {limit} positions")
        self.n_skipped += len(bad)

    def _origins(self, split: str) -> list[Origin]:
        """Where each request of `split` ("train" or "eval") came from; generated tasks name the split."""
        requests = self.eval_split() if split == "eval" else self.train_split()
        return [Origin(f"task '{self.name}' ({split} split)", k) for k in range(len(requests))]

    def _drop(self, split: str, positions: Sequence[int]) -> bool:
        """Remove the requests at `positions` from `split`; False when the task cannot (generated requests)."""
        return False


@dataclass(frozen=True)
class Origin:
    """Where a request came from: file, record index, and the record's name for each request field."""

    path: str
    index: int | None
    fields: dict[str, str] = field(default_factory=dict)  # EditRequest field -> record field ("[]": list item)
    shipped: bool = False  # the shipped data: unusable records are skipped, never fatal

    def record_field(self, name: str, item: int = 0) -> str:
        """The record's name of request field `name` (item `item` of a list-valued field)."""
        return self.fields.get(name, f"{name}[]" if name == "rephrases" else name).replace("[]", f"[{item}]")


class TokenCounter:
    """Token counts of prompts and answers as `EditableModel.encode` makes them, memoised."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self._prompts: dict[str, int] = {}
        self._answers: dict[str, int] = {}

    def prompt(self, text: str) -> int:
        """Tokens of a prompt, special tokens (e.g. BOS) included."""
        if text not in self._prompts:
            self._prompts[text] = len(self.tokenizer(text, add_special_tokens=True)["input_ids"])
        return self._prompts[text]

    def answer(self, prompt: str, answer: str) -> int:
        """Tokens of an answer after `prompt`; the same separating space as `EditableModel.encode`."""
        text = answer_text(prompt, answer)
        if text not in self._answers:
            self._answers[text] = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return self._answers[text]


def answer_text(prompt: str, answer: str) -> str:
    """The answer as it is tokenised after `prompt`: one separating space unless either side has one."""
    return ("" if (answer[:1].isspace() or prompt[-1:].isspace()) else " ") + answer


def encoded_length(n_prompt: int, n_answer: int, max_length: int) -> int:
    """Length of prompt+answer as `EditableModel.encode` builds it: the prompt's end, at least one token, kept."""
    return min(n_prompt, max(1, max_length - n_answer)) + n_answer


def _probes(req: EditRequest) -> list[tuple[str, int, str, str, str]]:
    """(prompt field, item, prompt, answer field, answer) of each probe the run scores or edits."""
    out = [("prompt", 0, req.prompt, "target", req.target)]
    out += [("rephrases", j, p, "target", req.target) for j, p in enumerate(req.rephrases)]
    out.append(("locality_prompt", 0, req.locality_prompt, "locality_answer", req.locality_answer))
    return out


# A probe text longer than this many characters per model position is refused before it is tokenised:
# no tokenizer packs that many characters into each token of real text, and tokenising megabytes takes hours.
CHARS_PER_POSITION = 64


def _length_problem(counter: TokenCounter, req: EditRequest, max_length: int,
                    limit: int) -> tuple[str, int, str] | None:
    """(field, item, problem) of the first probe of `req` that does not fit the model, or None."""
    chars = CHARS_PER_POSITION * limit
    for p_field, item, prompt, a_field, answer in _probes(req):
        for f, j, text in ((p_field, item, prompt), (a_field, 0, answer)):
            if len(text) > chars:
                return f, j, (f"{'prompt' if f == p_field else 'answer'} is {len(text):,} characters, more than "
                              f"the model's {limit} positions can hold ({CHARS_PER_POSITION} characters per "
                              f"position: {chars:,})")
        n_a = counter.answer(prompt, answer)
        if n_a == 0:
            return a_field, 0, "answer tokenises to no tokens"
        if n_a + 1 > limit:
            return a_field, 0, (f"answer is {n_a} tokens; with the prompt that exceeds the model's "
                                f"{limit} positions")
        # With max_length <= limit the prompt is cut to fit; only a larger max_length needs its length.
        n_p = counter.prompt(prompt) if max_length > limit else max_length
        if (n := encoded_length(n_p, n_a, max_length)) > limit:
            return p_field, item, f"prompt + answer is {n} tokens, more than the model's {limit} positions"
    return None


TASKS: dict[str, type[Task]] = {}


def register_task(name: str) -> Callable[[type[Task]], type[Task]]:
    """Class decorator adding a task to the registry under `name`."""

    def deco(cls: type[Task]) -> type[Task]:
        cls.name = name
        TASKS[name] = cls
        return cls

    return deco


# ----------------------------------------------------------------------------------------------
# Record reading and validation


@dataclass(frozen=True)
class Unparsed:
    """A JSON Lines line that could not be read, kept in its place so that record indices stay the file's."""

    problem: str


# Byte-order marks of the encodings JSON files are sometimes saved in by mistake (longest first).
_WIDE_BOMS = ((b"\xff\xfe\x00\x00", "UTF-32"), (b"\x00\x00\xfe\xff", "UTF-32"),
              (b"\xff\xfe", "UTF-16"), (b"\xfe\xff", "UTF-16"))
_UTF8_BOM = b"\xef\xbb\xbf"
_SAVE_AS = "save the file as UTF-8"


def _read_bytes(path: Path) -> bytes:
    """The file's bytes; DataError when it is missing, a directory or unreadable."""
    if not path.exists():
        raise DataError(path, None, None, "file not found")
    if path.is_dir():
        raise DataError(path, None, None, "is a directory; expected a JSON or JSON Lines file")
    if not path.is_file():  # stat only: opening a FIFO would wait for a writer forever
        raise DataError(path, None, None, "is not a regular file (a FIFO, socket or device); "
                                          "expected a JSON or JSON Lines file")
    try:
        return path.read_bytes()
    except OSError as e:
        raise DataError(path, None, None, f"cannot read the file: {e.strerror or e}") from None


def _check_text_encoding(path: Path, raw: bytes) -> None:
    """DataError for UTF-16/32 (with or without a byte-order mark) and other files with NUL bytes."""
    for bom, name in _WIDE_BOMS:
        if raw.startswith(bom):
            raise DataError(path, None, None, f"is {name} (byte-order mark); {_SAVE_AS}")
    if b"\x00" in raw:  # never in UTF-8 JSON text: UTF-16/32 without a mark, or not a text file
        raise DataError(path, None, None, f"has NUL bytes: UTF-16 or UTF-32 text, or not a text file; {_SAVE_AS}")


def _bad_byte(e: UnicodeDecodeError, raw: bytes) -> str:
    """The undecodable byte and its column, and its line when `raw` has several."""
    line_start = raw.rfind(b"\n", 0, e.start) + 1
    where = f"column {e.start - line_start + 1}"
    if b"\n" in raw:
        line = raw.count(b"\n", 0, e.start) + 1
        where = f"line {line}, {where}"
    return f"not UTF-8: byte 0x{raw[e.start]:02x} at {where}; {_SAVE_AS}"


_TOO_DEEP = "JSON nested too deeply for Python's parser"


def _read_array(path: Path, raw: bytes) -> list[Any]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(path, None, None, _bad_byte(e, raw)) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(path, None, None, f"invalid JSON: {e}") from None
    except RecursionError:
        raise DataError(path, None, None, _TOO_DEEP) from None


def _read_line(raw: bytes, lineno: int) -> Any:
    """One JSON Lines record, or an Unparsed saying why it is not one."""
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        return Unparsed(f"line {lineno} is {_bad_byte(e, raw)}")
    except json.JSONDecodeError as e:
        return Unparsed(f"invalid JSON on line {lineno}: {e}")
    except RecursionError:
        return Unparsed(f"{_TOO_DEEP} on line {lineno}")


def read_records(path: str | Path, skip_bad: bool = False) -> list[Any]:
    """Read a JSON array or JSON Lines file (detected by content) into a list of records.

    Every problem is a DataError naming the file. A JSON Lines line that cannot be read is an
    error naming its record and line; with `skip_bad` it stays in the list as an `Unparsed`, which
    `check_record` rejects, so it is skipped and counted like any other bad record.
    """
    path = Path(path)
    raw = _read_bytes(path)
    _check_text_encoding(path, raw)
    raw = raw.removeprefix(_UTF8_BOM)  # harmless; some editors write it
    stripped = raw.lstrip()
    if not stripped:
        raise DataError(path, None, None, "file is empty")
    if stripped[:1] == b"[":
        records = _read_array(path, raw)
    else:
        records = []
        # Lines end at "\n" only (JSON Lines): U+2028 and friends may stand unescaped inside strings.
        for lineno, line in enumerate(raw.split(b"\n"), start=1):
            if not line.strip():
                continue
            rec = _read_line(line, lineno)
            if isinstance(rec, Unparsed) and not skip_bad:
                raise DataError(path, len(records), None, rec.problem)
            records.append(rec)
    if not records:
        raise DataError(path, None, None, "file holds no records")
    return records


def is_blank(s: str) -> bool:
    """True when `s` shows nothing: only whitespace and invisible format or control characters (U+200B, U+FEFF, ...)."""
    return all(c.isspace() or unicodedata.category(c) in ("Cf", "Cc") for c in s)


@dataclass
class Field:
    """Expected type of one record field: 'str', 'int', 'str_list' (non-empty list of strings)."""

    name: str
    kind: str = "str"
    optional: bool = False
    allow_empty: bool = False


def check_record(path: str | Path, index: int, rec: Any, spec: Sequence[Field]) -> None:
    """Raise DataError naming file, index and field if `rec` does not match `spec`."""
    if isinstance(rec, Unparsed):
        raise DataError(path, index, None, rec.problem)
    if not isinstance(rec, dict):
        raise DataError(path, index, None, f"record is {type(rec).__name__}, expected an object")
    for f in spec:
        if f.name not in rec or rec[f.name] is None:
            if f.optional:
                continue
            raise DataError(path, index, f.name, "missing field")
        v = rec[f.name]
        if f.kind == "str":
            if not isinstance(v, str):
                raise DataError(path, index, f.name, f"expected a string, got {type(v).__name__}")
            if not f.allow_empty and is_blank(v):
                raise DataError(path, index, f.name, "empty string (nothing but whitespace or invisible characters)")
        elif f.kind == "int":
            if not isinstance(v, int) or isinstance(v, bool):
                raise DataError(path, index, f.name, f"expected an integer, got {type(v).__name__}")
        elif f.kind == "str_list":
            if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
                raise DataError(path, index, f.name, "expected a list of strings")
            if not f.allow_empty and (not v or any(is_blank(x) for x in v)):
                raise DataError(path, index, f.name, "empty list, or an empty or invisible string in the list")
        else:  # pragma: no cover - programming error
            raise AssertionError(f.kind)


@dataclass
class Validated:
    """Records that passed validation, with the count of skipped ones."""

    records: list[tuple[int, dict]] = field(default_factory=list)  # (index in file, record)
    skipped: int = 0


def validate_records(
    path: str | Path, records: Sequence[Any], check: Callable[[str | Path, int, Any], None], skip_bad: bool
) -> Validated:
    """Run `check` on each record; raise on the first bad one, or skip and count if `skip_bad`."""
    out = Validated()
    for i, rec in enumerate(records):
        try:
            check(path, i, rec)
        except DataError:
            if not skip_bad:
                raise
            out.skipped += 1
            continue
        out.records.append((i, rec))
    if not out.records:
        raise DataError(path, None, None, "no valid records")
    return out


def split_indices(n: int, train_fraction: float, split_seed: int = 1234) -> tuple[list[int], list[int]]:
    """Deterministic disjoint (train, eval) index lists; independent of the run seed."""
    perm = list(range(n))
    random.Random(split_seed).shuffle(perm)
    k = int(round(n * train_fraction))
    return sorted(perm[:k]), sorted(perm[k:])
