"""FEVER fact checking as a classification edit task (MALMEN paper, Section 5, BERT-base).

Shipped data: `tasks/data/fever/paper_dev.jsonl`, the 9,999 FEVER 1.0 paper_dev claims (see
`tasks/data/PROVENANCE.md`). NOT ENOUGH INFO records are dropped; a claim repeated in several
records is kept once, dropped if it carries both SUPPORTS and REFUTES, and keeps its evidenced
label if its other records say NOT ENOUGH INFO (`data_info["shipped"]` has the resulting count,
6,510 claims). A fixed permutation (`split_seed`) cuts them into three disjoint parts:

* classifier part (3,000 claims): fine-tunes the SUPPORTS/REFUTES classifier (`classifier_split()`;
  its first `classifier_val_claims` = 400 are the validation part that picks the epoch count and
  reports the classifier's accuracy, the other 2,600 are trained on);
* meta-training part (1,500 claims): `train_split()`, one request per claim; its locality claim is
  the claim half the part away (never itself; a meta-training batch can, rarely, hold one claim both
  as an edit and as a locality claim);
* evaluation part (the other 2,010 claims): the first half (1,005) are edit claims, the second half
  their locality claims, paired in order, so no locality claim is ever edited in the same batch.

Edit request (as the paper): prompt = claim, target = the label *opposite* to the gold label
(the classifier was fine-tuned toward the gold one), rephrases = generated rephrasings
(`tasks.rephrase`; GS is therefore on generated, not human, paraphrases and `data_info` says
so), locality = another held-out claim with its gold label (the paper samples FEVER2 claims,
which are not available here).

Deviation from the paper: it fine-tunes the classifier on *all* FEVER data, edit claims included;
here the classifier never sees the evaluation or meta-training claims, so `pre_es` is roughly
one minus the classifier's accuracy rather than near zero.

User files (`--data` for evaluation, `--train-data` for meta-training), detected by content:

* MALMEN (`fever_train.json` / `fever_eval.json`): JSON list of {prompt, equiv_prompt: [str, ...],
  alt, unrel_prompt, unrel_ans}; `alt` is the edit target, `unrel_ans` the gold label of
  `unrel_prompt`; every `equiv_prompt` is scored for GS.
* MEND / KnowledgeEditor KILT (`fever-*-kilt.jsonl`): {input, output: [{answer}], alternatives,
  filtered_rephrases, ...}; target = `alternatives[0]`, GS on all `filtered_rephrases`. Records
  with an empty `alternatives` or `filtered_rephrases` list are dropped as MEND does (counted in
  `data_info["dropped_like_mend"]`). The format has no unrelated claims: as in MEND, the
  locality claims are other records of the file with their gold `output[0].answer` (first half of
  the records = edits, second half = their locality claims).
* FEVER JSONL ({claim, label, ...}, e.g. another FEVER split): NOT ENOUGH INFO dropped, generated
  rephrasings, halves as for KILT.

Labels: "SUPPORTS"/"REFUTES" in any letter case; booleans (as some KILT exports store them)
map True -> SUPPORTS and False -> REFUTES, matching MEND's `POSITIVE_CLASS = "SUPPORTS"`.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.base import (
    DATA_DIR,
    DataError,
    EditRequest,
    Field,
    Task,
    TaskConfig,
    check_record,
    is_blank,
    read_records,
    register_task,
    validate_records,
)
from tasks.records import file_sha256
from tasks.rephrase import rephrase

FEVER_FILE = DATA_DIR / "fever" / "paper_dev.jsonl"
LABELS: tuple[str, str] = ("SUPPORTS", "REFUTES")
NEI = "NOT ENOUGH INFO"
GS_GENERATED = "generated rephrasings (tasks/rephrase.py: veridical frames, date-phrase reordering)"
LS_SHIPPED = "held-out FEVER 1.0 dev claims with their gold labels (FEVER2, used by the paper, is not available)"


@dataclass
class FeverConfig(TaskConfig):
    """Split sizes and rephrasing count of the `fever` task (shipped data)."""

    n_rephrases: int = 2  # generated rephrasings per claim (all are scored for GS)
    classifier_claims: int = 3000  # claims for fine-tuning the classifier (validation part included)
    classifier_val_claims: int = 400  # of those, held out to pick the epoch count and report accuracy
    meta_claims: int = 1500  # claims for meta-training (train_split)
    split_seed: int = 1234


@dataclass(frozen=True)
class ClassifierSplit:
    """(claim, gold label) pairs for fine-tuning the classifier and for validating it."""

    train: list[tuple[str, str]]
    val: list[tuple[str, str]]

    def digest(self) -> str:
        """sha256 of the split's content, for cache keys."""
        h = hashlib.sha256()
        for part in (self.train, self.val):
            for claim, label in part:
                h.update(f"{label}\t{claim}\n".encode())
            h.update(b"--\n")
        return h.hexdigest()


def flip(label: str) -> str:
    """The other of the two FEVER labels."""
    return LABELS[1] if label == LABELS[0] else LABELS[0]


def parse_label(path: str | Path, index: int, field_name: str, value: Any) -> str:
    """Normalise a label value ("SUPPORTS"/"REFUTES" any case, or a boolean) or raise DataError."""
    if isinstance(value, bool):
        return LABELS[0] if value else LABELS[1]
    if isinstance(value, str) and value.strip().upper() in LABELS:
        return value.strip().upper()
    raise DataError(path, index, field_name, f"expected SUPPORTS, REFUTES or a boolean, got {value!r}")


# ------------------------------------------------------------------------------------------
# Readers: each returns validated records in one normalised shape plus facts for data_info.


@dataclass
class _Claim:
    """A normalised record: claim, gold label, edit target, rephrases (None = generate), locality."""

    claim: str
    gold: str | None
    target: str
    rephrases: tuple[str, ...] | None = None
    loc: tuple[str, str] | None = None  # (claim, gold label) where the file supplies it


_MALMEN_SPEC = [Field("prompt"), Field("equiv_prompt", "str_list"), Field("unrel_prompt")]
_KILT_SPEC = [Field("input")]
_FEVER_SPEC = [Field("claim")]


def _check_malmen(path: str | Path, i: int, rec: Any) -> None:
    check_record(path, i, rec, _MALMEN_SPEC)
    for f in ("alt", "unrel_ans"):
        if f not in rec or rec[f] is None:
            raise DataError(path, i, f, "missing field")
        parse_label(path, i, f, rec[f])


def _check_kilt(path: str | Path, i: int, rec: Any) -> None:
    check_record(path, i, rec, _KILT_SPEC)
    out = rec.get("output")
    if not isinstance(out, list) or not out or not isinstance(out[0], dict) or "answer" not in out[0]:
        raise DataError(path, i, "output", "expected a non-empty list whose first item has an 'answer'")
    parse_label(path, i, "output[0].answer", out[0]["answer"])
    for f in ("alternatives", "filtered_rephrases"):
        if f not in rec or not isinstance(rec[f], list):
            raise DataError(path, i, f, "expected a list")
    for j, alt in enumerate(rec["alternatives"]):
        parse_label(path, i, f"alternatives[{j}]", alt)
    if not all(isinstance(x, str) and not is_blank(x) for x in rec["filtered_rephrases"]):
        raise DataError(path, i, "filtered_rephrases", "expected a list of non-empty strings")


def _check_fever(path: str | Path, i: int, rec: Any) -> None:
    check_record(path, i, rec, _FEVER_SPEC)
    if "label" not in rec or rec["label"] is None:
        raise DataError(path, i, "label", "missing field")
    if rec["label"] != NEI:
        parse_label(path, i, "label", rec["label"])


def detect_format(path: str | Path, records: list[Any]) -> str:
    """'malmen', 'kilt' or 'fever' from the keys of the first object record; DataError otherwise."""
    first = next((r for r in records if isinstance(r, dict)), None)
    keys = set(first or {})
    if {"prompt", "equiv_prompt"} <= keys:
        return "malmen"
    if {"input", "output"} <= keys:
        return "kilt"
    if {"claim", "label"} <= keys:
        return "fever"
    raise DataError(
        path, None, None,
        f"unrecognised FEVER file format (first record keys: {sorted(keys)}); expected MALMEN "
        "{prompt, equiv_prompt, alt, unrel_prompt, unrel_ans}, MEND KILT {input, output, alternatives, "
        "filtered_rephrases} or FEVER {claim, label}",
    )


def read_fever_file(path: str | Path, skip_bad: bool) -> tuple[list[_Claim], dict[str, Any], int]:
    """Read a user or shipped file: (normalised records, data_info facts, number skipped as bad)."""
    records = read_records(path, skip_bad)
    fmt = detect_format(path, records)
    check = {"malmen": _check_malmen, "kilt": _check_kilt, "fever": _check_fever}[fmt]
    valid = validate_records(path, records, check, skip_bad)
    info: dict[str, Any] = {"format": fmt, "sha256": file_sha256(path), "records": len(records)}
    out: list[_Claim] = []
    if fmt == "malmen":
        for i, r in valid.records:
            out.append(_Claim(r["prompt"], None, parse_label(path, i, "alt", r["alt"]), tuple(r["equiv_prompt"]),
                              (r["unrel_prompt"], parse_label(path, i, "unrel_ans", r["unrel_ans"]))))
        info["gs_source"] = "file: equiv_prompt (all scored)"
        info["ls_source"] = "file: unrel_prompt / unrel_ans"
    elif fmt == "kilt":
        dropped = 0
        for i, r in valid.records:
            if not r["alternatives"] or not r["filtered_rephrases"]:
                dropped += 1  # MEND's BinaryAugmentedKILT drops these records too
                continue
            gold = parse_label(path, i, "output[0].answer", r["output"][0]["answer"])
            target = parse_label(path, i, "alternatives[0]", r["alternatives"][0])
            out.append(_Claim(r["input"], gold, target, tuple(r["filtered_rephrases"])))
        info["dropped_like_mend"] = dropped
        info["gs_source"] = "file: filtered_rephrases (all scored)"
        info["ls_source"] = "other records of the file with their gold output[0].answer"
    else:
        out = _fever_claims(path, valid.records)
        info["gs_source"] = GS_GENERATED
        info["ls_source"] = "other claims of the file with their gold labels"
    if not out:
        raise DataError(path, None, None, "no usable records")
    return out, info, valid.skipped


def _fever_claims(path: str | Path, records: list[tuple[int, dict]]) -> list[_Claim]:
    """FEVER {claim, label} records minus NOT ENOUGH INFO, duplicates and label-conflicting claims."""
    labels: dict[str, set[str]] = {}  # insertion order = file order
    for i, r in records:
        if r["label"] != NEI:
            labels.setdefault(r["claim"].strip(), set()).add(parse_label(path, i, "label", r["label"]))
    out = []
    for claim, found in labels.items():
        if len(found) == 1:  # a claim annotated with both labels has no gold label
            (gold,) = found
            out.append(_Claim(claim, gold, flip(gold)))
    return out


# ------------------------------------------------------------------------------------------


@register_task("fever")
class FeverTask(Task):
    """FEVER claims: flip the classifier's SUPPORTS/REFUTES decision (see the module docstring)."""

    kind = "cls"
    labels = LABELS
    config_cls = FeverConfig

    def __init__(self, config: FeverConfig | None = None):
        super().__init__(config)
        cfg = self.config
        claims, info, skipped = read_fever_file(FEVER_FILE, skip_bad=False)
        del info["gs_source"], info["ls_source"]  # set below for the shipped split
        self._claims = claims
        n = len(claims)
        n_cls, n_meta = cfg.classifier_claims, cfg.meta_claims
        if not 0 < cfg.classifier_val_claims < n_cls or n_cls + n_meta + 2 > n:
            raise ValueError(f"fever split sizes do not fit {n} claims: classifier {n_cls} "
                             f"(val {cfg.classifier_val_claims}), meta {n_meta}, evaluation needs >= 2")
        perm = list(range(n))
        random.Random(cfg.split_seed).shuffle(perm)
        self._cls_idx = perm[:n_cls]
        self._meta_idx = perm[n_cls:n_cls + n_meta]
        self._eval_idx = perm[n_cls + n_meta:]
        n_eval_edit = (len(self._eval_idx) + 1) // 2
        self.data_info = {
            "shipped": {"file": "tasks/data/fever/paper_dev.jsonl", **info,
                        "claims_after_dropping_nei_and_conflicts": n},
            "split_sizes": {"classifier_train": n_cls - cfg.classifier_val_claims,
                            "classifier_val": cfg.classifier_val_claims, "meta_train": n_meta,
                            "eval_edit": n_eval_edit, "eval_locality": len(self._eval_idx) - n_eval_edit},
            "gs_source": GS_GENERATED,
            "ls_source": LS_SHIPPED,
        }
        self.n_skipped = skipped
        self._user_eval = self._read_user(cfg.data, "data")
        self._user_train = self._read_user(cfg.train_data, "train_data")

    def _read_user(self, path: str | None, key: str) -> list[EditRequest] | None:
        """Requests from a user file, recording its facts under data_info[key]."""
        if not path:
            return None
        claims, info, skipped = read_fever_file(path, self.config.skip_bad)
        self.n_skipped += skipped
        info["skipped"] = skipped
        self.data_info[key] = {"file": str(path), **info}
        if key == "data":  # the metric labels follow the evaluation data
            self.data_info["gs_source"], self.data_info["ls_source"] = info["gs_source"], info["ls_source"]
        if all(c.loc is not None for c in claims):
            return [self._request(c, c.loc) for c in claims]  # type: ignore[arg-type]
        if len(claims) < 2:
            raise DataError(path, None, None, "needs at least 2 usable records (edits + locality claims)")
        return self._halves(claims)

    def _request(self, c: _Claim, loc: tuple[str, str]) -> EditRequest:
        reph = c.rephrases if c.rephrases is not None else rephrase(c.claim, self.config.n_rephrases)
        return EditRequest(prompt=c.claim, target=c.target, rephrases=tuple(reph),
                           locality_prompt=loc[0], locality_answer=loc[1])

    def _halves(self, claims: list[_Claim]) -> list[EditRequest]:
        """First half = edit claims, second half = their locality claims (gold labels), in order."""
        k = (len(claims) + 1) // 2
        edits, locs = claims[:k], claims[k:]
        return [self._request(c, (locs[i % len(locs)].claim, locs[i % len(locs)].gold or ""))
                for i, c in enumerate(edits)]

    def classifier_split(self) -> ClassifierSplit:
        """Shipped claims for fine-tuning the classifier (train) and picking its epoch count (val)."""
        pairs = [(self._claims[i].claim, self._claims[i].gold or "") for i in self._cls_idx]
        k = self.config.classifier_val_claims
        return ClassifierSplit(train=pairs[k:], val=pairs[:k])

    def train_split(self) -> list[EditRequest]:
        if self._user_train is not None:
            return list(self._user_train)
        part = [self._claims[i] for i in self._meta_idx]
        half = len(part) // 2
        return [self._request(c, (part[(j + half) % len(part)].claim, part[(j + half) % len(part)].gold or ""))
                for j, c in enumerate(part)]

    def eval_split(self) -> list[EditRequest]:
        if self._user_eval is not None:
            return list(self._user_eval)
        return self._halves([self._claims[i] for i in self._eval_idx])
