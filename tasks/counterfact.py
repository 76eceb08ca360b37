"""CounterFact counterfactual edits, in the EasyEdit format or the original ROME/MEMIT schema.

EasyEdit record: `prompt` (subject filled in), `target_new`, `subject`, `ground_truth`,
`rephrase_prompt`, `locality_prompt`, `locality_ground_truth`. The edit target is `target_new`.

ROME/MEMIT record: `case_id`, `requested_rewrite{prompt with "{}" for the subject, subject,
target_new{str}, target_true{str}}`, `paraphrase_prompts`, `neighborhood_prompts`,
`attribute_prompts`. Mapping: prompt = requested_rewrite.prompt with the subject filled in, all
paraphrase prompts are rephrases, and the locality probe is the first neighbourhood prompt
(another subject whose true object is `target_true`) answered with `target_true`, the same
one-probe-per-case reduction as the EasyEdit files. `attribute_prompts` are validated but not
used (EditRequest has no slot for ROME's attribute-specificity probes).

The format is detected per file from its first record. Split: the shipped EasyEdit
`counterfact-train.json` (10,000 cases) is for meta-training, `counterfact-val.json` (1,919
cases, disjoint case ids) is the evaluation pool. With `source=full` (tasks/sources.py) ROME's
`counterfact.json` is split by the same case ids: the shipped train file's cases are meta-training,
every other case is the evaluation pool (`CounterFact.full_train_indices`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.base import (
    DATA_DIR,
    DataError,
    EditRequest,
    Field,
    TaskConfig,
    check_record,
    read_records,
    register_task,
)
from tasks.files import FileTask
from tasks.records import LoadedFile, RecordFormat, check_nested
from tasks.sources import RemoteFile

EASYEDIT_SPEC = [
    Field("prompt"),
    Field("target_new"),
    Field("subject"),
    Field("ground_truth", optional=True),
    Field("rephrase_prompt"),
    Field("locality_prompt"),
    Field("locality_ground_truth"),
    Field("case_id", "int", optional=True),
]
ROME_TOP_SPEC = [
    Field("case_id", "int", optional=True),
    Field("paraphrase_prompts", "str_list"),
    Field("neighborhood_prompts", "str_list"),
    Field("attribute_prompts", "str_list", optional=True, allow_empty=True),
]
ROME_REWRITE_SPEC = [Field("prompt"), Field("subject")]
ROME_TARGET_SPEC = [Field("str")]
# EditRequest field -> record field, for errors found after conversion (e.g. too long for the model)
EASYEDIT_FIELDS = {"rephrases": "rephrase_prompt", "locality_answer": "locality_ground_truth",
                   "target": "target_new"}
ROME_FIELDS = {"prompt": "requested_rewrite.prompt", "target": "requested_rewrite.target_new.str",
               "rephrases": "paraphrase_prompts[]", "locality_prompt": "neighborhood_prompts[0]",
               "locality_answer": "requested_rewrite.target_true.str"}


@dataclass
class CounterFactConfig(TaskConfig):
    """CounterFact options: the shared data options and `source` (the target is always target_new)."""

    # "shipped" EasyEdit files (the default: offline), "full" ROME counterfact.json, "auto": full when cached
    # or reachable (an explicit choice; the only source that probes the network)
    source: str = "shipped"


def check_easyedit(path: str | Path, i: int, rec: Any) -> None:
    """Validate one EasyEdit CounterFact record."""
    check_record(path, i, rec, EASYEDIT_SPEC)


def convert_easyedit(rec: dict) -> EditRequest:
    """EasyEdit CounterFact record -> EditRequest (target = target_new)."""
    return EditRequest(prompt=rec["prompt"], target=rec["target_new"], rephrases=(rec["rephrase_prompt"],),
                       locality_prompt=rec["locality_prompt"], locality_answer=rec["locality_ground_truth"],
                       subject=rec["subject"], target_true=rec.get("ground_truth"),
                       neighborhood_prompts=(rec["locality_prompt"],))


def check_rome(path: str | Path, i: int, rec: Any) -> None:
    """Validate one ROME/MEMIT CounterFact record, naming nested fields with dots."""
    check_record(path, i, rec, ROME_TOP_SPEC)
    check_nested(path, i, rec, "requested_rewrite", ROME_REWRITE_SPEC)
    rw = rec["requested_rewrite"]
    for key in ("target_new", "target_true"):
        try:
            check_nested(path, i, rw, key, ROME_TARGET_SPEC)
        except DataError as e:
            raise DataError(path, i, f"requested_rewrite.{e.field_name}", e.problem) from None
    if "{}" not in rw["prompt"]:
        raise DataError(path, i, "requested_rewrite.prompt", "has no '{}' placeholder for the subject")


def convert_rome(rec: dict) -> EditRequest:
    """ROME/MEMIT CounterFact record -> EditRequest (see the module docstring for the mapping)."""
    rw = rec["requested_rewrite"]
    return EditRequest(prompt=rw["prompt"].replace("{}", rw["subject"]), target=rw["target_new"]["str"],
                       rephrases=tuple(rec["paraphrase_prompts"]),
                       locality_prompt=rec["neighborhood_prompts"][0], locality_answer=rw["target_true"]["str"],
                       subject=rw["subject"], target_true=rw["target_true"]["str"],
                       neighborhood_prompts=tuple(rec["neighborhood_prompts"]),
                       generation_prompts=tuple(p for p in rec.get("generation_prompts", ()) if isinstance(p, str)))


@register_task("counterfact")
class CounterFact(FileTask):
    """CounterFact (EasyEdit or ROME schema); edit target target_new."""

    config_cls = CounterFactConfig
    shipped_train = "counterfact/counterfact-train.json"
    shipped_eval = "counterfact/counterfact-val.json"
    full_files = (RemoteFile("counterfact.json", "both", "ROME's CounterFact (all cases)"),)
    full_split = "case ids of the shipped EasyEdit counterfact-train.json -> train, every other case -> eval"

    def full_train_indices(self, f: LoadedFile) -> set[int]:
        """Records of ROME's counterfact.json whose case id is in the shipped EasyEdit train file.

        The EasyEdit files keep ROME's case ids (train and val disjoint), so the full file splits
        the way the shipped one does: the same meta-training cases, every other case evaluated.
        """
        train_ids = {r.get("case_id") for r in read_records(DATA_DIR / self.shipped_train) if isinstance(r, dict)}
        out = {i for i, r in enumerate(read_records(f.path))
               if isinstance(r, dict) and isinstance(r.get("case_id"), int) and r["case_id"] in train_ids}
        if not out:
            raise DataError(f.path, None, "case_id", "no case id matches the shipped EasyEdit train file, "
                                                     "so the file cannot be split into train and eval")
        return out

    def formats(self) -> list[RecordFormat]:
        """ROME schema if the first record has `requested_rewrite`, else EasyEdit."""
        return [
            RecordFormat("rome", ("requested_rewrite",), check_rome, convert_rome, ROME_FIELDS),
            RecordFormat("easyedit", ("prompt", "target_new"), check_easyedit, convert_easyedit, EASYEDIT_FIELDS),
        ]
