"""The hyper-network g_θ shared by MALMEN and the MEND reimplementation (MALMEN App. A.1, A.6).

g_θ maps a cached tuple (key u, value gradient ∇v) of an edited linear layer to a pseudo key ũ and
a pseudo gradient ∇̃v. Its input [u; ∇v] is normalised by running mean / std statistics that
are updated only by explicit `observe` calls (the meta-training loop makes them; validation and
editing never do), then passes through `n_blocks` residual low-rank blocks. The default block is the official code's
(ChenmienTan/malmen, nets.py):

    h <- h + s_ℓ ⊙ max(h A B + b, 0) + o_ℓ,      A: (d+d', r) ~ N(0, 1), B: (r, d+d') = 0,

with B zero-initialised, so that g_θ is the identity (on the normalised input) at initialisation.
The activation sits after the full low-rank product; its gradient at init still reaches B, because
the clamp passes gradient at 0 (torch's `clamp(min=0)` has derivative 1 at 0, `relu` has 0), and
the unscaled A makes one Adam step move the output by O(r · meta_lr · ‖h‖), which is what lets
the paper's meta-lr 1e-5 train g_θ at all.
One such network serves all edited layers of the same shape (d, d'); each layer ℓ has its own
scale s_ℓ (init 1) and shift o_ℓ (init 0) per block, its own edit learning rate η_ℓ (init 1e-6,
unconstrained, as in the paper) and its own regularisation λ_ℓ = exp(ρ_ℓ) (positive by
construction; ρ_ℓ is the trained parameter, initialised to log λ₀).

`block="inner_relu"` keeps an earlier variant of this harness, h + s_ℓ ⊙ (ReLU(h A + b₁) B + b₂) + o_ℓ
with A ~ N(0, 1/(d+d')); it is not the paper's and is kept only for comparison (docs/malmen.md).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

_NORM_EPS = 1e-7  # added to the std, as MEND does, so constant features do not divide by zero


class RunningNorm(nn.Module):
    """Feature-wise running mean / std (Chan et al.'s parallel update), applied as (x - μ) / (σ + ε)."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(dim, dtype=torch.float64))

    @torch.no_grad()
    def observe(self, x: Tensor) -> None:
        """Fold a batch (n, dim) into the statistics in one vectorised update."""
        x = x.detach().to(self.mean.dtype)
        n_b = x.shape[0]
        if n_b == 0:
            return
        mean_b = x.mean(0)
        m2_b = ((x - mean_b) ** 2).sum(0)
        n_a = self.count.clone()
        tot = n_a + n_b
        delta = mean_b - self.mean
        self.mean += delta * (n_b / tot)
        self.m2 += m2_b + delta**2 * (n_a * n_b / tot)
        self.count.copy_(tot)

    def std(self) -> Tensor:
        if float(self.count) < 2:  # nothing observed yet: identity normalisation
            return torch.ones_like(self.mean)
        return (self.m2 / (self.count - 1)).sqrt()

    def forward(self, x: Tensor) -> Tensor:
        if float(self.count) < 1:
            return x
        mean = self.mean.to(x.dtype)
        return (x - mean) / (self.std().to(x.dtype) + _NORM_EPS)


BLOCKS = ("official", "inner_relu")


class LowRankBlock(nn.Module):
    """Residual block h + s_ℓ ⊙ max(h A B + b, 0) + o_ℓ (official); identity at init (B = 0)."""

    def __init__(self, dim: int, rank: int, n_layers: int, kind: str = "official"):
        super().__init__()
        if kind not in BLOCKS:
            raise ValueError(f"block must be one of {BLOCKS}, got {kind!r}")
        self.kind = kind
        std = 1.0 if kind == "official" else 1.0 / math.sqrt(dim)
        self.down = nn.Parameter(torch.randn(dim, rank) * std)
        # The official block has one bias, after the product; the inner-ReLU variant a second one inside.
        self.down_bias = nn.Parameter(torch.zeros(rank)) if kind == "inner_relu" else None
        self.up = nn.Parameter(torch.zeros(rank, dim))
        self.up_bias = nn.Parameter(torch.zeros(dim))
        self.scale = nn.Parameter(torch.ones(n_layers, dim))
        self.shift = nn.Parameter(torch.zeros(n_layers, dim))

    def forward(self, h: Tensor, layer: int) -> Tensor:
        if self.down_bias is None:
            z = (h @ self.down @ self.up + self.up_bias).clamp(min=0)
        else:
            z = torch.relu(h @ self.down + self.down_bias) @ self.up + self.up_bias
        return h + self.scale[layer] * z + self.shift[layer]


class ShapeNet(nn.Module):
    """The network shared by all edited layers of one shape (d, d')."""

    def __init__(self, d_in: int, d_out: int, rank: int, n_blocks: int, n_layers: int, block: str = "official"):
        super().__init__()
        self.d_in, self.d_out = d_in, d_out
        self.norm = RunningNorm(d_in + d_out)
        self.blocks = nn.ModuleList(LowRankBlock(d_in + d_out, rank, n_layers, block) for _ in range(n_blocks))

    def forward(self, keys: Tensor, grads: Tensor, layer: int) -> tuple[Tensor, Tensor]:
        h = self.norm(torch.cat([keys, grads], -1))
        for block in self.blocks:
            h = block(h, layer)
        return h[:, : self.d_in], h[:, self.d_in :]


class HyperNet(nn.Module):
    """g_θ for a set of edited layers, plus per-layer η_ℓ and λ_ℓ = exp(ρ_ℓ)."""

    def __init__(self, layer_dims: Mapping[str, tuple[int, int]], rank: int, n_blocks: int,
                 lr_init: float, lam_init: float, block: str = "official"):
        super().__init__()
        self.layers = list(layer_dims)
        groups: dict[str, list[str]] = {}
        for name, (d_in, d_out) in layer_dims.items():
            groups.setdefault(f"{d_in}x{d_out}", []).append(name)
        # where each layer lives: (shape key, index inside that shape's per-layer scale/shift)
        self.where = {n: (k, members.index(n)) for k, members in groups.items() for n in members}
        self.nets = nn.ModuleDict({
            k: ShapeNet(*layer_dims[members[0]], rank, n_blocks, len(members), block) for k, members in groups.items()
        })
        self.lr = nn.Parameter(torch.full((len(self.layers),), float(lr_init)))
        self.log_lam = nn.Parameter(torch.full((len(self.layers),), math.log(lam_init)))

    def index(self, name: str) -> int:
        return self.layers.index(name)

    def eta(self, name: str) -> Tensor:
        """Edit learning rate η_ℓ of a layer."""
        return self.lr[self.index(name)]

    def lam(self, name: str) -> Tensor:
        """Regularisation λ_ℓ = exp(ρ_ℓ) > 0 of a layer."""
        return self.log_lam[self.index(name)].exp()

    def observe(self, name: str, keys: Tensor, grads: Tensor) -> None:
        """Update the input statistics of the layer's shape network (meta-training only)."""
        key, _ = self.where[name]
        self.nets[key].norm.observe(torch.cat([keys, grads], -1))

    def has_statistics(self) -> bool:
        """True when every shape network's normaliser has observed at least two tuples."""
        return all(float(net.norm.count) >= 2 for net in self.nets.values())

    def forward(self, name: str, keys: Tensor, grads: Tensor) -> tuple[Tensor, Tensor]:
        """(ũ, ∇̃v) for tuples (n, d), (n, d') of layer `name`."""
        key, idx = self.where[name]
        return self.nets[key](keys, grads, idx)
