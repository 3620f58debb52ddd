"""Shape masks and backgrounds, drawn with numpy on coordinate grids (no per-pixel Python loops).

A shape is a predicate over pixel-centre coordinates ``(u, v)`` in ``[-1, 1]`` of a square canvas
(``u`` to the right, ``v`` down). :func:`shape_mask` evaluates it once per ``(shape, side)`` and caches
the boolean mask with its tight bounding box, so drawing an object is one masked assignment.
Edges are hard (no anti-aliasing): every pixel of a mask has exactly the object's colour, which
keeps the tight-box and colour guarantees exact.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np


def _circle(u, v):
    return u * u + v * v <= 1.0


def _square(u, v):
    return np.ones_like(u, dtype=bool)


def _triangle(u, v):  # apex up, base on the bottom edge
    return np.abs(u) <= (v + 1.0) / 2.0


def _cross(u, v):  # a plus sign whose arms are a third of the side thick
    return (np.abs(u) <= 1 / 3) | (np.abs(v) <= 1 / 3)


def _ring(u, v):  # inner radius 0.55: a hole of ~5 px at the smallest default size (9 px)
    r2 = u * u + v * v
    return (r2 <= 1.0) & (r2 >= 0.55**2)


def _diamond(u, v):
    return np.abs(u) + np.abs(v) <= 1.0


def _hexagon(u, v):  # corners left and right, stretched vertically to fill the canvas
    v = v * math.sqrt(3) / 2
    return math.sqrt(3) * np.abs(u) + np.abs(v) <= math.sqrt(3)


def _star(u, v, points: int = 5, inner: float = 0.45):  # one tip up
    r = np.hypot(u, v)
    sector = 2 * math.pi / points
    phi = np.mod(np.arctan2(u, -v), sector)
    phi = np.minimum(phi, sector - phi)  # fold onto the half-sector between a tip and an inner corner
    px, py = r * np.cos(phi), r * np.sin(phi)
    # inside when on the origin's side of the edge from the tip (1, 0) to the inner corner
    dx, dy = inner * math.cos(sector / 2) - 1.0, inner * math.sin(sector / 2)
    return dx * py - dy * (px - 1.0) >= 0


SHAPES: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "circle": _circle,
    "square": _square,
    "triangle": _triangle,
    "cross": _cross,
    "ring": _ring,
    "diamond": _diamond,
    "hexagon": _hexagon,
    "star": _star,
}

PLURALS = {"cross": "crosses"}


def plural(shape: str) -> str:
    return PLURALS.get(shape, shape + "s")


class ShapeMask(NamedTuple):
    mask: np.ndarray  # (side, side) bool, read-only
    box: tuple[int, int, int, int]  # tight xyxy within the canvas, pixel edges (x2, y2 exclusive)
    area: int  # number of pixels


@functools.lru_cache(maxsize=4096)
def shape_mask(shape: str, side: int) -> ShapeMask:
    """The cached mask of ``shape`` drawn on a ``side x side`` canvas, with its tight box and area."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known shapes: {sorted(SHAPES)}")
    if side < 1:
        raise ValueError(f"shape side must be >= 1 px, got {side}")
    centres = (np.arange(side) + 0.5) / side * 2.0 - 1.0
    v, u = np.meshgrid(centres, centres, indexing="ij")
    mask = np.ascontiguousarray(SHAPES[shape](u, v))
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if not len(rows):
        raise ValueError(f"shape {shape!r} has no pixels at side {side}")
    mask.setflags(write=False)
    box = (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)
    return ShapeMask(mask, box, int(mask.sum()))


# --- backgrounds ----------------------------------------------------------------------------------

BACKGROUND_WORDS = {"plain": "plain", "gradient": "gradient", "noise": "textured"}


def _grey(rng: np.random.Generator, grey_range: tuple[int, int], tint: int) -> np.ndarray:
    level = rng.uniform(grey_range[0], grey_range[1])
    return level + rng.uniform(-tint, tint, size=3)


@functools.lru_cache(maxsize=64)
def _upsample_matrix(size: int, coarse: int) -> np.ndarray:
    """``(size, coarse)`` linear-interpolation weights from a coarse grid to ``size`` pixel centres."""
    pos = np.clip((np.arange(size) + 0.5) / size * coarse - 0.5, 0, coarse - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, coarse - 1)
    frac = pos - lo
    weights = np.zeros((size, coarse))
    weights[np.arange(size), lo] += 1 - frac
    weights[np.arange(size), hi] += frac
    weights.setflags(write=False)
    return weights


def draw_background(
    rng: np.random.Generator,
    style: str,
    size: int,
    grey_range: tuple[int, int],
    tint: int,
    noise_std: float,
) -> np.ndarray:
    """A ``(size, size, 3)`` uint8 low-saturation background of ``style`` plain/gradient/noise."""
    if style == "plain":
        image = np.broadcast_to(_grey(rng, grey_range, tint), (size, size, 3))
    elif style == "gradient":
        start, end = _grey(rng, grey_range, tint), _grey(rng, grey_range, tint)
        angle = rng.uniform(0, 2 * math.pi)
        coords = np.arange(size) + 0.5
        t = np.cos(angle) * coords[None, :] + np.sin(angle) * coords[:, None]
        t = (t - t.min()) / max(t.max() - t.min(), 1e-6)
        image = start + (end - start) * t[..., None]
    elif style == "noise":
        coarse_side = max(2, size // 8)
        weights = _upsample_matrix(size, coarse_side)
        coarse = rng.normal(0.0, noise_std, size=(coarse_side, coarse_side, 3))
        blotches = (weights @ coarse.transpose(2, 0, 1) @ weights.T).transpose(1, 2, 0)
        fine = rng.normal(0.0, noise_std, size=(size, size, 3))
        image = _grey(rng, grey_range, tint) + blotches + fine
    else:
        raise ValueError(f"unknown background style {style!r}")
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)
