"""Network building blocks shared by the models (no objectives here).

- :class:`ResidualMLP`: dense residual MLP over the flattened shower, modulated by an
  embedding (time and/or conditions); the choice for small detectors (V up to a few
  thousand).
- :class:`LayerTokenNet`: each readout layer is compressed by its own linear map to a
  token, a small transformer mixes the layer tokens with the embedding, and per-layer
  linear maps expand back; parameters grow like V x token_dim instead of V x hidden, the
  choice for large detectors (V > 5000) and for geometries whose layers differ in shape.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MLP", "LayerTokenNet", "ResidualMLP", "SinusoidalEmbedding", "auto_net"]

#: above this many voxels, ``net="auto"`` picks the per-layer network
LARGE_V = 5000


def auto_net(net: str, n_voxels: int) -> str:
    """Resolve ``net="auto"``: "mlp" for V <= 5000, else "layers"."""
    if net == "auto":
        return "mlp" if n_voxels <= LARGE_V else "layers"
    if net not in ("mlp", "layers"):
        raise ValueError(f"unknown net {net!r}; choose auto, mlp or layers")
    return net


class SinusoidalEmbedding(nn.Module):
    """t in [0, 1] (B,) or (B, 1) -> (B, 2 n_freqs) sin/cos features at log-spaced frequencies."""

    freqs: Tensor

    def __init__(self, n_freqs: int = 16, max_freq: float = 1000.0) -> None:
        super().__init__()
        self.register_buffer("freqs", torch.exp(torch.linspace(0.0, math.log(max_freq), n_freqs)))

    def forward(self, t: Tensor) -> Tensor:
        a = t.reshape(-1, 1) * self.freqs
        return torch.cat([torch.sin(a), torch.cos(a)], dim=1)


class MLP(nn.Sequential):
    """Linear-SiLU stack: sizes [in, h1, ..., out] (no activation after the last layer)."""

    def __init__(self, sizes: Sequence[int]) -> None:
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(itertools.pairwise(sizes)):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(nn.SiLU())
        super().__init__(*layers)


class _ResBlock(nn.Module):
    def __init__(self, dim: int, emb_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.emb = nn.Linear(emb_dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, h: Tensor, e: Tensor) -> Tensor:
        z = F.silu(self.fc1(self.norm(h)) + self.emb(e))
        return h + self.fc2(self.drop(z))


class ResidualMLP(nn.Module):
    """(x (B, D_in), emb (B, E)) -> (B, D_out): pre-norm residual blocks, embedding added in every block."""

    def __init__(self, d_in: int, d_out: int, emb_dim: int, hidden: int = 256, depth: int = 4,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.inp = nn.Linear(d_in, hidden)
        self.blocks = nn.ModuleList(_ResBlock(hidden, emb_dim, dropout) for _ in range(depth))
        self.out_norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, d_out)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.inp(x)
        for blk in self.blocks:
            h = blk(h, emb)
        return self.out(F.silu(self.out_norm(h)))


class LayerTokenNet(nn.Module):
    """(x (B, V), emb (B, E)) -> (B, V) through one token per readout layer.

    Args:
        layer_sizes: voxels per readout layer (sums to V).
        emb_dim: width of the embedding added to every token.
        token_dim: token width.
        depth: transformer layers across the layer tokens.
        heads: attention heads.
    """

    def __init__(self, layer_sizes: Sequence[int], emb_dim: int, token_dim: int = 128, depth: int = 2,
                 heads: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        self.layer_sizes = [int(n) for n in layer_sizes]
        self.inp = nn.ModuleList(nn.Linear(n, token_dim) for n in self.layer_sizes)
        self.pos = nn.Parameter(torch.randn(len(self.layer_sizes), token_dim) * 0.02)
        self.emb = nn.Linear(emb_dim, token_dim)
        layer = nn.TransformerEncoderLayer(token_dim, heads, 4 * token_dim, dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        # nested tensors are an inference fast path irrelevant here; disabling keeps export and warnings clean
        self.mixer = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(token_dim)
        self.out = nn.ModuleList(nn.Linear(token_dim, n) for n in self.layer_sizes)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        parts = torch.split(x, self.layer_sizes, dim=1)
        tok = torch.stack([f(p) for f, p in zip(self.inp, parts, strict=True)], dim=1)
        tok = tok + self.pos + self.emb(emb).unsqueeze(1)
        tok = self.norm(self.mixer(tok))
        return torch.cat([f(tok[:, i]) for i, f in enumerate(self.out)], dim=1)
