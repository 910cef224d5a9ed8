"""Network building blocks shared by the models (no objectives here).

- :class:`ResidualMLP`: dense residual MLP over the flattened shower, modulated by an
  embedding (time and/or conditions); the choice for small detectors (V up to a few
  thousand).
- :class:`LayerTokenNet`: each readout layer is compressed by its own linear map to a
  token, a small transformer mixes the layer tokens with the embedding, and per-layer
  linear maps expand back; parameters grow like V x token_dim instead of V x hidden, the
  choice for large detectors (V > 5000) and for geometries whose layers differ in shape.
- :class:`LayerTransformer`: the same layer tokens with in/out maps shared by equal layers and
  adaLN-conditioned blocks (DiT); the velocity net of ``layer-fm``, linear in V.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MLP", "LayerTokenNet", "LayerTransformer", "ResidualMLP", "SinusoidalEmbedding", "auto_net",
           "ema_update"]

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
        # unbind, not tok[:, i]: each select's backward zero-fills a full (B, L, dim) gradient, 45 of them
        # per step on par04 (a third of the step's CPU time); unbind's backward is one stack
        return torch.cat([f(t) for f, t in zip(self.out, tok.unbind(1), strict=True)], dim=1)


class _SelfAttention(nn.Module):
    """Multi-head self-attention over tokens (B, T, D) written out in matmuls: nn.MultiheadAttention's
    inference fast path (``_native_multi_head_attention``) has no ONNX export."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"token width {dim} is not a multiple of heads={heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, h: Tensor) -> Tensor:
        b, t, d = h.shape
        q, k, v = self.qkv(h).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        w = torch.softmax(q @ k.transpose(-2, -1) * (d // self.heads) ** -0.5, dim=-1)
        return self.proj((self.drop(w) @ v).transpose(1, 2).reshape(b, t, d))


class _AdaBlock(nn.Module):
    """Pre-norm transformer block whose norms are shifted, scaled and gated by an embedding (DiT's adaLN-zero,
    arXiv:2212.09748): the modulation starts at zero, so every block starts as the identity. SiLU and an MLP
    ratio of 2: exact GELU's backward alone took a sixth of a CPU training step."""

    def __init__(self, dim: int, emb_dim: int, heads: int, dropout: float, mlp_ratio: int = 2) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False)
        self.attn = _SelfAttention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.SiLU(), nn.Linear(mlp_ratio * dim, dim))
        self.mod = nn.Linear(emb_dim, 6 * dim)
        nn.init.zeros_(self.mod.weight)
        nn.init.zeros_(self.mod.bias)

    def forward(self, h: Tensor, e: Tensor) -> Tensor:
        gate1, scale1, shift1, gate2, scale2, shift2 = self.mod(e).unsqueeze(1).chunk(6, dim=2)
        a = self.norm1(h) * (1 + scale1) + shift1
        h = h + gate1 * self.attn(a)
        return h + gate2 * self.mlp(self.norm2(h) * (1 + scale2) + shift2)


class LayerTransformer(nn.Module):
    """(x (B, V), layer features f (B, L, F), emb (B, E)) -> (B, V): one token per ``group`` readout layers.

    The voxels of ``group`` adjacent layers are mapped to a ``dim``-wide token, the tokens get a
    learned position and their layers' features (the layer energies, say), ``depth`` adaLN
    transformer blocks conditioned on ``emb`` mix them, and each token is mapped back to its voxels.
    When every layer has the same number of voxels the in and out maps are shared by all tokens, so
    the parameters are O(group x V / L x dim + depth x dim^2) and the cost per shower
    O(V x dim + T x depth x dim^2 + T^2 x dim) with T = L / group tokens: linear in the number of cells.

    Args:
        layer_sizes: voxels per readout layer (sums to V).
        n_features: F, features per layer.
        emb_dim: E, width of the conditioning embedding.
        dim, depth, heads, dropout: token width, blocks, attention heads, dropout.
        group: adjacent layers per token (equal layers only; must divide L).
        head_dim: 0 maps each token linearly back to its voxels; k > 0 gives every voxel a k-wide hidden unit
            that sees the token's context *and the voxel's own input value*, then one shared k -> 1 map.

    Why the voxel head: a token of P = group x V/L voxels is squeezed into ``dim`` < P numbers, so a linear
    out map can only return a function of ``dim`` projections of the input; the other P - dim directions
    of x never reach the output. For a flow-matching velocity, which must know each voxel's current value,
    that left the loss at the unexplained fraction (par04-ds2, P = 432, dim = 128: 1.32 of the target's 2.0,
    close to 2 x 304 / 432) and the generated shares carried the unseen noise.
    """

    def __init__(self, layer_sizes: Sequence[int], n_features: int, emb_dim: int, dim: int = 128, depth: int = 4,
                 heads: int = 4, dropout: float = 0.0, group: int = 1, head_dim: int = 0,
                 neighbours: Tensor | None = None) -> None:
        """``neighbours`` (V, m) indices into x (with ``head_dim``): each voxel's unit also sees those m inputs,
        through weights shared by all voxels that start at zero (see :func:`~fastshower.models.layer_fm.stencil`)."""
        super().__init__()
        self.layer_sizes = [int(n) for n in layer_sizes]
        n_layers = len(self.layer_sizes)
        self.shared = len(set(self.layer_sizes)) == 1
        if group < 1 or n_layers % group or (group > 1 and not self.shared):
            raise ValueError(f"group={group} must be >= 1 and divide the {n_layers} layers, which must all have "
                             "the same number of voxels when group > 1")
        self.group, self.n_tokens = group, n_layers // group
        sizes = [group * self.layer_sizes[0]] if self.shared else self.layer_sizes
        self.inp = nn.ModuleList(nn.Linear(n, dim) for n in sizes)
        self.head_dim = int(head_dim)
        k = max(self.head_dim, 1)
        self.out = nn.ModuleList(nn.Linear(dim, n * k) for n in sizes)
        self.out_bias = nn.Parameter(torch.zeros(sum(self.layer_sizes)))  # per voxel: shared maps lack one
        if self.head_dim:
            self.head_in = nn.Parameter(torch.randn(k) / 2)  # the voxel's own value into its hidden unit
            self.head_bias = nn.Parameter(torch.zeros(sum(self.layer_sizes), k))
            self.head_out = nn.Linear(k, 1, bias=False)
        if neighbours is not None and (not self.head_dim or neighbours.shape[0] != sum(self.layer_sizes)):
            raise ValueError(f"neighbours must be (V={sum(self.layer_sizes)}, m) indices and need head_dim > 0")
        self.register_buffer("nb_index", None if neighbours is None else neighbours.long(), persistent=False)
        if neighbours is not None:
            self.head_nb = nn.Parameter(torch.zeros(neighbours.shape[1], k))
        self.pos = nn.Parameter(torch.randn(self.n_tokens, dim) * 0.02)
        self.feat = nn.Linear(group * n_features, dim)
        self.blocks = nn.ModuleList(_AdaBlock(dim, emb_dim, heads, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.out_mod = nn.Linear(emb_dim, 2 * dim)
        nn.init.zeros_(self.out_mod.weight)
        nn.init.zeros_(self.out_mod.bias)

    nb_index: Tensor | None

    def tokens(self, x: Tensor) -> Tensor:
        """Showers (B, V) -> tokens (B, T, dim) before position and features."""
        if self.shared:
            return self.inp[0](x.reshape(x.shape[0], self.n_tokens, -1))
        parts = torch.split(x, self.layer_sizes, dim=1)
        return torch.stack([f(p) for f, p in zip(self.inp, parts, strict=True)], dim=1)

    def voxels(self, h: Tensor, x: Tensor) -> Tensor:
        """Tokens (B, T, dim) and the input x (B, V) -> showers (B, V)."""
        if self.shared:
            u = self.out[0](h).reshape(h.shape[0], -1)
        else:
            u = torch.cat([f(t) for f, t in zip(self.out, h.unbind(1), strict=True)], dim=1)
        if not self.head_dim:
            return u + self.out_bias
        u = u.reshape(x.shape[0], x.shape[1], self.head_dim) + self.head_bias + x.unsqueeze(2) * self.head_in
        if self.nb_index is not None:
            u = u + x[:, self.nb_index] @ self.head_nb  # (B, V, m) @ (m, k)
        return self.head_out(F.silu(u)).squeeze(2) + self.out_bias

    def forward(self, x: Tensor, f: Tensor, emb: Tensor) -> Tensor:
        h = self.tokens(x) + self.pos + self.feat(f.reshape(f.shape[0], self.n_tokens, -1))
        for blk in self.blocks:
            h = blk(h, emb)
        g, b = self.out_mod(emb).unsqueeze(1).chunk(2, dim=2)
        return self.voxels(self.norm(h) * (1 + g) + b, x)


@torch.no_grad()
def ema_update(ema: nn.Module, net: nn.Module, decay: float, step: int) -> None:
    """Move ``ema``'s weights towards ``net``'s and copy its buffers; the decay is warm-started
    (min(decay, (1 + step) / (10 + step))) so that early on the average follows the fast-moving weights closely."""
    d = min(decay, (1 + step) / (10 + step))
    for pe, p in zip(ema.parameters(), net.parameters(), strict=True):
        pe.lerp_(p, 1 - d)
    for be, b in zip(ema.buffers(), net.buffers(), strict=True):
        be.copy_(b)
