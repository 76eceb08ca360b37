"""`--log-samples`: one JSON line per request and probe, so a user can see which edits failed and how."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from bench.evaluation.eval_extra import ExtraEval
from bench.evaluation.metrics import Evaluation
from tasks.base import EditRequest


def _probes_of(requests: Sequence[EditRequest]) -> Iterator[tuple[str, int, str, str]]:
    """(probe kind, request index, prompt, answer) in the order `bench.evaluation.metrics.probes` scores them."""
    for i, r in enumerate(requests):
        yield "es", i, r.prompt, r.target
    for i, r in enumerate(requests):
        for p in r.rephrases:
            yield "gs", i, p, r.target
    for i, r in enumerate(requests):
        yield "ls", i, r.locality_prompt, r.locality_answer


def sample_lines(batch: int, requests: Sequence[EditRequest], pre: Evaluation, post: Evaluation,
                 pre_x: ExtraEval, post_x: ExtraEval) -> list[dict[str, Any]]:
    """Per probe: prompt, target, pre/post teacher-forced token accuracy and, where computed, greedy continuations."""
    seen: dict[str, int] = {}
    out = []
    for kind, i, prompt, answer in _probes_of(requests):
        j = seen[kind] = seen.get(kind, -1) + 1
        line: dict[str, Any] = {"batch": batch, "request": i, "probe": kind, "prompt": prompt, "target": answer,
                                "pre_hit": pre.hits[kind][j], "post_hit": post.hits[kind][j]}
        if kind in post_x.continuations:
            line.update(pre_gen=pre_x.continuations[kind][j], post_gen=post_x.continuations[kind][j],
                        pre_gen_ok=pre_x.gen_hits[kind][j], post_gen_ok=post_x.gen_hits[kind][j])
        out.append(line)
    return out


def write_samples(path: Path, lines: Sequence[dict[str, Any]]) -> None:
    """Write the sample lines as JSONL (the folder is created; an existing file of the same run is replaced)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".jsonl.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for line in lines:
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
    tmp.replace(path)
