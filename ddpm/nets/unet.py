"""The UNet backbone of Ho et al. 2020 (Appendix B), PixelCNN++-style, with the options of
Dhariwal & Nichol 2021's ADM (per-head attention width, residual resampling, scale-shift
norm; ``ddpm.nets.blocks``) and activation checkpointing.

It maps (x [B, C, H, W], t [B][, y, aug]) to a tensor of x's shape and knows nothing of
diffusion: t is any real-valued noise label (a timestep, or EDM's c_noise = ln(sigma) / 4).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ddpm.nets.blocks import (
    AttentionBlock,
    Downsample,
    LevelBlock,
    ResBlock,
    Upsample,
    check_label_sizes,
    class_index,
    group_norm,
    timestep_embedding,
)


class UNet(nn.Module):
    """Ho et al. 2020's UNet: ``len(channel_mults)`` resolution levels of
    ``num_res_blocks`` residual blocks (``+1`` on the way up, fed by skip connections),
    self-attention at the listed ``attention_resolutions``, and a middle
    ResBlock-Attention-ResBlock. ``image_size`` is needed to place the attention layers
    and to check that the input can be halved at every level. ``init``: ``torch``
    (PyTorch's default initialisation) or ``ho`` (Ho et al.'s, ``ho_init``).

    ADM's options (Dhariwal & Nichol 2021, Sec. 3): ``attention_head_channels`` (64: as
    many heads as the width has 64-channel groups, instead of ``attention_heads``),
    ``resblock_updown`` (resample inside residual blocks, BigGAN-style, instead of strided
    and upsampling convolutions) and ``scale_shift_norm`` (the embedding scales and shifts
    the normalised activations). ``checkpointing`` recomputes every residual and attention
    block in the backward pass (``torch.utils.checkpoint``, non-reentrant) instead of
    keeping its activations: the same gradients for about a third more compute.
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
        attention_head_channels: int | None = None,
        resblock_updown: bool = False,
        scale_shift_norm: bool = False,
        checkpointing: bool = False,
    ) -> None:
        super().__init__()
        channel_mults = tuple(channel_mults)
        if init not in INITS:
            raise ValueError(f"model.init={init!r} is unknown; choose one of {', '.join(INITS)}")
        check_label_sizes(num_classes, augment_dim)
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
        self.checkpointing = bool(checkpointing)
        temb_ch = 4 * base_channels
        heads = (attention_heads, attention_head_channels)

        self.time_embed = nn.Sequential(
            nn.Linear(base_channels, temb_ch), nn.SiLU(), nn.Linear(temb_ch, temb_ch)
        )
        # Class conditioning: a learned embedding added to the time embedding, with one
        # extra "null" class (index num_classes, passed as y = -1) for the unconditional
        # prediction of classifier-free guidance (Ho & Salimans 2022, Sec. 3.2).
        self.num_classes = num_classes
        self.class_embed = nn.Embedding(num_classes + 1, temb_ch) if num_classes else None
        self.augment_dim = augment_dim
        self.augment_embed = (
            nn.Linear(augment_dim, base_channels, bias=False) if augment_dim else None
        )
        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)

        def level_block(in_ch: int, out_ch: int, res: int) -> LevelBlock:
            attention = res in attention_resolutions
            return LevelBlock(in_ch, out_ch, temb_ch, dropout, attention, *heads, scale_shift_norm)

        def resampler(ch: int, how: str) -> nn.Module:
            if resblock_updown:
                return ResBlock(
                    ch, ch, temb_ch, dropout, resample=how, scale_shift=scale_shift_norm
                )
            return Downsample(ch) if how == "down" else Upsample(ch)

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
                self.down.append(resampler(ch, "down"))
                skip_chs.append(ch)

        self.mid = nn.ModuleList(
            [
                ResBlock(ch, ch, temb_ch, dropout, scale_shift=scale_shift_norm),
                AttentionBlock(ch, *heads),
                ResBlock(ch, ch, temb_ch, dropout, scale_shift=scale_shift_norm),
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
                self.up.append(resampler(ch, "up"))

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
            temb = temb + self.class_embed(class_index(y, self.num_classes))
        elif y is not None:
            raise ValueError("this model is unconditional (model.num_classes=0): it takes no y")
        h = self.conv_in(x)
        skips = [h]
        for block in self.down:
            h = self._run(block, h, temb)
            skips.append(h)
        h = self._run(self.mid[0], h, temb)
        h = self._run(self.mid[1], h)
        h = self._run(self.mid[2], h, temb)
        for block in self.up:
            if isinstance(block, LevelBlock):
                h = torch.cat([h, skips.pop()], dim=1)  # [B, C, H, W] ++ skip -> [B, C + C', H, W]
            h = self._run(block, h, temb)
        return self.conv_out(F.silu(self.norm_out(h)))

    def _run(self, block: nn.Module, *inputs: Tensor) -> Tensor:
        """``block(*inputs)``, recomputed in the backward pass under ``checkpointing``."""
        if self.checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *inputs, use_reentrant=False)
        return block(*inputs)


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
