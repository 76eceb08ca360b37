"""Edit metrics, defined once (see docs/design.md and the README's metric section).

Causal LMs are teacher-forced on prompt + answer; an answer token is correct when the argmax at
the position before it equals it. Each request (or rephrase) scores its mean token accuracy and
the scores are averaged over requests, so a long answer does not outweigh a short one
(`*_seq` is the all-tokens-right variant). Classifiers score the predicted class.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from bench.models import EditableModel
from tasks.base import EditRequest

METRIC_KEYS = ("es", "gs", "ls", "es_seq", "gs_seq", "ls_seq")


def answer_token_hits(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per example: (mean token accuracy, all-tokens-right flag, argmax at answer positions).

    `labels[:, t]` is the target of `logits[:, t]`, -100 where not an answer token.
    """
    mask = labels != -100
    pred = logits.argmax(-1)
    hit = (pred == labels) & mask
    n = mask.sum(-1)
    if (n == 0).any():
        raise ValueError("an example has no answer tokens")
    acc = hit.sum(-1).float() / n.float()
    seq = (hit.sum(-1) == n).float()
    return acc, seq, torch.where(mask, pred, torch.full_like(pred, -100))


@dataclass
class Scores:
    """Per-example token accuracy, sequence success and the answer-position predictions."""

    acc: list[float] = field(default_factory=list)
    seq: list[float] = field(default_factory=list)
    pred: list[Tensor] = field(default_factory=list)  # per example: predictions at answer positions

    def extend(self, acc: Tensor, seq: Tensor, pred: Tensor) -> None:
        self.acc += acc.tolist()
        self.seq += seq.tolist()
        self.pred += [row[row != -100].cpu() for row in pred]

    def mean(self) -> tuple[float, float]:
        return float(sum(self.acc) / len(self.acc)), float(sum(self.seq) / len(self.seq))


@torch.no_grad()
def score_lm(em: EditableModel, prompts: Sequence[str], answers: Sequence[str], batch_size: int = 32) -> Scores:
    """Teacher-forced answer-token scores, one padded forward per batch."""
    out = Scores()
    for i in range(0, len(prompts), batch_size):
        batch = em.encode(prompts[i : i + batch_size], answers[i : i + batch_size])
        logits = em.logits(batch)
        out.extend(*answer_token_hits(logits, batch.labels.to(logits.device)))
    return out


@torch.no_grad()
def score_cls(em: EditableModel, texts: Sequence[str], labels: Sequence[str], batch_size: int = 64) -> Scores:
    """Classifier scores: accuracy against `labels`; `pred` holds the predicted class id."""
    out = Scores()
    for i in range(0, len(texts), batch_size):
        logits = em.logits(em.encode_text(texts[i : i + batch_size]))
        pred = logits.argmax(-1).cpu()
        ok = (pred == em.label_ids(labels[i : i + batch_size])).float()
        out.acc += ok.tolist()
        out.seq += ok.tolist()
        out.pred += [p.reshape(1) for p in pred]
    return out


@dataclass
class Evaluation:
    """Metrics of one model state on a set of requests, plus locality predictions for agreement."""

    metrics: dict[str, float]
    loc_pred: list[Tensor]
    hits: dict[str, list[float]] = field(default_factory=dict)  # per probe kind: each probe's token accuracy


def probes(requests: Sequence[EditRequest]) -> dict[str, tuple[list[str], list[str]]]:
    """(prompts, answers) of the edit, equivalent and unrelated probes."""
    reph = [(r, t) for q in requests for r, t in ((p, q.target) for p in q.rephrases)]
    return {
        "es": ([q.prompt for q in requests], [q.target for q in requests]),
        "gs": ([p for p, _ in reph], [t for _, t in reph]),
        "ls": ([q.locality_prompt for q in requests], [q.locality_answer for q in requests]),
    }


def evaluate(em: EditableModel, requests: Sequence[EditRequest], batch_size: int = 32) -> Evaluation:
    """ES, GS, LS (gold) and their `_seq` variants for the model as it is now."""
    score = score_cls if em.kind == "cls" else score_lm
    metrics: dict[str, float] = {}
    loc_pred: list[Tensor] = []
    hits: dict[str, list[float]] = {}
    for key, (prompts, answers) in probes(requests).items():
        if not prompts:  # a task without rephrases has no GS
            metrics[key] = metrics[f"{key}_seq"] = float("nan")
            continue
        s = score(em, prompts, answers, batch_size)
        metrics[key], metrics[f"{key}_seq"] = s.mean()
        hits[key] = s.acc
        if key == "ls":
            loc_pred = s.pred
    return Evaluation(metrics, loc_pred, hits)


def agreement(pre: Sequence[Tensor], post: Sequence[Tensor]) -> float:
    """`ls_agree`: mean over unrelated probes of the fraction of answer positions whose argmax is unchanged."""
    fr = [float((a == b).float().mean()) for a, b in zip(pre, post, strict=True)]
    return sum(fr) / len(fr)


def combine(pre: Evaluation, post: Evaluation) -> dict[str, float]:
    """Post-edit metrics, `pre_*` metrics and `ls_agree` in one flat dict."""
    out = dict(post.metrics)
    out.update({f"pre_{k}": v for k, v in pre.metrics.items()})
    out["ls_agree"] = agreement(pre.loc_pred, post.loc_pred)
    return out


def relative_residual(delta: Tensor, keys: Tensor, targets: Tensor) -> float:
    """mean_j ||delta @ u_j - d_j|| / ||d_j|| for keys (n, d) and targets (n, d') of one layer."""
    pred = keys.to(delta.dtype) @ delta.T
    num = (pred - targets.to(delta.dtype)).norm(dim=-1)
    den = targets.to(delta.dtype).norm(dim=-1).clamp_min(torch.finfo(delta.dtype).tiny)
    return float((num / den).mean())
