"""The UNet noise-prediction backbone of Ho et al. 2020 (Appendix B), PixelCNN++-style.

It maps (x [B, C, H, W], t [B][, y, aug]) to a tensor of x's shape and knows nothing of
diffusion: t is any real-valued noise label (a timestep, or EDM's c_noise = ln(sigma) / 4).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

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


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups where the width allows it (Wu & He 2018), fewer otherwise."""
    groups = math.gcd(32, channels)
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResBlock(nn.Module):
    """GN-SiLU-conv, + projected time embedding, GN-SiLU-dropout-conv, residual."""

    def __init__(self, in_ch: int, out_ch: int, temb_ch: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb_proj = nn.Linear(temb_ch, out_ch)
        self.norm2 = group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]  # [B, C] -> [B, C, 1, 1]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Spatial self-attention over all H*W positions, through scaled_dot_product_attention."""

    def __init__(self, channels: int, num_heads: int = 1) -> None:
        super().__init__()
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
        self, in_ch: int, out_ch: int, temb_ch: int, dropout: float, attention: bool, heads: int
    ) -> None:
        super().__init__()
        self.res = ResBlock(in_ch, out_ch, temb_ch, dropout)
        self.attn = AttentionBlock(out_ch, heads) if attention else nn.Identity()

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        return self.attn(self.res(x, temb))


class UNet(nn.Module):
    """Ho et al. 2020's UNet: ``len(channel_mults)`` resolution levels of
    ``num_res_blocks`` residual blocks (``+1`` on the way up, fed by skip connections),
    self-attention at the listed ``attention_resolutions``, and a middle
    ResBlock-Attention-ResBlock. ``image_size`` is needed to place the attention layers
    and to check that the input can be halved at every level. ``init``: ``torch``
    (PyTorch's default initialisation) or ``ho`` (Ho et al.'s, ``ho_init``).
    """

    def __init__(
        self,
        image_size: int,
        in_channels: int = 3,
        out_channels: int | None = None,
        base_channels: int = 128,
        channel_mults: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (16,),
        attention_heads: int = 1,
        dropout: float = 0.1,
        num_classes: int = 0,
        init: str = "torch",
        augment_dim: int = 0,
    ) -> None:
        super().__init__()
        channel_mults = tuple(channel_mults)
        if init not in INITS:
            raise ValueError(f"model.init={init!r} is unknown; choose one of {', '.join(INITS)}")
        if not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(
                f"model.num_classes={num_classes!r} must be an integer >= 0 (0: unconditional; "
                "data.conditional=true sets it from the data)"
            )
        _validate(image_size, in_channels, base_channels, channel_mults, num_res_blocks, dropout)
        factor = 2 ** (len(channel_mults) - 1)
        resolutions = [image_size // 2**i for i in range(len(channel_mults))]
        unknown = sorted(set(attention_resolutions) - set(resolutions))
        if unknown:
            raise ValueError(
                f"model.attention_resolutions={list(attention_resolutions)} includes {unknown}, "
                f"which this net never reaches; choose from {resolutions} (or [] for none)"
            )
        self.image_size = image_size
        self.in_channels = in_channels
        self.out_channels = out_channels or in_channels
        self.base_channels = base_channels
        self.downsampling_factor = factor
        temb_ch = 4 * base_channels

        self.time_embed = nn.Sequential(
            nn.Linear(base_channels, temb_ch), nn.SiLU(), nn.Linear(temb_ch, temb_ch)
        )
        # Class conditioning: a learned embedding added to the time embedding, with one
        # extra "null" class (index num_classes, passed as y = -1) for the unconditional
        # prediction of classifier-free guidance (Ho & Salimans 2022, Sec. 3.2).
        self.num_classes = num_classes
        self.class_embed = nn.Embedding(num_classes + 1, temb_ch) if num_classes else None
        if not isinstance(augment_dim, int) or augment_dim < 0:
            raise ValueError(f"model.augment_dim={augment_dim!r} must be an integer >= 0")
        self.augment_dim = augment_dim
        self.augment_embed = (
            nn.Linear(augment_dim, base_channels, bias=False) if augment_dim else None
        )
        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)

        def level_block(in_ch: int, out_ch: int, res: int) -> LevelBlock:
            attention = res in attention_resolutions
            return LevelBlock(in_ch, out_ch, temb_ch, dropout, attention, attention_heads)

        # Down path: remember every output width, since each feeds one skip connection.
        self.down = nn.ModuleList()
        skip_chs = [base_channels]
        ch = base_channels
        for level, mult in enumerate(channel_mults):
            for _ in range(num_res_blocks):
                self.down.append(level_block(ch, base_channels * mult, resolutions[level]))
                ch = base_channels * mult
                skip_chs.append(ch)
            if level != len(channel_mults) - 1:
                self.down.append(Downsample(ch))
                skip_chs.append(ch)

        self.mid = nn.ModuleList(
            [
                ResBlock(ch, ch, temb_ch, dropout),
                AttentionBlock(ch, attention_heads),
                ResBlock(ch, ch, temb_ch, dropout),
            ]
        )

        # Up path: num_res_blocks + 1 blocks per level, each eating one skip connection.
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mults))):
            for _ in range(num_res_blocks + 1):
                self.up.append(
                    level_block(ch + skip_chs.pop(), base_channels * mult, resolutions[level])
                )
                ch = base_channels * mult
            if level != 0:
                self.up.append(Upsample(ch))

        self.norm_out = group_norm(ch)
        self.conv_out = nn.Conv2d(ch, self.out_channels, 3, padding=1)
        if init == "ho":
            ho_init(self)

    def forward(
        self, x: Tensor, t: Tensor, y: Tensor | None = None, aug: Tensor | None = None
    ) -> Tensor:
        """Predict from x_t [B, C, H, W] at noise labels t [B]; ``y`` [B] are class labels of
        a conditional net (-1: no label, the unconditional prediction), ``aug`` [B, A] the
        augmentation labels of a net built with ``augment_dim`` = A (None: no augmentation)."""
        emb = timestep_embedding(t, self.base_channels)  # [B, base]
        if aug is not None:
            if self.augment_embed is None:
                raise ValueError(
                    "this model takes no augmentation labels (model.augment_dim=0): pass aug=None"
                )
            emb = emb + self.augment_embed(aug.to(emb.dtype))  # [B, A] -> [B, base]
        temb = self.time_embed(emb)  # [B, 4 * base]
        if self.class_embed is not None:
            if y is None:
                raise ValueError(
                    f"this model is class-conditional ({self.num_classes} classes): pass "
                    "y=labels (-1 for the unconditional prediction)"
                )
            y = torch.where(y < 0, torch.full_like(y, self.num_classes), y)  # -1 -> null class
            temb = temb + self.class_embed(y)
        elif y is not None:
            raise ValueError("this model is unconditional (model.num_classes=0): it takes no y")
        h = self.conv_in(x)
        skips = [h]
        for block in self.down:
            h = block(h, temb)
            skips.append(h)
        h = self.mid[0](h, temb)
        h = self.mid[1](h)
        h = self.mid[2](h, temb)
        for block in self.up:
            if isinstance(block, LevelBlock):
                h = torch.cat([h, skips.pop()], dim=1)  # [B, C, H, W] ++ skip -> [B, C + C', H, W]
            h = block(h, temb)
        return self.conv_out(F.silu(self.norm_out(h)))


INITS = ("ho", "torch")  # torch: PyTorch's default (Kaiming-uniform, a=sqrt(5)) init


def ho_init(net: UNet) -> None:
    """Ho et al. 2020's initialisation (diffusion_tf ``nn.default_init``): variance
    scaling with fan_avg and a uniform law, U(-sqrt(6 / (fan_in + fan_out)), +...), i.e.
    Xavier-uniform, for every convolution and dense layer, biases zero; and zero for the
    layers whose output is added to a residual stream (``init_scale=0.``): each ResBlock's
    last convolution, the attention output projection, and the output convolution, so
    every block starts as the identity and the net's first prediction is 0."""
    for module in net.modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:  # the augmentation map has none
                nn.init.zeros_(module.bias)
    for module in net.modules():
        zeroed = []
        if isinstance(module, ResBlock):
            zeroed = [module.conv2]
        elif isinstance(module, AttentionBlock):
            zeroed = [module.proj]
            # q, k, v are three C -> C maps in Ho's code: fans of C, not of 3C
            for part in module.qkv.weight.detach().chunk(
                3, dim=0
            ):  # [3C, C, 1, 1] -> 3 x [C, C, 1, 1]
                nn.init.xavier_uniform_(part)
        for layer in zeroed:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
    nn.init.zeros_(net.conv_out.weight)
    nn.init.zeros_(net.conv_out.bias)


def _validate(
    image_size: int,
    in_channels: int,
    base_channels: int,
    channel_mults: tuple[int, ...],
    num_res_blocks: int,
    dropout: float,
) -> None:
    """Refuse a configuration the UNet cannot run, naming the key and what is allowed."""
    if not channel_mults or any(m < 1 for m in channel_mults):
        raise ValueError(f"model.channel_mults={list(channel_mults)} must be positive integers")
    factor = 2 ** (len(channel_mults) - 1)
    if image_size < factor or image_size % factor != 0:
        raise ValueError(
            f"data.image_size={image_size} must be divisible by {factor}: "
            f"model.channel_mults={list(channel_mults)} halve it {len(channel_mults) - 1} "
            "time(s); pick such an image size or fewer channel_mults"
        )
    if in_channels < 1:
        raise ValueError(f"model.in_channels={in_channels} must be >= 1")
    if base_channels < 4 or base_channels % 2:
        # the sinusoidal embedding has base_channels / 2 frequencies spaced over
        # [1, 1/max_period] by (half - 1) steps: it needs at least two
        raise ValueError(f"model.base_channels={base_channels} must be an even integer >= 4")
    if num_res_blocks < 1:
        raise ValueError(f"model.num_res_blocks={num_res_blocks} must be >= 1")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"model.dropout={dropout} must lie in [0, 1)")
