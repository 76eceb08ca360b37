"""Key geometry of a batch edit: how far any least-squares shift of m edits reaches other prompts.

For an edited linear with edit keys K (rows u_j, n tuples), the ridge shift of MALMEN (and, with C
in place of λI, of MEMIT) moves any key q by

    S* q = Σ_j α_j(q) d_j,    α(q) = (K Kᵀ + λ I)⁻¹ K q    (push-through identity),

whatever the value differences d_j are. For an edit key α(u_j) ≈ e_j at small λ. The *reach* ‖α(q)‖
of an unrelated prompt's key says how strongly an edit spills onto it: when it is as large as the
reach of the edited prompts' own keys, no choice of d_j — so no hyper-network, no z optimisation —
can move the edited facts without moving the unrelated ones by a comparable amount (unless the d_j
cancel along α, which different edit targets do not). Moved is not flipped: whether a moved key
changes its answer also depends on the fact's margin (on tiny-gpt2 at m = 64, probes with reach ~1
keep their answers once the model holds them by 8+ nats; README "tiny-gpt2"). `bench keys` prints
these numbers per layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from bench.models import EditableModel
from editors.caching import cache_tuples
from editors.solvers import solve_spd
from tasks.base import EditRequest


@dataclass
class LayerGeometry:
    """Reach of one layer's edit keys at one λ (means over tuples), and the keys' effective dimension."""

    module: str
    lam: float
    n_edit_tuples: int
    self_coef: float  # mean α_j(u_j): how much of its own shift an edit key receives
    edit_reach: float  # mean ‖α(u_j)‖ over edit keys
    equiv_reach: float  # mean ‖α(q)‖ over the rephrases' keys (should be ≈ edit_reach)
    unrel_reach: float  # mean ‖α(q)‖ over the unrelated prompts' keys (should be ≪ edit_reach)
    dims90: int  # directions holding 90 % of the energy of all keys seen (edit, rephrase, unrelated)
    key_dim: int

    def as_dict(self) -> dict[str, float | int | str]:
        """Plain dict for JSON output."""
        return asdict(self)


def reach(keys: Tensor, queries: Tensor, lam: float) -> Tensor:
    """α(q) = (K Kᵀ + λI)⁻¹ K q for every query row, as columns (n_keys, n_queries), in float64."""
    k, q = keys.double(), queries.double()
    a = k @ k.T + lam * torch.eye(k.shape[0], dtype=k.dtype, device=k.device)
    return solve_spd(a, k @ q.T)


def energy_dims(keys: Tensor, fraction: float = 0.9) -> int:
    """Number of singular directions that hold `fraction` of the keys' energy (sum of squares)."""
    s2 = torch.linalg.svdvals(keys.double()) ** 2
    if float(s2.sum()) == 0.0:
        return 0
    cum = s2.cumsum(0) / s2.sum()
    return int((cum < fraction).sum()) + 1


def key_geometry(em: EditableModel, requests: Sequence[EditRequest], modules: Sequence[str],
                 lams: Sequence[float], cache: str = "answer", micro_batch: int = 16) -> list[LayerGeometry]:
    """Reach of the edit keys of `requests` onto their rephrases and unrelated prompts, per layer and λ."""
    targets = [r.target for r in requests]
    edit = cache_tuples(em, [r.prompt for r in requests], targets, modules, cache, micro_batch)
    with_reph = [r for r in requests if r.rephrases]
    equiv = cache_tuples(em, [r.rephrases[0] for r in with_reph], [r.target for r in with_reph], modules,
                         cache, micro_batch) if with_reph else None
    unrel = cache_tuples(em, [r.locality_prompt for r in requests], [r.locality_answer for r in requests],
                         modules, cache, micro_batch)
    out: list[LayerGeometry] = []
    for n in modules:
        k, u = edit.keys[n], unrel.keys[n]
        e = equiv.keys[n] if equiv is not None else k[:0]
        dims = energy_dims(torch.cat([k, u, e]))
        for lam in lams:
            # one Gram matrix and one solve per λ for the three kinds of query, split afterwards
            own, a_u, a_e = reach(k, torch.cat([k, u, e]), lam).split([len(k), len(u), len(e)], dim=1)
            out.append(LayerGeometry(
                module=n, lam=float(lam), n_edit_tuples=k.shape[0],
                self_coef=float(own.diagonal().mean()), edit_reach=float(own.norm(dim=0).mean()),
                equiv_reach=float(a_e.norm(dim=0).mean()) if len(e) else float("nan"),
                unrel_reach=float(a_u.norm(dim=0).mean()), dims90=dims, key_dim=k.shape[1]))
    return out
