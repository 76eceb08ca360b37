"""MEND as re-implemented in the MALMEN paper (Appendix A.1, A.2, A.7).

The same hyper-network, meta loss and training as MALMEN (editors/malmen.py); the aggregation
differs, and so do the cached positions: MEND caches every token of prompt and answer
(`cache=all`, the official config/editor/mend.yaml `token: all`), MALMEN the answer tokens. The
per-token rank-1 shifts S_j = -η ∇̃v_j ũ_jᵀ are summed,
S* = -η Σ_j ∇̃v_j ũ_jᵀ (computed as one (d', n) x (n, d) product, never forming S_j). There is no
λ. Its meta-gradient has the analogous two-stage form: ∂L/∂S* = ∇W̃, and the proxy
Σ_chunks tr(∇W̃ᵀ S*_chunk) is back-propagated through g_θ chunk by chunk. The mean residual uses
d_j = S_j u_j, as in the paper's Figure 8. Hyperparameters are otherwise MALMEN's (the paper uses identical
ones for both, A.6); per-model overrides in `editors/hparams/mend/<model>.json`. The paper's
"sum of parameter shifts" ablation (Table 1) is `--editor malmen --set shift=sum`: MALMEN's
answer-token cache with MEND's aggregation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from editors.base import register_editor
from editors.malmen import MalmenEditor, MalmenHParams
from editors.ranges import Range, one_of


@dataclass
class MendHParams(MalmenHParams):
    """MALMEN's hyperparameters with the sum of shifts as the aggregation and every token cached."""

    shift: str = "sum"
    cache: str = "all"
    RANGES: ClassVar[dict[str, Range]] = {**MalmenHParams.RANGES, "shift": one_of("sum")}  # malmen's, summed shifts only

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.shift != "sum":
            raise ValueError("mend aggregates by summing shifts; use --editor malmen for the normal equation")


@register_editor("mend")
class MendEditor(MalmenEditor):
    """MEND: hyper-network shifts summed over tokens."""

    hparams_cls = MendHParams
