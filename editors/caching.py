"""Caching the (key, value-gradient) tuples of edited linear layers (MALMEN Alg. 1, lines 1-4).

The edit prompt + answer is forwarded, forward hooks record the input u (key) and output v
(value) of every edited linear, the fine-tuning loss L = -Σ_i w_i log p(y_i | x_i) is
back-propagated, and ∇_v L is read at the cached positions. The per-example weights w_i say how
the loss is normalised (editors/lossnorm.py: token means per LM batch as the official code, or the
plain sum); without weights it is the plain sum. By default only the positions that
output an answer token are cached (labels != -100, MALMEN); `cache="all"` caches every non-pad
token (Table 1's "cache all tokens" ablation). Classifiers (em.kind == "cls") use the
cross-entropy of the target label and cache position 0 (the [CLS] token that feeds the head).

Keys are module inputs and values module outputs whatever the weight layout (GPT-2's Conv1D
stores (in, out)), so no layout handling is needed here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from bench.models import EditableModel

CACHE_MODES = ("answer", "all")


@dataclass
class Tuples:
    """Cached keys (n, d) and value gradients (n, d') per edited module, rows aligned."""

    keys: dict[str, Tensor] = field(default_factory=dict)
    grads: dict[str, Tensor] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return next(iter(self.keys.values())).shape[0] if self.keys else 0


@contextlib.contextmanager
def recording(em: EditableModel, modules: Sequence[str]) -> Iterator[dict[str, tuple[Tensor, Tensor]]]:
    """Forward hooks storing (input, output) of each module in the yielded dict."""
    seen: dict[str, tuple[Tensor, Tensor]] = {}

    def make(name: str):
        def hook(_mod, inputs, output):
            if not output.requires_grad:  # frozen LM: make the value a leaf so ∇v can be taken
                output.requires_grad_(True)
            seen[name] = (inputs[0], output)
        return hook

    handles = [em.module(n).register_forward_hook(make(n)) for n in modules]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def shifted(em: EditableModel, shifts: dict[str, Tensor]) -> Iterator[None]:
    """Run the model as if W̃ = W + S for each module (S in (out, in) layout), S differentiable.

    The hook adds x Sᵀ to the module output, so ∂loss/∂S = Σ_tokens ∇v xᵀ = ∇_W̃ loss, and the
    inputs x are the post-edit keys (earlier edited layers already act on them).
    """

    def make(s: Tensor):
        def hook(_mod, inputs, output):
            return output + inputs[0] @ s.T.to(output.dtype)
        return hook

    handles = [em.module(n).register_forward_hook(make(s)) for n, s in shifts.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def full_precision(x: Tensor) -> Tensor:
    """Half-precision logits are upcast for losses; float32/float64 stay as they are."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _positions(em: EditableModel, mask_attn: Tensor, labels: Tensor | None, cache: str) -> Tensor:
    """Boolean (B, T) mask of the cached positions."""
    if cache not in CACHE_MODES:
        raise ValueError(f"cache must be one of {CACHE_MODES}, got {cache!r}")
    if cache == "all":
        return mask_attn.bool()
    if em.kind == "cls":
        pos = torch.zeros_like(mask_attn, dtype=torch.bool)
        pos[:, 0] = True
        return pos
    assert labels is not None
    return labels != -100


def weighted_nll(em: EditableModel, prompts: Sequence[str], targets: Sequence[str],
                 weights: Tensor | None = None) -> tuple[Tensor, Any]:
    """Σ_i w_i · (example i's summed answer NLL) under the model as it runs now, and the encoded batch.

    The output head runs on the answer positions only (EditableModel.answer_logits).
    """
    dev = em.device
    if em.kind == "cls":
        enc = em.encode_text(list(prompts))
        ce = F.cross_entropy(full_precision(em.logits(enc)), em.label_ids(targets).to(dev), reduction="none")
        w = ce.new_ones(ce.shape) if weights is None else weights.to(device=dev, dtype=ce.dtype)
        return (ce * w).sum(), enc
    batch = em.encode(prompts, targets).to(dev)
    mask = batch.answer_mask
    ce = F.cross_entropy(full_precision(em.answer_logits(batch)), batch.labels[mask], reduction="none")
    if weights is None:
        return ce.sum(), batch
    w = weights.to(device=dev, dtype=ce.dtype)[:, None].expand(mask.shape)[mask]
    return (ce * w).sum(), batch


def cache_tuples(em: EditableModel, prompts: Sequence[str], targets: Sequence[str], modules: Sequence[str],
                 cache: str = "answer", micro_batch: int = 16, weights: Tensor | None = None) -> Tuples:
    """Keys and value gradients of the (weighted) fine-tuning NLL on (prompt, target) pairs, micro-batched.

    Micro-batching does not change the result: examples are independent in the forward pass and
    the loss is a weighted sum over examples, so each token's ∇v is the same as in one full batch.
    """
    keys: dict[str, list[Tensor]] = {n: [] for n in modules}
    grads: dict[str, list[Tensor]] = {n: [] for n in modules}
    dev = em.device
    for i in range(0, len(prompts), micro_batch):
        p, t = list(prompts[i : i + micro_batch]), list(targets[i : i + micro_batch])
        w = None if weights is None else weights[i : i + micro_batch]
        with torch.enable_grad(), recording(em, modules) as seen:
            loss, enc = weighted_nll(em, p, t, w)
            if em.kind == "cls":
                pos = _positions(em, enc["attention_mask"].to(dev), None, cache)
            else:
                pos = _positions(em, enc.attention_mask, enc.labels, cache)
            outs = [seen[n][1] for n in modules]
            g_out = torch.autograd.grad(loss, outs)
        for n, g in zip(modules, g_out, strict=True):
            keys[n].append(seen[n][0].detach()[pos])
            grads[n].append(g.detach()[pos])
    return Tuples({n: torch.cat(v) for n, v in keys.items()}, {n: torch.cat(v) for n, v in grads.items()})
