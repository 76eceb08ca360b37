"""The Editor interface, the Edit result and the editor registry."""

from __future__ import annotations

import contextlib
import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from editors.ranges import BadValue, unparsable, violation
from tasks.base import EditRequest

if TYPE_CHECKING:
    from bench.models import EditableModel


HALF_DTYPES = (torch.bfloat16, torch.float16)


def delta_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype an editor keeps a weight's shift in: float32 for half-precision weights, else the weight's own.

    A bfloat16 shift of a bfloat16 weight would be rounded twice (the shift, then the sum); kept in
    float32 it is rounded once, when added (`add_delta_`).
    """
    return torch.float32 if weight_dtype in HALF_DTYPES else weight_dtype


@torch.no_grad()
def add_delta_(param: Tensor, delta: Tensor) -> None:
    """param += delta, cast to the parameter's device; half-precision weights are summed in float32 and rounded once."""
    d = delta.to(device=param.device)
    if param.dtype in HALF_DTYPES:
        param.copy_(param.float() + d.float())
    else:  # float32/float64: exactly the in-place add of before
        param.add_(d.to(dtype=param.dtype))


@dataclass
class Edit:
    """Additive weight shifts produced by one batch edit, plus diagnostics."""

    deltas: dict[str, Tensor]  # parameter name -> additive shift in the parameter's own layout
    mean_residual: float | None = None  # see bench.evaluation.metrics / docs/design.md; None where undefined
    info: dict[str, Any] = field(default_factory=dict)  # editor-specific diagnostics for the row

    @contextlib.contextmanager
    def applied(self, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """Add the deltas, yield, then restore the original weights bit-exactly."""
        params = dict(model.named_parameters())
        missing = [n for n in self.deltas if n not in params]
        if missing:
            raise KeyError(f"edit names parameters the model does not have: {missing}")
        # Keep exact copies: (w + d) - d is not always w in floating point (in bfloat16 it rarely is).
        saved = {n: params[n].detach().clone() for n in self.deltas}
        try:
            for n, d in self.deltas.items():
                add_delta_(params[n], d)
            yield model
        finally:
            with torch.no_grad():
                for n, w in saved.items():
                    params[n].copy_(w)

    def check_finite(self) -> None:
        """Raise if any delta holds NaN or Inf (the run is then stored as failed)."""
        bad = [n for n, d in self.deltas.items() if not torch.isfinite(d).all()]
        if bad:
            raise FloatingPointError(f"non-finite values in the weight shift of {bad}")


@dataclass
class EditorContext:
    """What an editor needs besides the model: where to cache, seeds, what it is trained for."""

    results_dir: Path = Path("results")
    seed: int = 0
    task_name: str = ""
    task_key: str = ""  # identifies the training data (task + data file hash), for cache keys
    model_key: str = ""  # identifies the model weights, for cache keys
    n_edits: int = 0  # the run's --edits (hyper-network editors meta-train at it by default); 0: unknown
    progress: Callable[..., Any] | None = None  # bench.core.progress factory; None = silent
    log: Callable[[str], None] = print


class Editor(ABC):
    """Turns a batch of edit requests into weight shifts for an EditableModel."""

    name: ClassVar[str]
    hparams_cls: ClassVar[type]
    meta_trains: ClassVar[bool] = False  # prepare() learns from the task's train split
    # Task/model kinds ("lm" causal LM, "cls" classifier) it can edit; `bench.runner.run.resolve` checks it
    # before any model loads (a classifier alias is trained first, minutes lost before a refusal).
    supported_kinds: ClassVar[frozenset[str]] = frozenset({"lm", "cls"})
    # Whether it edits encoder-decoder LMs (T5); checked before a built-in model loads (bench.runner.run.check_fit)
    # and, for a Hugging Face id, by the editor itself once the model is loaded.
    edits_seq2seq: ClassVar[bool] = True

    def __init__(self, model: EditableModel, hparams: Any = None, ctx: EditorContext | None = None):
        self.model = model
        self.hparams = hparams if hparams is not None else self.hparams_cls()
        self.ctx = ctx or EditorContext()

    def prepare(self, train: Sequence[EditRequest]) -> None:  # noqa: B027 - optional hook
        """Meta-train / compute statistics before editing; a no-op by default."""

    @abstractmethod
    def edit(self, requests: Sequence[EditRequest]) -> Edit:
        """Compute one batch edit of all `requests`."""

    def prepare_info(self) -> dict[str, Any]:
        """Facts about `prepare` for the result row (e.g. whether a cache was reused)."""
        return {}

    def remember(self, requests: Sequence[EditRequest]) -> None:  # noqa: B027 - optional hook
        """Sequential editing: the model now keeps this batch's edit; an editor with memory of past batches updates it.

        Called by the run loop after the edit of `requests` was added to the weights for good (the
        next batch is computed on that model). A no-op by default: MALMEN, MEND, MEMIT and fine-tuning
        compute each batch from the model as it is; AlphaEdit accumulates the batch's keys.
        """


EDITORS: dict[str, type[Editor]] = {}


def register_editor(name: str) -> Callable[[type[Editor]], type[Editor]]:
    """Class decorator adding an editor to the registry under `name`."""

    def deco(cls: type[Editor]) -> type[Editor]:
        cls.name = name
        EDITORS[name] = cls
        return cls

    return deco


HPARAMS_DIR = Path(__file__).parent / "hparams"


def model_defaults_path(editor: str, model: str) -> Path:
    """`editors/hparams/<editor>/<model>.json` ('/' in a hub id or path becomes '__'); it may not exist."""
    return HPARAMS_DIR / editor / f"{model.replace('/', '__')}.json"


def model_defaults(editor: str, model: str) -> dict[str, Any]:
    """Per-model hyperparameter defaults from `editors/hparams/<editor>/<model>.json` (MEMIT-repo style).

    Keys starting with '_' (e.g. "_why") are documentation and are dropped.
    """
    import json

    path = model_defaults_path(editor, model)
    if not path.exists():
        return {}
    return {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}


def hparams_from(cls: type, overrides: dict[str, str], defaults: dict[str, Any] | None = None,
                 defaults_from: str = "the per-model defaults") -> Any:
    """Build a hyperparameter dataclass from defaults and `--set` string overrides (typed by field).

    Every given value is checked against the range `cls` declares for its field (editors/ranges.py)
    before the dataclass is built: BadValue, a one-line message naming the key, the value and the
    range, for a `--set` value or a value of `defaults` (read from `defaults_from`).
    """
    kwargs: dict[str, Any] = dict(defaults or {})
    by_name = {f.name: f for f in dataclasses.fields(cls)}
    for k, v in kwargs.items():  # a value `--set` replaces is not the run's: not checked
        if k in by_name and k not in overrides and (why := violation(cls, k, v)) is not None:
            raise BadValue(f"bad value in {defaults_from}: {why}")
    for k, v in overrides.items():
        if k not in by_name:
            raise KeyError(k)
        try:
            kwargs[k] = parse_value(v, by_name[k].type)
        except ValueError as e:  # name the key: "could not convert string to float" alone says nothing
            if (why := unparsable(cls, k, v)) is not None:
                raise BadValue(f"bad --set value: {why}") from None
            raise ValueError(f"{k}={v}: {e}") from None
        if (why := violation(cls, k, kwargs[k], as_typed=v if isinstance(v, str) else None)) is not None:
            raise BadValue(f"bad --set value: {why}")
    return cls(**kwargs)


def parse_value(text: str, annotation: Any) -> Any:
    """Parse a `--set` value according to a dataclass field's annotation (string form)."""
    ann = str(annotation).replace(" ", "")
    if not isinstance(text, str):
        return text
    if ann.startswith("bool"):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected a boolean, got {text!r}")
    if text.lower() in ("none", "null") and "None" in ann:
        return None
    if ann.startswith("int"):
        return int(text)
    if ann.startswith("float"):
        return float(text)
    if ann.startswith(("list[int]", "tuple[int")):
        return [int(x) for x in text.split(",") if x.strip()]
    if ann.startswith(("list[str]", "tuple[str")):
        return [x for x in text.split(",") if x.strip()]
    return text


class UnsupportedTask(ValueError):
    """The editor cannot edit this kind of model/task (e.g. MEMIT on a classifier); the CLI exits 2."""


def seq2seq_refusal(editor: str, model: str) -> str:
    """The one-line refusal of an editor that does not edit encoder-decoder models."""
    able = sorted(n for n, c in EDITORS.items() if c.edits_seq2seq)
    return (f"editor '{editor}' edits decoder-only language models only, but '{model}' is an encoder-decoder "
            f"(T5) model; editors that can: {', '.join(able)}")
