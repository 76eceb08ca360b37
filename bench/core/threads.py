"""Pinning torch's intra-op thread count for a block of work."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run with `n` intra-op threads (None or 0: leave the setting), restoring it afterwards.

    Used where results must not depend on the machine: float reductions are split across threads,
    so the same training run on 1 and on 2 threads gives (slightly) different weights."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
