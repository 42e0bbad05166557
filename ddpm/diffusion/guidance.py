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


class AutoGuided:
    """Autoguidance (Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version of
    Itself", Eq. 1): D(x; sigma) = D0(x; sigma) + w (D1(x; sigma) - D0(x; sigma)), the
    main model D1 guided by a weaker model D0 of the same task (smaller, or trained for
    less time), called as every sampler calls a model: ``model(x_t, t[, y=...])``.

    The combination is taken of the two outputs. Both nets share the prediction type and
    the preconditioning (the caller checks it), and every prediction type (x_0, eps, v, a
    flow's velocity; D = c_skip x + c_out F) is affine in the output with coefficients of
    (x_t, t) alone, so combining outputs combines denoisers. w = 1 returns the main
    model's output untouched (no guide call: the unguided draw, bit for bit). The
    attributes samplers read from a model (``sigma_min``, ``sigma_max``, ``round_sigma``)
    are the main model's; a flow model's ``velocity`` is guided too. Each call costs two
    network evaluations (one per net).
    """

    def __init__(self, model: Model, guide: Model, weight: float) -> None:
        self.model, self.guide, self.weight = model, guide, float(weight)

    def __call__(self, x: Tensor, t: Tensor, **conditioning: Tensor) -> Tensor:
        main = self.model(x, t, **conditioning)
        if self.weight == 1.0:
            return main
        weak = self.guide(x, t, **conditioning).to(main.dtype)
        return weak + self.weight * (main - weak)

    @property
    def velocity(self) -> Model:
        """The flow samplers integrate the models' ``velocity`` (``FlowModel``): guided the
        same way (the velocity is affine in the x_0 estimate)."""
        main = getattr(self.model, "velocity", None)
        if main is None:  # not a flow model: no velocity (as the model itself)
            raise AttributeError("velocity")
        return AutoGuided(main, self.guide.velocity, self.weight)

    def __getattr__(self, name: str) -> object:
        if name in ("model", "guide", "weight"):  # not set yet (e.g. while unpickling)
            raise AttributeError(name)
        return getattr(self.model, name)
