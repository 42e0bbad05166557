"""Turning model outputs into image files: uint8 conversion, grids, PNG and NPZ."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor


def to_uint8(images: Tensor) -> np.ndarray:
    """[N, C, H, W] floats in [-1, 1] -> uint8 array [N, H, W, C] (0..255)."""
    x = ((images.detach().float().cpu().clamp(-1.0, 1.0) + 1.0) * 127.5).round()
    return x.to(torch.uint8).permute(0, 2, 3, 1).numpy()  # NCHW -> NHWC


def make_grid(images: np.ndarray, nrow: int | None = None, min_tile: int = 32) -> np.ndarray:
    """Tile uint8 images [N, H, W, C] into one [H', W', C] picture.

    Small images are enlarged by an integer factor (nearest neighbour) so each tile is at
    least ``min_tile`` pixels wide: an 8x8 digit becomes a readable 32x32 tile.
    """
    n, h, w, c = images.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    ncol = math.ceil(n / nrow)
    scale = max(1, math.ceil(min_tile / max(h, w)))
    tiles = images.repeat(scale, axis=1).repeat(scale, axis=2)  # [N, H*s, W*s, C]
    pad = 2
    th, tw = h * scale + pad, w * scale + pad
    grid = np.full((ncol * th + pad, nrow * tw + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[
            pad + r * th : pad + r * th + h * scale, pad + col * tw : pad + col * tw + w * scale
        ] = tiles[i]
    return grid


def class_grid(images: np.ndarray, labels: Sequence[int] | None) -> np.ndarray:
    """A grid of [N, H, W, C] images; with labels, one row per class (in label order)."""
    if labels is None or len(set(labels)) < 2:
        return make_grid(images)
    order = np.argsort(np.asarray(labels), kind="stable")
    per_class = max(np.bincount(np.asarray(labels)))
    rows = []
    for label in sorted(set(labels)):
        members = images[order][np.asarray(labels)[order] == label]
        pad = np.zeros((per_class - len(members), *images.shape[1:]), dtype=images.dtype)
        rows.append(np.concatenate([members, pad]))
    return make_grid(np.concatenate(rows), nrow=per_class)


def save_png(image: np.ndarray, path: str | Path) -> Path:
    """Write a uint8 [H, W, C] array (C = 1 or 3) as PNG, creating the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(path)
    return path


def side_by_side(images: list[np.ndarray], gap: int = 8) -> np.ndarray:
    """Place uint8 [H, W, C] pictures left to right on a white background."""
    height = max(im.shape[0] for im in images)
    width = sum(im.shape[1] for im in images) + gap * (len(images) - 1)
    out = np.full((height, width, images[0].shape[2]), 255, dtype=np.uint8)
    x = 0
    for im in images:
        out[: im.shape[0], x : x + im.shape[1]] = im
        x += im.shape[1] + gap
    return out


def bar_chart(values: list[float], labels: list[str], title: str = "") -> np.ndarray:
    """A small RGB bar chart [H, W, 3] drawn with PIL (no plotting library needed)."""
    from PIL import ImageDraw

    width, height, margin, top = 60 * len(values) + 80, 300, 50, 30
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    finite = [v for v in values if np.isfinite(v)]
    vmax = max(finite) if finite and max(finite) > 0 else 1.0
    base = height - margin
    draw.line([(margin, top), (margin, base), (width - 10, base)], fill="black")
    draw.text((margin, 8), title, fill="black")
    draw.text((4, top), f"{vmax:.3g}", fill="black")
    draw.text((4, base - 10), "0", fill="black")
    for i, (value, label) in enumerate(zip(values, labels, strict=True)):
        x0 = margin + 10 + i * 60
        h = 0 if not np.isfinite(value) else (base - top) * value / vmax
        draw.rectangle([x0, base - h, x0 + 40, base], fill=(66, 110, 180))
        draw.text((x0, base + 4), label, fill="black")
        draw.text((x0, base - h - 12), f"{value:.3f}", fill="black")
    return np.asarray(image)


def line_chart(
    series: dict[str, list[tuple[float, float]]],
    title: str = "",
    x_label: str = "",
    y_label: str = "",
    log_x: bool = True,
    y_max: float | None = None,
) -> np.ndarray:
    """A small RGB line chart [H, W, 3] of named (x, y) series, drawn with PIL; with
    ``y_max``, the y axis stops there and larger values are drawn on its top edge. The y
    axis starts at 0, or below it when a value is negative."""
    from PIL import ImageDraw

    width, height, left, right, top, bottom = 640, 400, 60, 170, 30, 50
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    points = [p for pts in series.values() for p in pts if np.isfinite(p[1])]
    xs = [np.log10(x) if log_x else x for x, _ in points]
    ys = [y for _, y in points]
    x_lo, x_hi = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y_lo = min(0.0, min(ys) * 1.05) if ys else 0.0
    y_hi = max(ys) * 1.05 if ys and max(ys) > 0 else (0.0 if y_lo < 0 else 1.0)
    if y_max is not None:
        y_hi = min(y_hi, y_max)

    def to_px(x: float, y: float) -> tuple[float, float]:
        fx = ((np.log10(x) if log_x else x) - x_lo) / (x_hi - x_lo)
        fy = (min(y, y_hi) - y_lo) / (y_hi - y_lo)
        return left + fx * (width - left - right), height - bottom - fy * (height - top - bottom)

    draw.line([(left, top), (left, height - bottom), (width - right, height - bottom)], "black")
    draw.text((left, 8), title, fill="black")
    draw.text((4, top), f"{y_hi:.3g}", fill="black")
    draw.text((4, height - bottom - 10), f"{y_lo:.3g}", fill="black")
    draw.text((4, top + 14), y_label, fill="black")
    draw.text((width - right - 120, height - 20), x_label, fill="black")
    last_px, last_width = -1e9, 0
    for x in sorted({x for x, _ in points}):
        px, _ = to_px(x, 0)
        label = f"{x:g}" if float(x).is_integer() else f"{x:.3g}"
        if px - last_px < max(24, last_width):  # a tick label would overprint its neighbour
            continue
        draw.text((px - 8, height - bottom + 4), label, fill="black")
        last_px, last_width = px, 6 * len(label) + 8
    colours = [
        (66, 110, 180),
        (200, 80, 60),
        (60, 160, 90),
        (150, 90, 170),
        (200, 150, 40),
        (40, 170, 190),
        (120, 120, 120),
        (220, 90, 160),
    ]
    for i, (name, pts) in enumerate(series.items()):
        colour = colours[i % len(colours)]
        pixels = [to_px(x, y) for x, y in sorted(pts) if np.isfinite(y)]
        if len(pixels) > 1:
            draw.line(pixels, fill=colour, width=2)
        for px, py in pixels:
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
        draw.text((width - right + 10, top + 16 * i), name, fill=colour)
    return np.asarray(image)
