"""The training loop of the tiny built-in models (`tiny-gpt2`, `tiny-t5`).

One loop for both: AdamW (betas 0.9 / 0.98) with a linear warmup times a cosine decay over
`max_epochs` (a `LambdaLR`), shuffled batches of similar-length sequences, a per-batch loss the
model's module supplies, the running answer-token accuracy of each epoch, a progress bar and a log
line per epoch. The order of random draws, operations and optimiser steps is part of what the cached
weights are (their reference digests, bench/models/reference_sha256.json): a change here that moves
any of them changes the weights and needs the models' `FORMAT` bumped.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bench.core.progress import open_progress

# What one batch gives the loop: the loss to minimise, the logits, the targets they are scored
# against and the mask of the answer tokens whose accuracy is counted.
BatchLoss = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class TrainResult:
    """What the loop reports: epochs run, optimiser steps per epoch, the last epoch's answer accuracy."""

    epochs: int
    steps_per_epoch: int
    final_epoch_answer_acc: float


def length_batches(lengths: torch.Tensor, batch_size: int, gen: torch.Generator) -> list[torch.Tensor]:
    """Shuffled batches of similar-length sequences (templates differ in length; padding costs compute)."""
    perm = torch.randperm(len(lengths), generator=gen)
    perm = perm[torch.sort(lengths[perm], stable=True).indices]  # by length, random within a length
    batches = list(perm.split(batch_size))
    order = torch.randperm(len(batches), generator=gen)
    return [batches[i] for i in order]


def train_loop(model: nn.Module, lengths: torch.Tensor, tc: Any, batch_loss: BatchLoss, label: str,
               progress: Any = None, log: Any = None, clock: tuple[float, float] | None = None) -> TrainResult:
    """Train `model` in place over the sequences of `lengths` (one entry per training sequence).

    `tc` is the model's train config (`seed`, `lr`, `weight_decay`, `batch_size`, `max_epochs`,
    `warmup_steps`, and optionally `target_acc`: stop after the first epoch whose running answer
    accuracy reaches it). `batch_loss(b)` runs the model on the sequences of index tensor `b`.
    `clock` is the (wall, cpu) start the log lines count from (now when None).
    """
    t0, c0 = clock if clock is not None else (time.perf_counter(), time.process_time())
    target_acc = getattr(tc, "target_acc", None)
    steps_per_epoch = math.ceil(lengths.shape[0] / tc.batch_size)
    total = steps_per_epoch * tc.max_epochs
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / tc.warmup_steps) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    gen = torch.Generator().manual_seed(tc.seed)
    model.train()
    epoch_acc, epochs = 0.0, 0
    with open_progress(progress) as prog:
        bar = prog.add_task(f"training {label}", total=tc.max_epochs, status="")
        for epoch in range(tc.max_epochs):
            hits = count = 0
            for b in length_batches(lengths, tc.batch_size, gen):
                loss, logits, tgt, m = batch_loss(b)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                with torch.no_grad():
                    hits += int(((logits.argmax(-1) == tgt) & m).sum())
                    count += int(m.sum())
            epochs = epoch + 1
            epoch_acc = hits / count
            prog.update(bar, advance=1, status=f"loss {loss.item():.3f} answer acc {epoch_acc:.3f}")
            if log is not None:
                log(f"epoch {epochs} loss {loss.item():.3f} answer acc {epoch_acc:.4f} "
                    f"{time.perf_counter() - t0:.1f}s wall {time.process_time() - c0:.1f}s cpu")
            if target_acc is not None and epoch_acc >= target_acc:
                break
    model.eval()
    return TrainResult(epochs=epochs, steps_per_epoch=steps_per_epoch, final_epoch_answer_acc=epoch_acc)
