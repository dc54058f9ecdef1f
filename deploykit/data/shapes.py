"""Procedural coloured shapes: a harder, fully offline benchmark than digits.

Every image has a random rotation, scale, position, foreground colour and background gradient, so neither
colour nor position says anything about the class; clutter and pixel noise keep a small CNN from a quick 100%.
Shapes are drawn with PIL at up to 4x resolution and box-downsampled for anti-aliased edges.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps
from torch import Tensor

from deploykit.data.config import DataConfig
from deploykit.errors import DeploykitError

CLASS_NAMES = ("circle", "square", "triangle", "pentagon", "hexagon", "star", "cross", "ring", "ellipse", "arrow")

SCALE_RANGE = (0.5, 0.85)  # shape diameter as a fraction of the image side
NOISE_STD = 0.08  # Gaussian pixel noise, in [0, 1] units
BLOBS_BEHIND = (0, 2)  # inclusive range of distractor blobs drawn behind the shape
BLOB_RADIUS = (0.03, 0.06)  # as a fraction of the image side: smaller than any shape
LINES_IN_FRONT = (0, 1)  # inclusive range of distractor lines drawn over it (partial occlusion)
LINE_WIDTH = (0.03, 0.06)  # as a fraction of the image side (1-2 px at 32x32)
MIN_LUMA_CONTRAST = 0.4  # foreground vs. background, so the shape stays visible in grey too
_LUMA = np.array([0.299, 0.587, 0.114])


def _regular(sides: int, radius: float = 1.0) -> np.ndarray:
    angles = np.linspace(0, 2 * np.pi, sides, endpoint=False) - np.pi / 2
    return radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _star() -> np.ndarray:
    return np.tile([1.0, 0.45], 5)[:, None] * _regular(10)


def _ring() -> np.ndarray:
    # One "keyhole" polygon: the outer circle, then the inner one backwards, so PIL fills only the band.
    outer, inner = _regular(48), _regular(48, 0.55)
    return np.concatenate([outer, outer[:1], inner[:1], inner[::-1]])


_CROSS_ARM = np.array([[-1.0, -0.3], [1.0, -0.3], [1.0, 0.3], [-1.0, 0.3]])

# Outlines in unit coordinates (inside the unit circle); a class may be the union of several polygons.
_OUTLINES: dict[str, list[np.ndarray]] = {
    "circle": [_regular(48)],
    "square": [_regular(4)],
    "triangle": [_regular(3)],
    "pentagon": [_regular(5)],
    "hexagon": [_regular(6)],
    "star": [_star()],
    "cross": [_CROSS_ARM, _CROSS_ARM[:, ::-1]],
    "ring": [_ring()],
    "ellipse": [_regular(48) * [1.0, 0.5]],
    "arrow": [np.array([[-1, -0.2], [0.2, -0.2], [0.2, -0.6], [1, 0], [0.2, 0.6], [0.2, 0.2], [-1, 0.2]])],
}


def _background_colours(rng: np.random.Generator, fg_luma: float) -> np.ndarray:
    """Two random colours, both lighter or both darker than the foreground by at least MIN_LUMA_CONTRAST.

    Same side, so the gradient between them never crosses the foreground's brightness and hides the shape.
    """
    can_be_lighter, can_be_darker = fg_luma + MIN_LUMA_CONTRAST <= 1, fg_luma - MIN_LUMA_CONTRAST >= 0
    colours = rng.random((2, 3))
    luma = np.maximum(colours @ _LUMA, 1e-6)
    if can_be_lighter and (not can_be_darker or rng.random() < 0.5):
        towards_white = ((fg_luma + MIN_LUMA_CONTRAST - luma) / np.maximum(1 - luma, 1e-6)).clip(0, 1)
        return colours + towards_white[:, None] * (1 - colours)
    towards_black = (1 - (fg_luma - MIN_LUMA_CONTRAST) / luma).clip(0, 1)
    return colours * (1 - towards_black[:, None])


def _background(rng: np.random.Generator, fg_luma: float, coords: np.ndarray) -> Image.Image:
    """A linear gradient between two random colours along a random direction (coords: centred pixel positions)."""
    start, end = _background_colours(rng, fg_luma)
    theta = rng.uniform(0, 2 * np.pi)
    ramp = (0.5 + np.cos(theta) * coords[None, :] + np.sin(theta) * coords[:, None]).clip(0, 1)
    ramp = Image.fromarray((ramp * 255).astype(np.uint8), mode="L")
    return ImageOps.colorize(ramp, black=_rgb(start), white=_rgb(end))


def _rgb(colour: np.ndarray) -> tuple[int, ...]:
    return tuple(int(c) for c in (colour * 255).round())


def _random_colour(rng: np.random.Generator) -> tuple[int, ...]:
    return _rgb(rng.random(3))


def _count(rng: np.random.Generator, bounds: tuple[int, int]) -> int:
    return int(rng.integers(bounds[0], bounds[1] + 1))


def _draw_blobs(draw: ImageDraw.ImageDraw, rng: np.random.Generator, side: int) -> None:
    for _ in range(_count(rng, BLOBS_BEHIND)):
        cx, cy = rng.uniform(0, side, 2)
        rx, ry = rng.uniform(*BLOB_RADIUS, 2) * side
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=_random_colour(rng))


def _draw_lines(draw: ImageDraw.ImageDraw, rng: np.random.Generator, side: int) -> None:
    for _ in range(_count(rng, LINES_IN_FRONT)):
        x0, y0, x1, y1 = rng.uniform(0, side, 4)
        width = max(1, round(rng.uniform(*LINE_WIDTH) * side))
        draw.line([x0, y0, x1, y1], fill=_random_colour(rng), width=width)


def _draw_shape(draw: ImageDraw.ImageDraw, rng: np.random.Generator, name: str, side: int, fg: np.ndarray) -> None:
    radius = rng.uniform(*SCALE_RANGE) * side / 2
    centre = rng.uniform(radius, side - radius, 2)  # position jitter, shape kept inside the frame
    angle = rng.uniform(0, 2 * np.pi)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    fill = _rgb(fg)
    for outline in _OUTLINES[name]:
        points = outline @ rotation.T * radius + centre
        draw.polygon([tuple(p) for p in points], fill=fill)


def _render(rng: np.random.Generator, name: str, size: int, supersample: int) -> np.ndarray:
    """One image as float [size, size, 3] in [0, 1] before noise, drawn at `supersample` times the size."""
    side = size * supersample
    coords = (np.arange(side, dtype=np.float32) + 0.5) / side - 0.5  # centred, for the background gradient
    fg = rng.random(3)
    canvas = _background(rng, float(fg @ _LUMA), coords)
    draw = ImageDraw.Draw(canvas)
    _draw_blobs(draw, rng, side)
    _draw_shape(draw, rng, name, side, fg)
    _draw_lines(draw, rng, side)
    return np.asarray(canvas.reduce(supersample), dtype=np.float32) / 255


def load(cfg: DataConfig) -> tuple[Tensor, Tensor, list[str]]:
    """cfg.num_samples images as uint8 [N, channels, size, size] with balanced labels, all seeded by cfg.seed."""
    if cfg.num_classes > len(CLASS_NAMES):
        raise DeploykitError(
            f"The shapes dataset has {len(CLASS_NAMES)} classes but data.num_classes is {cfg.num_classes}: "
            f"set data.num_classes between 2 and {len(CLASS_NAMES)}."
        )
    rng = np.random.default_rng(cfg.seed % 2**64)  # numpy seeds must be non-negative
    names = CLASS_NAMES[: cfg.num_classes]
    labels = rng.permutation(np.arange(cfg.num_samples) % cfg.num_classes)  # balanced to within one
    size = cfg.image_size
    supersample = max(1, min(4, 256 // size))  # anti-aliasing: up to 4x, but never draw beyond ~256 px
    images = np.empty((cfg.num_samples, size, size, cfg.channels), dtype=np.uint8)
    for i, label in enumerate(labels):
        image = _render(rng, names[label], size, supersample)
        if cfg.channels == 1:
            image = image @ _LUMA[:, None].astype(np.float32)
        image += NOISE_STD * rng.standard_normal(image.shape, dtype=np.float32)
        images[i] = (image.clip(0, 1) * 255).round()
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels).long(), list(names)
