"""Non-leaky augmentation (Karras et al. 2022, "EDM", App. D.2, after the ADA pipeline of
Karras et al. 2020): each training image is transformed at random, and the parameters of
what was done are handed to the network as a conditioning vector. The network learns the
augmented distributions as separate, labelled ones; sampling with zero labels asks for the
unaugmented data, so the augmentations do not leak into the samples. It matters most
where data are few (the digits: 1,797 images).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Label layout, one column each: x-flip, y-flip, 90-degree rotation (2: the two flips
# that compose it), integer translation (x, y), isotropic scaling (log2 scale / std).
AUGMENT_DIM = 7


class AugmentPipe:
    """Flips, 90-degree rotations, integer translations and isotropic scaling, each applied
    to an image with probability ``p`` times its multiplier (EDM: p = 0.12).

    Returns the images and their labels [B, 7]; all work stays on the images' device
    (no host synchronisation) and draws from the global generator, which the training
    step reseeds, so a resumed run augments exactly as the uninterrupted one.

    - ``xflip``/``yflip``: mirror left-right / top-bottom; label 1 if flipped.
    - ``rotate_int``: rotation by k * 90 degrees (square images); labels (k in {1, 2},
      k in {2, 3}), as in EDM's pipe.
    - ``translate_int``: a shift of up to ``translate_int_max`` of the size, whole pixels,
      with mirrored borders; labels the shift / its maximum.
    - ``scale``: zoom by 2^(``scale_std`` w), w ~ N(0, 1), bilinear with mirrored
      borders; label w. (EDM resamples through a wavelet-filtered 2x grid; this is a
      plain bilinear resample, noted in docs/edm.md.)
    """

    dim = AUGMENT_DIM

    def __init__(
        self,
        p: float = 0.12,
        xflip: float = 1.0,
        yflip: float = 1.0,
        rotate_int: float = 1.0,
        translate_int: float = 1.0,
        translate_int_max: float = 0.125,
        scale: float = 1.0,
        scale_std: float = 0.2,
    ) -> None:
        if not 0.0 <= float(p) <= 1.0:
            raise ValueError(f"augment.p={p!r} must lie in [0, 1] (EDM uses 0.12)")
        multipliers = {
            "xflip": xflip,
            "yflip": yflip,
            "rotate_int": rotate_int,
            "translate_int": translate_int,
            "scale": scale,
        }
        for key, value in multipliers.items():
            if not float(value) >= 0:
                raise ValueError(f"augment.{key}={value!r} must be >= 0 (a multiplier of p)")
        if not 0.0 <= float(translate_int_max) <= 0.5:
            raise ValueError(
                f"augment.translate_int_max={translate_int_max!r} must lie in [0, 0.5]"
            )
        if not float(scale_std) >= 0:
            raise ValueError(f"augment.scale_std={scale_std!r} must be >= 0")
        self.p = float(p)
        self.xflip, self.yflip = float(xflip), float(yflip)
        self.rotate_int, self.translate_int = float(rotate_int), float(translate_int)
        self.translate_int_max, self.scale, self.scale_std = (
            float(translate_int_max),
            float(scale),
            float(scale_std),
        )

    def _chosen(self, n: int, multiplier: float, device: torch.device) -> Tensor:
        """[n] bool: which images get this transform (probability p * multiplier)."""
        return torch.rand(n, device=device) < self.p * multiplier

    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """images [B, C, H, W] -> (augmented images [B, C, H, W], labels [B, 7] float32)."""
        n, _, h, w = images.shape
        device = images.device
        labels = torch.zeros(n, AUGMENT_DIM, device=device)
        column = lambda v: v.view(n, 1, 1, 1)  # noqa: E731 - [B] -> [B, 1, 1, 1]

        if self.xflip > 0:
            flip = torch.randint(2, (n,), device=device) * self._chosen(n, self.xflip, device)
            images = torch.where(column(flip == 1), images.flip(3), images)
            labels[:, 0] = flip
        if self.yflip > 0:
            flip = torch.randint(2, (n,), device=device) * self._chosen(n, self.yflip, device)
            images = torch.where(column(flip == 1), images.flip(2), images)
            labels[:, 1] = flip
        if self.rotate_int > 0:
            if h != w:
                raise ValueError(
                    f"augment.rotate_int needs square images, got {h}x{w}; set augment.rotate_int=0"
                )
            k = torch.randint(4, (n,), device=device) * self._chosen(n, self.rotate_int, device)
            # k quarter turns as flips and a transpose (k=1: x-flip + transpose, 2: both
            # flips, 3: y-flip + transpose)
            images = torch.where(column((k == 1) | (k == 2)), images.flip(3), images)
            images = torch.where(column((k == 2) | (k == 3)), images.flip(2), images)
            images = torch.where(column((k == 1) | (k == 3)), images.transpose(2, 3), images)
            labels[:, 2] = ((k == 1) | (k == 2)).float()
            labels[:, 3] = ((k == 2) | (k == 3)).float()
        if self.translate_int > 0:
            shift = torch.rand(2, n, device=device) * 2 - 1  # [2, B] in [-1, 1]
            shift = shift * self._chosen(n, self.translate_int, device)
            tx = (shift[0] * w * self.translate_int_max).round().long()
            ty = (shift[1] * h * self.translate_int_max).round().long()
            images = _translate_mirrored(images, tx, ty)
            labels[:, 4] = tx / max(w * self.translate_int_max, 1e-8)
            labels[:, 5] = ty / max(h * self.translate_int_max, 1e-8)
        if self.scale > 0:
            z = torch.randn(n, device=device) * self._chosen(n, self.scale, device)
            zoomed = _zoom(images, torch.exp2(z * self.scale_std))
            images = torch.where(column(z != 0), zoomed, images)  # untouched stay exact
            labels[:, 6] = z
        return images, labels


def _translate_mirrored(images: Tensor, tx: Tensor, ty: Tensor) -> Tensor:
    """Shift each image by (tx, ty) [B] whole pixels; pixels that come in from outside are
    mirrored at the border (EDM's integer translation)."""
    n, c, h, w = images.shape
    xs = torch.arange(w, device=images.device)[None, :] - tx[:, None]  # [B, W]
    ys = torch.arange(h, device=images.device)[None, :] - ty[:, None]  # [B, H]
    # reflect into [0, size - 1] with period 2 (size - 1)
    xs = (w - 1) - ((w - 1) - xs.remainder(max(2 * w - 2, 1))).abs()
    ys = (h - 1) - ((h - 1) - ys.remainder(max(2 * h - 2, 1))).abs()
    rows = images.gather(2, ys[:, None, :, None].expand(n, c, h, w))  # pick rows per image
    return rows.gather(3, xs[:, None, None, :].expand(n, c, h, w))  # then columns


def _zoom(images: Tensor, scale: Tensor) -> Tensor:
    """Zoom each image about its centre by ``scale`` [B] (> 1 enlarges), bilinear, mirrored
    borders: the output pixel at p samples the input at p / scale."""
    n = images.shape[0]
    theta = torch.zeros(n, 2, 3, device=images.device, dtype=images.dtype)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0 / scale.to(images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)  # [B, H, W, 2]
    return F.grid_sample(
        images, grid, mode="bilinear", padding_mode="reflection", align_corners=False
    )
