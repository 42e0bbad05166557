"""Classifier-free guidance (Ho & Salimans 2022): the network call every sampler makes."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

Model = Callable[..., Tensor]  # model(x_t, t) or, class-conditional, model(x_t, t, y=labels)


def guided_output(
    model: Model, x: Tensor, t: Tensor, y: Tensor | None = None, guidance_scale: float = 0.0
) -> Tensor:
    """The network's output at (x, t), class-conditional when ``y`` is given.

    With ``guidance_scale`` w != 0, classifier-free guidance (Ho & Salimans 2022, Eq. 6):
    (1 + w) f(x, t, y) - w f(x, t, null), in one batched call whose second half carries the
    null label -1. It is linear in the output, so it serves every prediction type.
    w = 0 is the plain conditional prediction.
    """
    if y is None:
        return model(x, t)
    if guidance_scale == 0:
        return model(x, t, y=y)
    both = model(torch.cat([x, x]), torch.cat([t, t]), y=torch.cat([y, torch.full_like(y, -1)]))
    cond, uncond = both.chunk(2)  # [2B, C, H, W] -> two [B, C, H, W]
    return cond + guidance_scale * (cond - uncond)
