"""Every published row's config hash is what the project's hashing gives for its stored config today.

A change to the hashing (or to how a config enters it) that would orphan the published rows - their
resume, `bench check` and the report all key on the hash - fails here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.runner.provenance import content_hashes

REPO = Path(__file__).resolve().parents[2]
STORES = sorted((REPO / "results" / "published").rglob("runs.jsonl"))


def test_there_are_published_stores():
    assert REPO / "results" / "published" / "runs.jsonl" in STORES


@pytest.mark.parametrize("store", STORES, ids=lambda p: str(p.relative_to(REPO / "results" / "published")))
def test_every_published_config_hash_recomputes_from_its_stored_config(store):
    rows = [json.loads(line) for line in store.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert rows, f"{store} is empty"
    wrong = []
    for i, row in enumerate(rows):
        config = row["config"]
        # as resolve decides: a local model folder enters by content (`model_id`) alone
        is_folder = config.get("model_id") is not None and Path(config["model"]).is_dir()
        got, _ = content_hashes(config, model_is_folder=is_folder)
        if got != row["config_hash"]:
            wrong.append(f"line {i + 1}: stored {row['config_hash']}, recomputed {got}")
    assert not wrong, f"{store}: {len(wrong)} of {len(rows)} rows:\n" + "\n".join(wrong)
