"""zsRE question answering edits in the MEND / EasyEdit format.

Record: `subject`, `src` (question), `answers` (gold answers), `alt` (alternative answer),
`rephrase` (paraphrased question), `loc` ("nq question: ..." unrelated NQ question), `loc_ans`.
The edit target is the correct answer `answers[0]`, as the MALMEN and MEMIT papers do for
GPT-style models, so pre-edit ES/GS measure what the model already knew; `target=alt` edits
toward the alternative answer instead.

Locality prompts: the "nq question: " prefix is stripped, and since NQ questions are lower-cased
and have no question mark, the first letter is capitalised and "?" appended (MALMEN appends "?"
too), so they read like the edit questions ("Who voiced gaston in beauty and the beast 1991?").

Split: the shipped file is the 1,000-record MEND zsRE train subset (the eval file was not
available); it is split 40% meta-training / 60% evaluation (400 / 600) by a fixed shuffle. With
`source=full` (tasks/sources.py) the public MEND-format files are used instead: the train file
`zsre_mend_train.json` is the meta-training data and the eval file `zsre_mend_eval.json` (the one
kmeng01/rome and kmeng01/memit evaluate on) the evaluation pool.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.base import DataError, EditRequest, Field, TaskConfig, check_record, is_blank, register_task
from tasks.files import FileTask
from tasks.records import RecordFormat
from tasks.sources import RemoteFile

NQ_PREFIX = "nq question: "
TARGETS = ("answers", "alt")


@dataclass
class ZsreConfig(TaskConfig):
    """zsRE options: which answer is the edit target, and which data (`source`, tasks/sources.py)."""

    target: str = "answers"  # "answers" = answers[0] (correct answer, MALMEN/MEMIT); "alt" = alternative
    # "shipped" subset (the default: offline, the same everywhere), "full" public files, "auto": full when
    # cached or reachable (an explicit choice; the only source that probes the network)
    source: str = "shipped"


def as_question(loc: str) -> str:
    """Turn an NQ locality string into a question prompt: strip prefix, capitalise, add '?'."""
    q = loc[len(NQ_PREFIX):] if loc.startswith(NQ_PREFIX) else loc
    q = q.strip()
    q = q[:1].upper() + q[1:]
    return q if q.endswith("?") else q + "?"


@register_task("zsre")
class Zsre(FileTask):
    """zsRE (MEND/EasyEdit format); edit target answers[0] by default, `target=alt` optional."""

    config_cls = ZsreConfig
    shipped_train = "zsre/zsre_mend_train-1k.json"
    shipped_eval = "zsre/zsre_mend_train-1k.json"
    train_fraction = 0.4
    full_files = (RemoteFile("zsre_mend_train.json", "train", "MEND-format zsRE train file"),
                  RemoteFile("zsre_mend_eval.json", "eval", "MEND-format zsRE eval file"))

    def __init__(self, config: ZsreConfig | None = None, *, downloaded: Mapping[str, str | Path] | None = None):
        cfg = config or ZsreConfig()
        if cfg.target not in TARGETS:
            raise ValueError(f"zsre: target must be one of {TARGETS}, got {cfg.target!r}")
        super().__init__(cfg, downloaded=downloaded)

    def formats(self) -> list[RecordFormat]:
        """The MEND/EasyEdit record format, validated for the selected target."""
        use_alt = self.config.target == "alt"
        spec = [
            Field("subject"),
            Field("src"),
            Field("rephrase"),
            Field("loc"),
            Field("loc_ans"),
            # the answer field not used as target may be absent or empty
            Field("alt", "str", optional=not use_alt, allow_empty=not use_alt),
            Field("answers", "str_list", optional=use_alt, allow_empty=use_alt),
        ]

        def check(path: str | Path, i: int, rec: Any) -> None:
            check_record(path, i, rec, spec)
            if is_blank(rec["loc"].removeprefix(NQ_PREFIX)):
                raise DataError(path, i, "loc", "empty question after the 'nq question: ' prefix")

        def convert(rec: dict) -> EditRequest:
            target = rec["alt"] if use_alt else rec["answers"][0]
            return EditRequest(prompt=rec["src"], target=target, rephrases=(rec["rephrase"],),
                               locality_prompt=as_question(rec["loc"]), locality_answer=rec["loc_ans"],
                               subject=rec["subject"])

        fields = {"prompt": "src", "target": "alt" if use_alt else "answers[0]", "rephrases": "rephrase",
                  "locality_prompt": "loc", "locality_answer": "loc_ans"}
        return [RecordFormat("mend", ("src",), check, convert, fields)]
