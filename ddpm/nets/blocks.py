"""The UNet's building blocks (Ho et al. 2020, Appendix B; with the options of Dhariwal &
Nichol 2021's ADM: resampling residual blocks as in BigGAN, and the noise embedding as a
scale and shift of the normalised activations, their ``use_scale_shift_norm``)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of integer timesteps (Vaswani et al. 2017, Sec. 3.5; as in
    Ho et al. 2020's ``get_timestep_embedding``): [sin(t w_i), cos(t w_i)]."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period)
        * torch.arange(half, device=t.device, dtype=torch.float32)
        / (half - 1)
    )
    args = t.float()[:, None] * freqs[None, :]  # [B, 1] * [1, half] -> [B, half]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)  # [B, 2 * half]
    return F.pad(emb, (0, dim % 2))


def check_label_sizes(num_classes: int, augment_dim: int) -> None:
    """Refuse class and augmentation-label counts a net cannot embed (UNet and DiT alike)."""
    if not isinstance(num_classes, int) or num_classes < 0:
        raise ValueError(
            f"model.num_classes={num_classes!r} must be an integer >= 0 (0: unconditional; "
            "data.conditional=true sets it from the data)"
        )
    if not isinstance(augment_dim, int) or augment_dim < 0:
        raise ValueError(f"model.augment_dim={augment_dim!r} must be an integer >= 0")


def class_index(y: Tensor, num_classes: int) -> Tensor:
    """Class labels [B] as rows of a table of num_classes + 1: label -1 ("no label") is the
    extra null class of classifier-free guidance (Ho & Salimans 2022, Sec. 3.2)."""
    return torch.where(y < 0, torch.full_like(y, num_classes), y)


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups where the width allows it (Wu & He 2018), fewer otherwise."""
    groups = math.gcd(32, channels)
    return nn.GroupNorm(groups, channels, eps=1e-6)


RESAMPLE = ("none", "down", "up")


def resample(x: Tensor, how: str) -> Tensor:
    """``down``: 2x2 average pooling; ``up``: nearest-neighbour x2 (ADM's resampling inside
    a residual block, on both of its paths); ``none``: x."""
    if how == "down":
        return F.avg_pool2d(x, 2)
    if how == "up":
        return F.interpolate(x, scale_factor=2.0, mode="nearest")
    return x


class ResBlock(nn.Module):
    """GN-SiLU-conv, + projected time embedding, GN-SiLU-dropout-conv, residual.

    ``resample`` ``down``/``up`` halves or doubles H and W inside the block, between the
    first activation and convolution, and on the skip path (BigGAN's residual resampling,
    ADM's ``resblock_updown``). ``scale_shift`` projects the embedding to a scale and a
    shift of the second normalisation, GN(h) (1 + scale) + shift (ADM's
    ``use_scale_shift_norm``), instead of adding it to h."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        temb_ch: int,
        dropout: float,
        resample: str = "none",
        scale_shift: bool = False,
    ) -> None:
        super().__init__()
        self.resample, self.scale_shift = resample, scale_shift
        self.norm1 = group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb_proj = nn.Linear(temb_ch, 2 * out_ch if scale_shift else out_ch)
        self.norm2 = group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.conv1(resample(F.silu(self.norm1(x)), self.resample))
        emb = self.temb_proj(F.silu(temb))[:, :, None, None]  # [B, C or 2C] -> [B, ., 1, 1]
        if self.scale_shift:
            scale, shift = emb.chunk(2, dim=1)  # 2 x [B, C, 1, 1]
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + emb)
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(resample(x, self.resample)) + h


class AttentionBlock(nn.Module):
    """Spatial self-attention over all H*W positions, through scaled_dot_product_attention."""

    def __init__(self, channels: int, num_heads: int = 1, head_channels: int | None = None) -> None:
        super().__init__()
        if head_channels is not None:  # a fixed width per head (ADM: 64), heads from it
            if channels % head_channels:
                raise ValueError(
                    f"model.attention_head_channels={head_channels} must divide the width "
                    f"{channels} at every attention resolution"
                )
            num_heads = channels // head_channels
        if channels % num_heads != 0:
            raise ValueError(
                f"model.attention_heads={num_heads} must divide the width {channels} at "
                "every attention resolution"
            )
        self.num_heads = num_heads
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x))
        # [B, 3C, H, W] -> [3, B, heads, H*W, C/heads]
        qkv = qkv.reshape(b, 3, self.num_heads, c // self.num_heads, h * w).permute(1, 0, 2, 4, 3)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        # [B, heads, H*W, C/heads] -> [B, C, H, W]
        out = out.permute(0, 1, 3, 2).reshape(b, c, h, w)
        return x + self.proj(out)


class Downsample(nn.Module):
    """Strided 3x3 convolution halving H and W."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor, temb: Tensor | None = None) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 upsampling followed by a 3x3 convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, temb: Tensor | None = None) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class LevelBlock(nn.Module):
    """One ResBlock, followed by self-attention at the resolutions that have it."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        temb_ch: int,
        dropout: float,
        attention: bool,
        heads: int,
        head_channels: int | None = None,
        scale_shift: bool = False,
    ) -> None:
        super().__init__()
        self.res = ResBlock(in_ch, out_ch, temb_ch, dropout, scale_shift=scale_shift)
        self.attn = AttentionBlock(out_ch, heads, head_channels) if attention else nn.Identity()

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        return self.attn(self.res(x, temb))
