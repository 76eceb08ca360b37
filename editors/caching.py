"""Caching the (key, value-gradient) tuples of edited linear layers (MALMEN Alg. 1, lines 1-4).

The edit prompt + answer is forwarded, forward hooks record the input u (key) and output v
(value) of every edited linear, the fine-tuning loss L = -Σ_i w_i log p(y_i | x_i) is
back-propagated, and ∇_v L is read at the cached positions. The per-example weights w_i say how
the loss is normalised (editors/lossnorm.py: token means per LM batch as the official code, or the
plain sum); without weights it is the plain sum. By default only the positions that
output an answer token are cached (labels != -100, MALMEN); `cache="all"` caches every non-pad
token (Table 1's "cache all tokens" ablation). Classifiers (em.kind == "cls") use the
cross-entropy of the target label and cache position 0 (the [CLS] token that feeds the head).
Encoder-decoder LMs (T5) choose per module (`EditableModel.key_mask`, as the official code): an
encoder module caches every non-pad prompt token, a decoder module the answer positions.

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
from torch import Tensor, nn

from bench.models import EditableModel
from editors.lossnorm import lm_batches, token_counts

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
            return output + inputs[0] @ s.T.to(device=output.device, dtype=output.dtype)
        return hook

    handles = [em.module(n).register_forward_hook(make(s)) for n, s in shifts.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class _Replay(nn.Module):
    """Stands in for a block below the first edited one: returns that prefix's recorded output."""

    def __init__(self, output: Any):
        super().__init__()
        self.output = output

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.output


def _clone(x: Any) -> Any:
    if isinstance(x, Tensor):
        return x.detach().clone()
    if isinstance(x, tuple):
        return tuple(_clone(v) for v in x)
    return x


class PrefixReuse:
    """Forward a batch unedited, then edited, without running the unedited blocks twice.

    The blocks below the first edited module do not depend on the shift, so their output from the
    unedited pass (`record`) is exactly what the edited pass (`replay`) would compute: during the
    replay every one of them is swapped for a stub returning the recorded output of the last of
    them, and only the embeddings and the blocks from the first edited one on run. Used for the
    locality term of the meta loss, whose unrelated prompts run once before and once after the shift
    (on SmolLM2, 24 of 30 blocks are below the 6 edited ones).
    """

    def __init__(self, em: EditableModel, modules: Sequence[str]):
        # Encoder-decoder: the encoder runs whole before the decoder, and every decoder block reads the
        # (edited) encoder output through cross-attention, so only the encoder's prefix can be replayed
        # when an encoder module is edited; with decoder modules alone, the decoder's prefix can.
        enc = [n for n in modules if em.is_encoder_module(n)]
        found = [em.block_of(n) for n in (enc or modules)]
        self.blocks = found[0][0]
        if any(b is not self.blocks for b, _ in found):
            raise ValueError("edited modules live in more than one list of blocks")
        self.first = min(i for _, i in found)
        self._saved: Any = None

    @contextlib.contextmanager
    def record(self) -> Iterator[None]:
        """Store the output of the last block below the first edited one during the next forward."""
        if self.first == 0:
            yield
            return

        def hook(_mod, _inputs, output):
            self._saved = _clone(output)  # a copy: later blocks may not touch what the replay returns

        h = self.blocks[self.first - 1].register_forward_hook(hook)
        try:
            yield
        finally:
            h.remove()

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        """Run the next forward with the blocks below the first edited one replaced by the recording."""
        if self.first == 0:
            yield
            return
        if self._saved is None:
            raise RuntimeError("PrefixReuse.replay before a recorded forward")
        originals = [self.blocks[i] for i in range(self.first)]
        stub = _Replay(self._saved)
        try:
            for i in range(self.first):
                self.blocks[i] = stub
            yield
        finally:
            for i, blk in enumerate(originals):
                self.blocks[i] = blk
            self._saved = None


def full_precision(x: Tensor) -> Tensor:
    """Half-precision logits are upcast for losses; float32/float64 stay as they are."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _positions(em: EditableModel, enc: Any, module: str, cache: str) -> Tensor:
    """Boolean (B, T) mask of the positions of `module`'s input that are cached."""
    if cache not in CACHE_MODES:
        raise ValueError(f"cache must be one of {CACHE_MODES}, got {cache!r}")
    if em.kind != "cls":
        return em.key_mask(module, enc, cache)
    mask_attn = enc["attention_mask"].to(em.device)
    if cache == "all":
        return mask_attn.bool()
    pos = torch.zeros_like(mask_attn, dtype=torch.bool)
    pos[:, 0] = True
    return pos


def micro_batches(em: EditableModel, prompts: Sequence[str], targets: Sequence[str], size: int) -> list[list[int]]:
    """Index groups of at most `size` examples of similar length (longest first): little padding per forward."""
    if len(prompts) <= size:  # one forward either way; keep the given order
        return [list(range(len(prompts)))] if prompts else []
    return lm_batches(token_counts(em, prompts, targets)[0], size)


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
    Forwards run on length-sorted micro-batches (little padding); rows come back in the examples' order.
    """
    # per example, so that rows come back in the examples' order whatever the micro-batch grouping
    keys: dict[str, list[Tensor]] = {n: [torch.empty(0)] * len(prompts) for n in modules}
    grads: dict[str, list[Tensor]] = {n: [torch.empty(0)] * len(prompts) for n in modules}
    dev = em.device
    for idx in micro_batches(em, prompts, targets, micro_batch):
        p, t = [prompts[i] for i in idx], [targets[i] for i in idx]
        w = None if weights is None else weights[idx]
        with torch.enable_grad(), recording(em, modules) as seen:
            loss, enc = weighted_nll(em, p, t, w)
            outs = [seen[n][1] for n in modules]
            g_out = torch.autograd.grad(loss, outs)
        for n, g in zip(modules, g_out, strict=True):
            pos = _positions(em, enc, n, cache).to(dev)  # per module: encoder and decoder positions differ
            counts = pos.sum(1).tolist()
            # float32 tuples for g_θ and the solves whatever the LM's dtype, gathered on its first device
            # (a device map puts the edited layers elsewhere)
            x, gv = seen[n][0].detach(), g.detach()
            for store, rows in ((keys[n], full_precision(x[pos.to(x.device)]).to(dev)),
                                (grads[n], full_precision(gv[pos.to(gv.device)]).to(dev))):
                for i, part in zip(idx, rows.split(counts), strict=True):
                    store[i] = part
    return Tuples({n: torch.cat(v) for n, v in keys.items()}, {n: torch.cat(v) for n, v in grads.items()})
