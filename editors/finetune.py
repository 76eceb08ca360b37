"""Fine-tuning baseline (`ft`), as in the MALMEN paper's Appendix A.5.

Trains only the chosen FFN weights on the edit prompts' answer tokens (or, for classifiers, on
the target labels) with AdamW (lr 5e-4, weight decay 5e-4, as MEMIT and MALMEN use) for 5 epochs
of mini-batches, then returns the weight change as the edit. Default layers: the FFN (both
linears) of the last 3 blocks, the choice of Mitchell et al. (2022) that MALMEN follows.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from bench.core.progress import open_progress
from editors.base import HALF_DTYPES, Edit, Editor, register_editor
from editors.caching import full_precision
from editors.ranges import Range, at_least, non_negative, one_of, positive
from tasks.base import EditRequest


@dataclass
class FTHparams:
    lr: float = 5e-4
    weight_decay: float = 5e-4
    epochs: int = 5
    batch_size: int = 8
    last_n: int = 3  # blocks counted from the top
    layers: str = "ffn"  # "ffn" (both FFN linears) or "second_fc" / "first_fc"

    # valid values, checked by editors.base.hparams_from (editors/ranges.py); last_n above the model's depth: bench.runner.run.check_depth
    RANGES: ClassVar[dict[str, Range]] = {
        "lr": positive(), "weight_decay": non_negative(), "epochs": at_least(1), "batch_size": at_least(1),
        "last_n": at_least(1), "layers": one_of("ffn", "second_fc", "first_fc"),
    }


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean NLL over answer tokens."""
    return F.cross_entropy(full_precision(logits).flatten(0, 1), labels.flatten().to(logits.device), ignore_index=-100)


def _grads_to_master(params: dict[str, torch.nn.Parameter], master: dict[str, torch.Tensor]) -> None:
    """Hand each half-precision weight's gradient to its float32 master copy (float32 weights are their own master)."""
    for n, m in master.items():
        p = params[n]
        if m is not p:
            m.grad = None if p.grad is None else p.grad.float()
            p.grad = None


@torch.no_grad()
def _master_to_weights(params: dict[str, torch.nn.Parameter], master: dict[str, torch.Tensor]) -> None:
    """Round the stepped master copies into the half-precision weights the model runs on."""
    for n, m in master.items():
        if m is not params[n]:
            params[n].copy_(m)


@register_editor("ft")
class FineTune(Editor):
    """Plain fine-tuning of a few FFN weight matrices on the edit requests."""

    hparams_cls = FTHparams

    def modules(self) -> list[str]:
        hp = self.hparams
        kinds = ["first_fc", "second_fc"] if hp.layers == "ffn" else [hp.layers]
        return [m for k in kinds for m in self.model.module_names(k, last_n=hp.last_n)]

    def edit(self, requests: Sequence[EditRequest]) -> Edit:
        em, hp = self.model, self.hparams
        params = dict(em.model.named_parameters())
        names = [em.param_name(m) for m in self.modules()]
        original = {n: params[n].detach().clone() for n in names}
        flags = {n: p.requires_grad for n, p in params.items()}
        for n, p in params.items():
            p.requires_grad_(n in original)
        # AdamW steps a float32 master copy of half-precision weights (an lr-5e-4 step is below
        # bfloat16's resolution for most entries: updated in place they would barely move); the model
        # runs on the master rounded to the weights' dtype. float32/float64 weights are stepped directly.
        master = {n: params[n].detach().float().requires_grad_(True) if params[n].dtype in HALF_DTYPES else params[n]
                  for n in names}
        opt = torch.optim.AdamW([master[n] for n in names], lr=hp.lr, weight_decay=hp.weight_decay)
        order = list(range(len(requests)))
        rng = random.Random(self.ctx.seed)
        steps = hp.epochs * ((len(requests) + hp.batch_size - 1) // hp.batch_size)
        was_training = em.model.training
        em.model.eval()  # no dropout: the edit must be deterministic
        try:
            with open_progress(self.ctx.progress) as prog:
                bar = prog.add_task("fine-tune", total=steps, status="")
                for _ in range(hp.epochs):
                    rng.shuffle(order)
                    for i in range(0, len(order), hp.batch_size):
                        batch = [requests[j] for j in order[i : i + hp.batch_size]]
                        loss = self._loss(batch)
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        _grads_to_master(params, master)
                        opt.step()
                        _master_to_weights(params, master)
                        prog.update(bar, advance=1, status=f"loss {loss.item():.3f}")
            # the shift in the master's precision: float32 for half-precision weights (rounded once, when applied)
            deltas = {n: (master[n].detach() - original[n].to(master[n].dtype)) for n in names}
        finally:
            with torch.no_grad():
                for n, w in original.items():
                    params[n].copy_(w)
            for n, p in params.items():
                p.requires_grad_(flags[n])
                p.grad = None
            em.model.train(was_training)
        return Edit(deltas=deltas, mean_residual=None, info={"steps": steps})

    def _loss(self, batch: Sequence[EditRequest]) -> torch.Tensor:
        em = self.model
        if em.kind == "cls":
            logits = em.logits(em.encode_text([r.prompt for r in batch]))
            return F.cross_entropy(full_precision(logits), em.label_ids([r.target for r in batch]).to(logits.device))
        enc = em.encode([r.prompt for r in batch], [r.target for r in batch])
        return lm_loss(em.logits(enc), enc.labels)
