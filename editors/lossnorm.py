"""How the losses of a batch of examples are normalised: per-example weights of summed losses.

Every loss the hyper-network editors use is written as Σ_i w_i ℓ_i, where ℓ_i is example i's
summed token loss (NLL, or KL at the answer positions; the class loss for classifiers).

- `official` (ChenmienTan/malmen, data/base.py and util.py): the n examples are sorted by length,
  longest first (a stable sort, so ties keep their order), and cut into LM batches of `lm_batch`
  (config/data/*.yaml: 32); each batch's loss is the mean over its answer tokens (the mean over
  its examples for classifiers), and the batches' losses are summed. So w_i = 1 / T_b, with T_b the
  answer tokens of i's batch. The cached value gradients come from the same per-batch means.
- `sum` (Algorithm 1 and Eq. 1 as printed): the mean over examples of summed token losses,
  w_i = 1 / n; value gradients are taken of the plain sum (w_i = 1).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from bench.models import EditableModel

LOSS_NORMS = ("official", "sum")


def token_counts(em: EditableModel, prompts: Sequence[str], targets: Sequence[str]) -> tuple[list[int], list[int]]:
    """(length, loss units) per example: tokens of prompt + answer and answer tokens (1 for classifiers)."""
    if em.kind == "cls":
        lengths = em.encode_text(list(prompts))["attention_mask"].sum(1).tolist()
        return lengths, [1] * len(lengths)
    batch = em.encode(prompts, targets)
    return batch.attention_mask.sum(1).tolist(), batch.answer_mask.sum(1).tolist()


def lm_batches(lengths: Sequence[int], size: int) -> list[list[int]]:
    """Indices grouped as the official collate does: sorted by length (longest first, stable), then cut."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i:i + size] for i in range(0, len(order), size)]


def loss_weights(em: EditableModel, prompts: Sequence[str], targets: Sequence[str], loss_norm: str,
                 lm_batch: int = 32) -> Tensor:
    """w_i (float64, one per example) such that Σ_i w_i ℓ_i is the batch's normalised loss."""
    if loss_norm not in LOSS_NORMS:
        raise ValueError(f"loss_norm must be one of {LOSS_NORMS}, got {loss_norm!r}")
    n = len(prompts)
    if loss_norm == "sum":
        return torch.full((n,), 1.0 / max(n, 1), dtype=torch.float64)
    lengths, units = token_counts(em, prompts, targets)
    w = torch.empty(n, dtype=torch.float64)
    for idx in lm_batches(lengths, lm_batch):
        w[idx] = 1.0 / sum(units[i] for i in idx)
    return w


def cache_weights(em: EditableModel, prompts: Sequence[str], targets: Sequence[str], loss_norm: str,
                  lm_batch: int = 32) -> Tensor:
    """Weights of the loss whose value gradients are cached: the batch means (official) or the plain sum."""
    if loss_norm == "sum":
        return torch.ones(len(prompts), dtype=torch.float64)
    return loss_weights(em, prompts, targets, loss_norm, lm_batch)
