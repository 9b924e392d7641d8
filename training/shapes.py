"""Procedural training data for the embedded ``tiny-shapes`` model (issue 11).

64x64 RGB images of one object (circle, square, triangle) in one of five colours
on one of three plain backgrounds, captions in two styles (sentences and tag
lists, attributes dropped at random, ~10% empty), and a pixel judge that reads
colour / shape / background back from an image.  Pure numpy + PIL, deterministic
by seed.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64
SUPERSAMPLE = 4

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (150, 60, 190),
}
BACKGROUNDS = {
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
}
SHAPES = ("circle", "square", "triangle")
COLOR_NAMES = tuple(COLORS)
BACKGROUND_NAMES = tuple(BACKGROUNDS)

SIDE_RANGE = (0.40, 0.70)      # object side as a fraction of the image
P_EMPTY = 0.10                 # empty captions (unconditional for CFG)
P_DROP = 0.25                  # each attribute dropped independently
P_TAGS = 0.5                   # tag style vs sentence style

# Expected bounding-box fill ratios: circle pi/4, square 1, triangle 1/2; the judge picks the
# nearest, i.e. the boundaries are the midpoints (renders: triangle 0.56-0.61, circle 0.75-0.83,
# square 0.99-1.0).
FILL_IDEAL = {"triangle": 0.5, "circle": float(np.pi / 4), "square": 1.0}
FILL_SQUARE_MIN = (FILL_IDEAL["circle"] + FILL_IDEAL["square"]) / 2      # 0.893
FILL_CIRCLE_MIN = (FILL_IDEAL["triangle"] + FILL_IDEAL["circle"]) / 2    # 0.643


def render(color: str, shape: str, background: str, side: float, x: float, y: float,
           size: int = SIZE) -> np.ndarray:
    """Draw one object (top-left corner x, y and side in pixels) anti-aliased."""
    s = SUPERSAMPLE
    big = Image.new("RGB", (size * s, size * s), BACKGROUNDS[background])
    d = ImageDraw.Draw(big)
    x0, y0, x1, y1 = x * s, y * s, (x + side) * s - 1, (y + side) * s - 1
    fill = COLORS[color]
    if shape == "circle":
        d.ellipse([x0, y0, x1, y1], fill=fill)
    elif shape == "square":
        d.rectangle([x0, y0, x1, y1], fill=fill)
    elif shape == "triangle":
        d.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2.0, y0)], fill=fill)
    else:
        raise ValueError(shape)
    return np.asarray(big.resize((size, size), Image.BOX), dtype=np.uint8)


def sample_attrs(rng: np.random.Generator, size: int = SIZE) -> dict:
    color = COLOR_NAMES[rng.integers(len(COLOR_NAMES))]
    shape = SHAPES[rng.integers(len(SHAPES))]
    background = BACKGROUND_NAMES[rng.integers(len(BACKGROUND_NAMES))]
    side = float(rng.uniform(*SIDE_RANGE)) * size
    side = round(side * SUPERSAMPLE) / SUPERSAMPLE
    x = round(float(rng.uniform(0, size - side)) * SUPERSAMPLE) / SUPERSAMPLE
    y = round(float(rng.uniform(0, size - side)) * SUPERSAMPLE) / SUPERSAMPLE
    return dict(color=color, shape=shape, background=background, side=side, x=x, y=y)


def render_example(seed: int) -> tuple[np.ndarray, dict]:
    """One training image (uint8 HxWx3) and its attributes, deterministic by seed."""
    rng = np.random.default_rng(seed)
    a = sample_attrs(rng)
    img = render(a["color"], a["shape"], a["background"], a["side"], a["x"], a["y"])
    return img, a


def make_caption(attrs: dict, rng: np.random.Generator,
                 p_drop: tuple[float, float, float] = (P_DROP, P_DROP, P_DROP)) -> str:
    """A caption for ``attrs``: sentence or tag style, attributes dropped at random.

    ``p_drop`` is the chance of dropping (colour, shape, background), each independently.
    """
    if rng.random() < P_EMPTY:
        return ""
    tags = rng.random() < P_TAGS
    keep = rng.random(3) >= np.asarray(p_drop)
    color = attrs["color"] if keep[0] else None
    shape = attrs["shape"] if keep[1] else None
    bg = attrs["background"] if keep[2] else None
    if color is None and shape is None and bg is None:
        return ""
    if tags:
        parts = []
        if color:
            parts.append(color)
        if shape:
            parts.append(shape)
        if bg:
            parts.append(f"{bg} background")
        return ", ".join(parts)
    obj = " ".join(p for p in (color, shape or "shape") if p)
    if color is None and shape is None:
        obj = "shape"
    text = f"a {obj}"
    if bg:
        text += f" on a {bg} background"
    return text


def full_prompt(color: str, shape: str, background: str) -> str:
    return f"a {color} {shape} on a {background} background"


def _nearest(rgb: np.ndarray, table: dict) -> str:
    names = list(table)
    ref = np.array([table[n] for n in names], dtype=np.float32)
    d = ((ref - rgb[None].astype(np.float32)) ** 2).sum(1)
    return names[int(d.argmin())]


def object_mask(img: np.ndarray, mask_threshold: float = 60.0) -> tuple[np.ndarray, np.ndarray]:
    """(mask, background RGB): the median of the 2-pixel border, and the pixels further than
    ``mask_threshold`` (RGB distance) from it."""
    a = np.asarray(img).astype(np.float32)
    border = np.concatenate([a[:2].reshape(-1, 3), a[-2:].reshape(-1, 3),
                             a[2:-2, :2].reshape(-1, 3), a[2:-2, -2:].reshape(-1, 3)])
    bg_rgb = np.median(border, axis=0)
    return np.sqrt(((a - bg_rgb[None, None]) ** 2).sum(-1)) > mask_threshold, bg_rgb


def judge(img: np.ndarray, mask_threshold: float = 60.0, min_pixels: int = 30) -> dict:
    """Read colour / shape / background back from pixels.

    background: nearest reference colour to the median of the 2-pixel border;
    object mask: pixels further than ``mask_threshold`` (RGB distance) from that
    median; colour: nearest of the five to the mask's median (None without an
    object); shape: fill ratio of the mask in its bounding box (square ~1,
    circle ~pi/4, triangle ~1/2).
    """
    img = np.asarray(img)
    if img.dtype != np.uint8:
        raise TypeError("judge expects uint8 HxWx3")
    a = img.astype(np.float32)
    mask, bg_rgb = object_mask(img, mask_threshold)
    background = _nearest(bg_rgb, BACKGROUNDS)
    n = int(mask.sum())
    out = dict(color=None, shape=None, background=background, fill=None, pixels=n)
    if n < min_pixels:
        return out
    out["color"] = _nearest(np.median(a[mask], axis=0), COLORS)
    ys, xs = np.nonzero(mask)
    # robust bounding box: ignore a few stray pixels on each side
    y0, y1 = np.percentile(ys, [0.5, 99.5])
    x0, x1 = np.percentile(xs, [0.5, 99.5])
    y0, y1, x0, x1 = int(round(y0)), int(round(y1)), int(round(x0)), int(round(x1))
    box = mask[y0:y1 + 1, x0:x1 + 1]
    fill = float(box.sum()) / float(max(box.size, 1))
    out["fill"] = fill
    if fill >= FILL_SQUARE_MIN:
        out["shape"] = "square"
    elif fill >= FILL_CIRCLE_MIN:
        out["shape"] = "circle"
    else:
        out["shape"] = "triangle"
    return out


if __name__ == "__main__":  # quick look: python training/shapes.py out.png
    import sys
    rng = np.random.default_rng(0)
    tiles = []
    for i in range(16):
        img, a = render_example(i)
        print(i, make_caption(a, rng), "|", judge(img))
        tiles.append(img)
    sheet = np.concatenate([np.concatenate(tiles[r * 4:(r + 1) * 4], 1) for r in range(4)], 0)
    Image.fromarray(sheet).save(sys.argv[1] if len(sys.argv) > 1 else "/tmp/shapes.png")
