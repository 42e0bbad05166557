"""``build_feature_extractor``: an FID/KID feature net by its config name (``digits``,
``digits_heldout``, ``mnist``, ``inception``), from ``features`` and ``heldout_features``."""

from __future__ import annotations

from torch import nn

from ddpm.evaluation.features import InceptionFeatures, load_digits_feature_net
from ddpm.evaluation.heldout_features import load_heldout_net


def build_feature_extractor(name: str) -> nn.Module:
    """``digits``, ``inception`` or a held-out net (``digits_heldout``, ``mnist``: see
    ``ddpm.evaluation.heldout_features``), in eval mode with gradients off."""
    if name == "digits":
        return load_digits_feature_net()
    if name == "inception":
        return InceptionFeatures().eval().requires_grad_(False)
    if name in ("digits_heldout", "mnist"):
        return load_heldout_net(name)
    raise ValueError(
        f"eval.feature_extractor={name!r} is unknown; choose digits, digits_heldout, mnist "
        "or inception"
    )
