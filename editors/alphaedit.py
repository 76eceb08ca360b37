"""AlphaEdit (Fang et al., ICLR 2025, "AlphaEdit: Null-Space Constrained Knowledge Editing"), name `alphaedit`.

MEMIT's target values z and keys (editors/memit.py, unchanged: same context prefixes, same z
optimisation, same residual spread over the edited layers), with a different layer update:

    ΔW = R Kᵀ P (P (Kᵀ K + K_p) P + λ I)⁻¹           (d_out x d_in, our layout)

- P = U₀ U₀ᵀ projects onto the (approximate) null space of the preserved knowledge's keys: U₀ are
  the eigenvectors of C = E[k kᵀ] (the same corpus statistics MEMIT uses, `editors.stats`) whose
  eigenvalues are below `nullspace_threshold` (the official code: 2e-2, absolute, from the SVD of
  the raw second moment). Every key k₀ of the corpus satisfies P k₀ ≈ 0, so ΔW k₀ ≈ 0: the update
  leaves what the model already knows in place instead of trading it off through w·C as MEMIT does.
- K_p = Σ Kᵀ K over the batches edited before in sequential mode (`remember`; zero for one batch),
  keys read on the model after that batch was applied, as the official `cache_c`.
- λ = `L2` (official: 10 for GPT-2 XL, GPT-J and Llama3-8B).

The official code solves the non-symmetric system (P (KᵀK + K_p) + λI) X = P Kᵀ R. Its solution lies
in P's range (λX = P(…)), so it equals the solution of the symmetric positive definite system
above; we solve that one with the float64 Cholesky of `editors.solvers` (least-squares fallback),
which `tests/editors/test_alphaedit.py` checks against the official form.

`mom2_update_weight` is not used (the official code carries it in its hparams but never reads it).
Hyperparameters: the AlphaEdit repository's files for GPT-2 XL, GPT-J and Llama3-8B (`editors/hparams/
alphaedit/`); tiny-gpt2 and smollm2-135m chosen on the training split (their files say how).
The eigenvalue threshold is absolute, so it depends on the scale of the keys: each run records the
null-space dimension of every layer in `info.prepare.null_dims`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from bench.models import EditableModel
from editors.base import register_editor
from editors.memit import MEMIT, MEMITHparams
from editors.ranges import Range, positive
from editors.solvers import SolveStats, require_finite, solve_spd
from tasks.base import EditRequest


@dataclass
class AlphaEditHparams(MEMITHparams):
    """MEMIT's hyperparameters plus the null-space threshold and λ; defaults: the AlphaEdit repository's GPT-J file."""

    nullspace_threshold: float = 2e-2  # eigenvalues of C below it span the preserved keys' null space
    L2: float = 10.0  # λ of the update's normal equation

    RANGES: ClassVar[dict[str, Range]] = {**MEMITHparams.RANGES, "nullspace_threshold": positive(), "L2": positive()}


def null_space_projector(mom2: Tensor, threshold: float) -> Tensor:
    """P = U₀ U₀ᵀ (float64) over the eigenvectors of the symmetric `mom2` whose eigenvalues are below `threshold`."""
    c = mom2.double()
    evals, evecs = torch.linalg.eigh(0.5 * (c + c.T))  # C is symmetric PSD: eigh = the official SVD
    u0 = evecs[:, evals < threshold]
    return u0 @ u0.T


def projected_update(keys: Tensor, resid: Tensor, proj: Tensor, kept: Tensor | None, lam: float,
                     stats: SolveStats | None = None, layer: str = "") -> Tensor:
    """ΔW = R Kᵀ P (P (KᵀK + K_p) P + λI)⁻¹ (d_out, d_in) for keys (m, d_in), residuals (m, d_out), in float64."""
    require_finite(layer, keys=keys, residuals=resid, projection=proj)
    k = keys.double()
    p = proj.to(device=k.device, dtype=torch.float64)
    m = k.T @ k
    if kept is not None:
        m = m + kept.to(device=k.device, dtype=torch.float64)
    a = p @ m @ p + lam * torch.eye(m.shape[0], dtype=torch.float64, device=k.device)
    rhs = p @ k.T @ resid.to(device=k.device, dtype=torch.float64)  # (d_in, d_out)
    return solve_spd(a, rhs, stats, layer=layer).T


@register_editor("alphaedit")
class AlphaEdit(MEMIT):
    """MEMIT's keys and values written into the null space of the preserved knowledge (AlphaEdit)."""

    hparams_cls = AlphaEditHparams

    def __init__(self, model: EditableModel, hparams: Any = None, ctx: Any = None):
        super().__init__(model, hparams, ctx)
        self._proj: dict[str, Tensor] = {}
        self._kept: dict[str, Tensor] = {}  # per layer: Σ Kᵀ K of the batches kept in sequential mode

    def prepare(self, train: Sequence[EditRequest] = ()) -> None:
        """MEMIT's statistics and context prefixes, then each layer's null-space projection."""
        super().prepare(train)
        assert self._stats is not None
        self._proj = {name: null_space_projector(s.mom2, self.hparams.nullspace_threshold)
                      for name, s in self._stats.items()}
        self._kept = {}

    def prepare_info(self) -> dict[str, Any]:
        info = super().prepare_info()
        if self._proj:
            info["null_dims"] = {name: round(float(p.trace())) for name, p in self._proj.items()}
        return info

    def layer_update(self, keys: Tensor, resid: Tensor, mom2: Tensor, weight: float,  # type: ignore[override]
                     stats: SolveStats | None = None, layer: str = "") -> Tensor:
        """AlphaEdit's projected update of `layer` (`mom2` and `weight` enter through P only)."""
        return projected_update(keys, resid, self._proj[layer], self._kept.get(layer), self.hparams.L2, stats,
                                layer=layer)

    def remember(self, requests: Sequence[EditRequest]) -> None:
        """Add this batch's keys, read on the model that now carries its edit, to K_p of every layer."""
        was_training = self.model.model.training
        self.model.model.eval()
        try:
            for layer, k in self.layer_keys(requests, self.layer_names()).items():
                k = k.double()
                self._kept[layer] = self._kept.get(layer, torch.zeros((), dtype=torch.float64)) + k.T @ k
        finally:
            self.model.model.train(was_training)
