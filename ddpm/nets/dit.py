"""The Diffusion Transformer (Peebles & Xie 2023, DiT): the image cut into p x p patches,
one token each, fixed 2-D sin-cos positions, transformer blocks whose LayerNorms are
scaled, shifted and gated by the conditioning (adaLN-Zero, Sec. 3.2), and a zero-initialised
linear decoder back to the image.

It takes the UNet's call, (x [B, C, H, W], t [B][, y, aug]) -> a tensor of x's shape, and
knows nothing of diffusion: t is any real-valued noise label (a timestep, EDM's c_noise,
flow matching's t), y class labels with -1 the "null" class of classifier-free guidance,
aug EDM's augmentation labels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ddpm.nets.blocks import check_label_sizes, class_index, timestep_embedding

FREQUENCY_DIM = 256  # the noise label's sinusoidal features (DiT's TimestepEmbedder)


def sincos_positions(grid: int, dim: int) -> Tensor:
    """Fixed 2-D sin-cos position embedding of a grid x grid token map, [grid^2, dim]: half
    the channels encode the row, half the column, each as Vaswani et al.'s 1-D sin-cos
    with frequencies 1 / 10000^(2i / (dim / 2)) (as DiT and MAE do)."""
    if dim % 4:
        raise ValueError(f"model.hidden_size={dim} must be divisible by 4 (2-D sin-cos)")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # [D/4]
    pos = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(pos, pos, indexing="ij")  # [grid, grid] each

    def embed(p: Tensor) -> Tensor:
        args = p.reshape(-1, 1) * omega[None]  # [grid^2, 1] * [1, D/4] -> [grid^2, D/4]
        return torch.cat([args.sin(), args.cos()], dim=1)  # [grid^2, D/2]

    return torch.cat([embed(cols), embed(rows)], dim=1).float()  # [grid^2, D]


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: x [B, N, D] scaled by (1 + scale) and shifted, per sample ([B, D])."""
    return x * (1 + scale[:, None]) + shift[:, None]


class Attention(nn.Module):
    """Multi-head self-attention over the tokens, through ``scaled_dot_product_attention``
    (flash / memory-efficient kernels where the device has them)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        # [B, N, 3D] -> [3, B, heads, N, D / heads]
        qkv = (
            self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        )
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(b, n, d))  # [B, heads, N, d] -> [B, N, D]


class DiTBlock(nn.Module):
    """A transformer block with adaLN-Zero (Peebles & Xie 2023, Sec. 3.2 and Fig. 3): the
    conditioning c regresses shift, scale and a gate for the attention and for the MLP;
    the gates start at zero, so every block starts as the identity."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim)
        )
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        # [B, 6D] -> six [B, D]: shift, scale, gate of the attention, then of the MLP
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1))
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm, then a linear map of each token to its p x p x C patch."""

    def __init__(self, dim: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # [B, 2D] -> 2 x [B, D]
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    """DiT of ``depth`` blocks of width ``hidden_size`` with ``num_heads`` heads over
    (image_size / patch_size)^2 tokens. ``num_classes`` > 0 adds a class embedding with a
    null class (y = -1) for classifier-free guidance; ``augment_dim`` > 0 a linear map of
    EDM's augmentation labels; both are added to the noise label's embedding to form the
    conditioning c. ``out_channels`` defaults to ``in_channels`` (DiT's learned-sigma
    channels are the paper's; here an objective's target has the image's shape)."""

    def __init__(
        self,
        image_size: int,
        in_channels: int = 3,
        out_channels: int | None = None,
        patch_size: int = 2,
        hidden_size: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        num_classes: int = 0,
        augment_dim: int = 0,
        checkpointing: bool = False,
    ) -> None:
        super().__init__()
        _validate(image_size, in_channels, patch_size, hidden_size, depth, num_heads, mlp_ratio)
        check_label_sizes(num_classes, augment_dim)
        self.image_size = image_size
        self.in_channels = in_channels
        self.out_channels = out_channels or in_channels
        self.patch_size = patch_size
        self.num_classes = num_classes
        self.augment_dim = augment_dim
        self.checkpointing = bool(checkpointing)
        self.grid = image_size // patch_size
        self.x_embedder = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        # fixed, not learned (Sec. 3.2): recomputed at construction, kept out of state_dict
        self.register_buffer(
            "pos_embed", sincos_positions(self.grid, hidden_size)[None], persistent=False
        )
        self.t_embedder = nn.Sequential(
            nn.Linear(FREQUENCY_DIM, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )
        # index num_classes is the null class (Ho & Salimans 2022; DiT's LabelEmbedder)
        self.y_embedder = nn.Embedding(num_classes + 1, hidden_size) if num_classes else None
        self.aug_embedder = nn.Linear(augment_dim, hidden_size, bias=False) if augment_dim else None
        self.blocks = nn.ModuleList(
            DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self._init_weights()

    def _init_weights(self) -> None:
        """DiT's initialisation: Xavier-uniform linear layers with zero biases, the patch
        embedding as a linear layer, N(0, 0.02) for the noise-label MLP and the class table,
        and zero for every adaLN regression and the decoder (adaLN-Zero: the net starts as
        a zero map)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        w = self.x_embedder.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # [D, C, p, p] as [D, C p p]
        nn.init.zeros_(self.x_embedder.bias)
        for layer in (self.t_embedder[0], self.t_embedder[2]):
            nn.init.normal_(layer.weight, std=0.02)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.weight, std=0.02)
        for block in [*self.blocks, self.final_layer]:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def forward(
        self, x: Tensor, t: Tensor, y: Tensor | None = None, aug: Tensor | None = None
    ) -> Tensor:
        b, _, h, w = x.shape
        if (h, w) != (self.image_size, self.image_size):
            raise ValueError(
                f"the net was built for {self.image_size}x{self.image_size} images, got {h}x{w}"
            )
        tokens = self.x_embedder(x).flatten(2).transpose(1, 2)  # [B, D, g, g] -> [B, g^2, D]
        tokens = tokens + self.pos_embed.to(tokens.dtype)
        c = self.t_embedder(timestep_embedding(t.reshape(-1).expand(b), FREQUENCY_DIM))
        if self.y_embedder is not None:
            if y is None:
                y = torch.full((b,), -1, dtype=torch.long, device=x.device)
            c = c + self.y_embedder(class_index(y, self.num_classes))
        elif y is not None:
            raise ValueError("this model is unconditional (model.num_classes=0): it takes no y")
        if self.aug_embedder is not None and aug is not None:
            c = c + self.aug_embedder(aug.to(c.dtype))
        for block in self.blocks:
            if self.checkpointing and torch.is_grad_enabled():
                tokens = checkpoint(block, tokens, c, use_reentrant=False)
            else:
                tokens = block(tokens, c)
        return self.unpatchify(self.final_layer(tokens, c))

    def unpatchify(self, tokens: Tensor) -> Tensor:
        """Tokens [B, g^2, p p C] (row-major over the g x g grid, as the patch embedding
        reads them) back to images [B, C, g p, g p]."""
        b, p, g, ch = tokens.shape[0], self.patch_size, self.grid, self.out_channels
        out = tokens.reshape(b, g, g, p, p, ch)  # [B, g^2, p p C] -> [B, g, g, p, p, C]
        return torch.einsum("bhwpqc->bchpwq", out).reshape(b, ch, g * p, g * p)


def _validate(
    image_size: int,
    in_channels: int,
    patch_size: int,
    hidden_size: int,
    depth: int,
    num_heads: int,
    mlp_ratio: float,
) -> None:
    """Refuse a configuration the DiT cannot run, naming the key and what is allowed."""
    if patch_size < 1 or image_size % patch_size:
        raise ValueError(
            f"model.patch_size={patch_size} must divide data.image_size={image_size}; choose "
            f"one of {[p for p in (1, 2, 4, 8) if image_size % p == 0]}"
        )
    if in_channels < 1:
        raise ValueError(f"model.in_channels={in_channels} must be >= 1")
    if num_heads < 1 or hidden_size < 4 or hidden_size % (4 * num_heads):
        raise ValueError(
            f"model.hidden_size={hidden_size} must be divisible by 4 x model.num_heads="
            f"{num_heads} (the 2-D sin-cos positions take a quarter of it per sin/cos and axis)"
        )
    if depth < 1:
        raise ValueError(f"model.depth={depth} must be >= 1")
    if not mlp_ratio > 0 or not math.isfinite(mlp_ratio):
        raise ValueError(f"model.mlp_ratio={mlp_ratio} must be > 0")
