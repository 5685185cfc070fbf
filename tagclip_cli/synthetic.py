"""Seeded synthetic multi-object scenes ("shapes") for the shapes-demo CLIP and its benchmark.

Each scene is a square RGB image with a procedural "stuff" background (one or two of
:data:`STUFF_CLASSES`, split by a horizon) and 1-4 objects of distinct classes from
:data:`OBJECT_CLASSES`, of widely varied size. Scene ``i`` of seed ``s`` is a pure function of
``(s, i)``: the generator draws everything from ``numpy.random.default_rng([s, i])``.

Ground truth per scene: a uint8 label map (0 = background/stuff, k = k-th object class, 1-based
in :data:`OBJECT_CLASSES` order), the present object classes ordered from largest to smallest
visible area (the first one is the *salient* object), the stuff classes, and a web-style caption
that names the salient object (sometimes also the second one or the stuff), mimicking the
salience bias of web captions.

:func:`write_folder_dataset` writes scenes in the generic ``folder`` layout read by
``tagclip evaluate --gt folder``::

    out/classes.txt        one object class per line (label value k = line k, 1-based)
    out/images/NNNNNN.png  RGB images
    out/labels/NNNNNN.png  uint8 label maps (0 background, k class k, 255 ignore: never used here)
    out/tags.json          {"classes": [...], "background": [...], "images": {id: {...}}}

Pure numpy + OpenCV + PIL, no torch: it runs in DataLoader workers and in tests.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from tagclip_cli.fileio import write_bytes_atomic

OBJECT_CLASSES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "star",
    "cross",
    "ring",
    "heart",
    "diamond",
    "hexagon",
    "crescent",
    "arrow",
    "pentagon",
)
STUFF_CLASSES: tuple[str, ...] = ("sky", "grass", "water", "road", "wall", "sand")

# Stuff that can be the upper part of a two-stuff scene, and stuff that can be the lower part.
_UPPER_STUFF = ("sky", "wall")
_LOWER_STUFF = ("grass", "water", "road", "sand")

# Class-specific base hue (degrees), saturation and value. Hue is jittered per object, so colour
# narrows the class down but the shape still has to be seen (neighbouring hues are 30 deg apart).
_OBJECT_COLOUR: dict[str, tuple[float, float, float]] = {
    "circle": (0.0, 0.85, 0.9),
    "square": (30.0, 0.9, 0.95),
    "triangle": (55.0, 0.9, 0.95),
    "star": (90.0, 0.8, 0.85),
    "cross": (120.0, 0.75, 0.7),
    "ring": (160.0, 0.8, 0.8),
    "heart": (200.0, 0.8, 0.9),
    "diamond": (230.0, 0.85, 0.85),
    "hexagon": (260.0, 0.7, 0.8),
    "crescent": (290.0, 0.75, 0.85),
    "arrow": (320.0, 0.8, 0.9),
    "pentagon": (345.0, 0.6, 0.6),
}

DEFAULT_SIZE = 224
MIN_SIDE_FRACTION = 0.07  # smallest object: about 16 px across at 224
MAX_SIDE_FRACTION = 0.62  # largest object: about 140 px across at 224
MIN_VISIBLE_FRACTION = 0.6  # an object keeps at least this share of its pixels after occlusion


@dataclass(frozen=True)
class Scene:
    """One generated scene.

    ``image`` is (H, W, 3) uint8 RGB; ``label_map`` is (H, W) uint8 with 0 = background and
    k = ``OBJECT_CLASSES[k - 1]``. ``objects`` lists the present object classes from the largest
    visible area to the smallest, with their areas in ``areas`` (pixels). ``stuff_map`` is (H, W)
    uint8, the ``STUFF_CLASSES`` index of the stuff texture at each pixel (also under objects): the
    background half of the demo model's per-patch training targets.
    """

    index: int
    image: np.ndarray
    label_map: np.ndarray
    objects: tuple[str, ...]
    areas: tuple[int, ...]
    stuff: tuple[str, ...]
    caption: str
    meta: dict = field(default_factory=dict, compare=False)
    stuff_map: np.ndarray | None = field(default=None, compare=False, repr=False)

    @property
    def salient(self) -> str:
        return self.objects[0]


# ---------------------------------------------------------------------------------------------
# Backgrounds


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """(size, size) float32 noise in about [-1, 1] with ``cells`` random values per side."""
    grid = rng.standard_normal((cells + 1, cells + 1)).astype(np.float32)
    return cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC)


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    """One HSV colour (h in degrees, s and v in [0, 1]) as float32 RGB in [0, 1]."""
    h = (h % 360.0) / 60.0
    c = v * s
    x = c * (1 - abs(h % 2 - 1))
    r, g, b = [(c, x, 0), (x, c, 0), (0, c, x), (0, x, c), (x, 0, c), (c, 0, x)][int(h) % 6]
    m = v - c
    return np.array([r + m, g + m, b + m], dtype=np.float32)


def _stuff_texture(name: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size, 3) float32 RGB texture in [0, 1] for one stuff class."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    low = _smooth_noise(rng, size, 4)
    mid = _smooth_noise(rng, size, 12)
    fine = rng.standard_normal((size, size)).astype(np.float32)
    jitter = rng.uniform(-0.06, 0.06, 3).astype(np.float32)
    if name == "sky":
        top = np.array([0.25, 0.45, 0.85]) + jitter
        bottom = np.array([0.65, 0.8, 0.97]) + jitter
        img = top[None, None] * (1 - yy[..., None]) + bottom[None, None] * yy[..., None]
        clouds = np.clip((low * 0.6 + mid * 0.4) - rng.uniform(0.2, 0.9), 0, 1)[..., None]
        img = img * (1 - clouds) + 0.97 * clouds
    elif name == "grass":
        base = np.array([0.22, 0.55, 0.18]) + jitter
        blades = cv2.resize(rng.standard_normal((size // 6, size)).astype(np.float32), (size, size))
        shade = 0.12 * low + 0.1 * blades + 0.05 * fine
        img = base[None, None] * (1 + shade[..., None] * np.array([1.0, 0.8, 1.0]))
    elif name == "water":
        base = np.array([0.1, 0.35, 0.55]) + jitter
        freq = rng.uniform(25, 45)
        waves = np.sin(2 * np.pi * (yy * freq + 0.6 * mid + 0.15 * xx))
        img = base[None, None] + (0.08 * waves + 0.05 * low)[..., None] * np.array([0.6, 1.0, 1.0])
    elif name == "road":
        grey = 0.38 + jitter[0]
        img = np.full((size, size, 3), grey, np.float32) + (0.04 * low + 0.07 * fine)[..., None]
        if rng.random() < 0.7:
            y0 = rng.uniform(0.3, 0.8)
            dash = (np.abs(yy - y0) < 0.012) & ((xx * 6 + rng.random()) % 1 < 0.55)
            img[dash] = np.array([0.92, 0.9, 0.75])
    elif name == "wall":
        brick = np.array([0.62, 0.28, 0.2]) + jitter
        mortar = np.array([0.78, 0.76, 0.7])
        rows = rng.integers(9, 14)
        bh = size / rows
        bw = bh * rng.uniform(1.8, 2.4)
        row = np.floor(yy * size / bh)
        xs = xx * size / bw + 0.5 * (row % 2)
        is_mortar = ((yy * size) % bh < 1.5) | ((xs % 1) * bw < 1.5)
        per_brick = _hash_noise(row, np.floor(xs)) * 0.12
        img = brick[None, None] * (1 + per_brick[..., None] + 0.05 * fine[..., None])
        img[is_mortar] = mortar
    elif name == "sand":
        base = np.array([0.85, 0.74, 0.5]) + jitter
        ripples = np.sin(2 * np.pi * (yy * rng.uniform(8, 14) + 0.8 * low))
        img = base[None, None] * (1 + (0.06 * ripples + 0.05 * fine)[..., None])
    else:  # pragma: no cover - guarded by STUFF_CLASSES
        raise ValueError(f"unknown stuff class {name!r}")
    return np.clip(img, 0, 1).astype(np.float32)


def _hash_noise(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Deterministic pseudo-random values in [-1, 1] per integer pair (per-brick tint)."""
    v = np.sin(a * 12.9898 + b * 78.233) * 43758.5453
    return (v - np.floor(v)) * 2 - 1


# ---------------------------------------------------------------------------------------------
# Objects


def _polygon(points: np.ndarray, cx: float, cy: float, radius: float, angle: float) -> np.ndarray:
    """Unit-radius (K, 2) points rotated by ``angle``, scaled and moved to (cx, cy)."""
    c, s = math.cos(angle), math.sin(angle)
    rot = points @ np.array([[c, s], [-s, c]], dtype=np.float64)
    return rot * radius + np.array([cx, cy])


def _regular(k: int, start: float = -math.pi / 2) -> np.ndarray:
    t = start + np.arange(k) * 2 * math.pi / k
    return np.stack([np.cos(t), np.sin(t)], 1)


def _star_points(k: int = 5, inner: float = 0.45) -> np.ndarray:
    t = -math.pi / 2 + np.arange(2 * k) * math.pi / k
    r = np.where(np.arange(2 * k) % 2 == 0, 1.0, inner)
    return np.stack([np.cos(t) * r, np.sin(t) * r], 1)


_CROSS = np.array(
    [[-0.3, -1], [0.3, -1], [0.3, -0.3], [1, -0.3], [1, 0.3], [0.3, 0.3], [0.3, 1], [-0.3, 1],
     [-0.3, 0.3], [-1, 0.3], [-1, -0.3], [-0.3, -0.3]], dtype=np.float64)  # fmt: skip
_ARROW = np.array(
    [[-1, -0.28], [0.15, -0.28], [0.15, -0.75], [1, 0], [0.15, 0.75], [0.15, 0.28], [-1, 0.28]],
    dtype=np.float64,
)
_HEART_T = np.linspace(0, 2 * math.pi, 48, endpoint=False)
_HEART = np.stack(
    [16 * np.sin(_HEART_T) ** 3,
     -(13 * np.cos(_HEART_T) - 5 * np.cos(2 * _HEART_T) - 2 * np.cos(3 * _HEART_T) - np.cos(4 * _HEART_T))],
    1,
) / 16.0  # fmt: skip
_HEART[:, 1] += 0.15


def _object_mask(name: str, size: int, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    """(size, size) bool mask of one object of circumradius ``r`` px centred at (cx, cy)."""
    mask = np.zeros((size, size), np.uint8)
    shift = 4  # sub-pixel vertex precision for cv2
    scale = 1 << shift

    def fill(points: np.ndarray, value: int = 1) -> None:
        cv2.fillPoly(mask, [np.round(points * scale).astype(np.int32)], value, cv2.LINE_8, shift)

    if name == "circle":
        cv2.ellipse(mask, (round(cx * scale), round(cy * scale)), (round(r * scale), round(r * scale)),
                    0, 0, 360, 1, -1, cv2.LINE_8, shift)  # fmt: skip
    elif name == "ring":
        cv2.ellipse(mask, (round(cx * scale), round(cy * scale)), (round(r * scale), round(r * scale)),
                    0, 0, 360, 1, -1, cv2.LINE_8, shift)  # fmt: skip
        inner = round(r * 0.55 * scale)
        cv2.ellipse(mask, (round(cx * scale), round(cy * scale)), (inner, inner), 0, 0, 360, 0, -1,
                    cv2.LINE_8, shift)  # fmt: skip
    elif name == "crescent":
        cv2.ellipse(mask, (round(cx * scale), round(cy * scale)), (round(r * scale), round(r * scale)),
                    0, 0, 360, 1, -1, cv2.LINE_8, shift)  # fmt: skip
        ox, oy = cx + 0.45 * r * math.cos(angle), cy + 0.45 * r * math.sin(angle)
        cv2.ellipse(mask, (round(ox * scale), round(oy * scale)), (round(0.8 * r * scale),) * 2, 0, 0, 360,
                    0, -1, cv2.LINE_8, shift)  # fmt: skip
    elif name == "square":
        fill(_polygon(_regular(4, math.pi / 4), cx, cy, r, angle * 0.25))
    elif name == "diamond":
        fill(_polygon(_regular(4) * np.array([0.62, 1.0]), cx, cy, r, angle * 0.15))
    elif name == "triangle":
        fill(_polygon(_regular(3), cx, cy, r, angle * 0.2))
    elif name == "pentagon":
        fill(_polygon(_regular(5), cx, cy, r, angle))
    elif name == "hexagon":
        fill(_polygon(_regular(6, 0.0), cx, cy, r, angle))
    elif name == "star":
        fill(_polygon(_star_points(), cx, cy, r, angle))
    elif name == "cross":
        fill(_polygon(_CROSS, cx, cy, r * 0.75, angle * 0.25))
    elif name == "arrow":
        fill(_polygon(_ARROW, cx, cy, r, angle))
    elif name == "heart":
        fill(_polygon(_HEART, cx, cy, r, angle * 0.15))
    else:  # pragma: no cover - guarded by OBJECT_CLASSES
        raise ValueError(f"unknown object class {name!r}")
    return mask.astype(bool)


def _object_paint(name: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size, 3) float32 paint for one object: class colour, jitter, shading, a pattern."""
    h, s, v = _OBJECT_COLOUR[name]
    colour = _hsv_to_rgb(h + rng.uniform(-10, 10), s * rng.uniform(0.85, 1.0), v * rng.uniform(0.85, 1.05))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    paint = np.broadcast_to(colour, (size, size, 3)).copy()
    kind = rng.integers(0, 4)
    period = rng.uniform(5, 12)
    if kind == 1:  # stripes
        theta = rng.uniform(0, math.pi)
        band = np.sin((xx * math.cos(theta) + yy * math.sin(theta)) * 2 * math.pi / period) > 0.3
        paint[band] *= 0.72
    elif kind == 2:  # dots
        dots = (np.sin(xx * 2 * math.pi / period) * np.sin(yy * 2 * math.pi / period)) > 0.6
        paint[dots] = paint[dots] * 0.5 + 0.5
    elif kind == 3:  # gradient shading
        g = rng.uniform(-1, 1, 2)
        paint *= (1 + 0.25 * ((xx / size - 0.5) * g[0] + (yy / size - 0.5) * g[1]))[..., None]
    return paint


# ---------------------------------------------------------------------------------------------
# Captions

_CAPTION_ONE = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a {}.",
    "{}",
    "the {}.",
    "a nice {}.",
    "my {}.",
    "look at this {}.",
    "a close-up photo of a {}.",
    "a drawing of a {}.",
)
_CAPTION_TWO = ("a photo of a {} and a {}.", "a {} and a {}.", "a {} next to a {}.", "a {} with a {}.")
_CAPTION_STUFF = ("a photo of a {} on {}.", "a {} on the {}.", "a {} in front of the {}.", "a {} and {}.")
_CAPTION_STUFF_ONLY = ("a photo of {}.", "a photo of the {}.", "{}", "a picture of {}.")


def make_caption(objects: tuple[str, ...], stuff: tuple[str, ...], rng: np.random.Generator) -> str:
    """A web-style caption: mostly the salient (largest) object only, sometimes more."""
    u = rng.random()
    if u < 0.62 or (len(objects) == 1 and u < 0.8):
        return _CAPTION_ONE[rng.integers(len(_CAPTION_ONE))].format(objects[0])
    if u < 0.8 and len(objects) > 1:
        return _CAPTION_TWO[rng.integers(len(_CAPTION_TWO))].format(objects[0], objects[1])
    if u < 0.95:
        place = stuff[rng.integers(len(stuff))]
        return _CAPTION_STUFF[rng.integers(len(_CAPTION_STUFF))].format(objects[0], place)
    place = stuff[rng.integers(len(stuff))]
    return _CAPTION_STUFF_ONLY[rng.integers(len(_CAPTION_STUFF_ONLY))].format(place)


# ---------------------------------------------------------------------------------------------
# Scenes


def generate_scene(index: int, seed: int = 0, size: int = DEFAULT_SIZE) -> Scene:
    """Scene ``index`` of the stream ``seed``: the same arguments always give the same scene."""
    rng = np.random.default_rng([seed, index])

    # Background: one stuff class, or an upper and a lower one split by a wavy horizon.
    if rng.random() < 0.45:
        stuff = (STUFF_CLASSES[rng.integers(len(STUFF_CLASSES))],)
        image = _stuff_texture(stuff[0], rng, size)
        stuff_map = np.full((size, size), STUFF_CLASSES.index(stuff[0]), np.uint8)
    else:
        upper = _UPPER_STUFF[rng.integers(len(_UPPER_STUFF))]
        lower = _LOWER_STUFF[rng.integers(len(_LOWER_STUFF))]
        stuff = (upper, lower)
        top, bottom = _stuff_texture(upper, rng, size), _stuff_texture(lower, rng, size)
        horizon = size * rng.uniform(0.3, 0.7) + 0.04 * size * _smooth_noise(rng, size, 3)[0]
        below = np.arange(size)[:, None] >= horizon[None, :]
        image = np.where(below[..., None], bottom, top)
        stuff_map = np.where(below, STUFF_CLASSES.index(lower), STUFF_CLASSES.index(upper)).astype(np.uint8)

    # Objects: distinct classes with log-uniform sizes, placed back to front (largest first so
    # that small ones stay visible), rejected if they would be hidden too much.
    n_objects = int(rng.choice([1, 2, 3, 4], p=[0.2, 0.3, 0.3, 0.2]))
    classes = rng.choice(len(OBJECT_CLASSES), size=n_objects, replace=False)
    sides = np.sort(np.exp(rng.uniform(math.log(MIN_SIDE_FRACTION), math.log(MAX_SIDE_FRACTION), n_objects)))
    sides = sides[::-1] * size
    label_map = np.zeros((size, size), np.uint8)
    owner = np.full((size, size), -1, np.int16)
    placed: list[tuple[int, int]] = []  # (class index, pixel count when drawn)
    for cls, side in zip(classes, sides, strict=True):
        name = OBJECT_CLASSES[cls]
        radius = side / 2
        for _attempt in range(12):
            cx = rng.uniform(radius * 0.6, size - radius * 0.6)
            cy = rng.uniform(radius * 0.6, size - radius * 0.6)
            mask = _object_mask(name, size, cx, cy, radius, rng.uniform(0, 2 * math.pi))
            area = int(mask.sum())
            if area == 0:
                continue
            # Would this object hide too much of an earlier one?
            overlap_ok = all(
                ((owner == j) & ~mask).sum() >= MIN_VISIBLE_FRACTION * a for j, (_, a) in enumerate(placed)
            )
            if overlap_ok:
                break
        else:
            continue  # no room: the scene simply has fewer objects
        paint = _object_paint(name, rng, size)
        image = np.where(mask[..., None], paint, image)
        label_map[mask] = cls + 1
        owner[mask] = len(placed)
        placed.append((int(cls), area))

    # Global photometric jitter and sensor noise.
    image = image * rng.uniform(0.85, 1.1) + rng.normal(0, 0.015, image.shape).astype(np.float32)
    image_u8 = (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)

    visible = [(int((label_map == cls + 1).sum()), cls) for cls, _ in placed]
    visible = sorted([v for v in visible if v[0] > 0], key=lambda v: (-v[0], v[1]))
    objects = tuple(OBJECT_CLASSES[c] for _, c in visible)
    areas = tuple(a for a, _ in visible)
    caption = make_caption(objects, stuff, rng)
    return Scene(index, image_u8, label_map, objects, areas, stuff, caption, stuff_map=stuff_map)


# ---------------------------------------------------------------------------------------------
# Folder layout


def scene_record(scene: Scene) -> dict:
    """The JSON record of one scene in ``tags.json``."""
    return {
        "tags": list(scene.objects),
        "labels": [OBJECT_CLASSES.index(c) + 1 for c in scene.objects],
        "areas": list(scene.areas),
        "salient": scene.salient,
        "stuff": list(scene.stuff),
        "caption": scene.caption,
    }


def _png_bytes(array: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def write_folder_dataset(out: str | Path, count: int, seed: int, start: int = 0, size: int = DEFAULT_SIZE) -> Path:
    """Write scenes ``start .. start+count-1`` of stream ``seed`` in the ``folder`` layout.

    Returns ``out``. Image ids are the zero-padded scene indices (``000123``).
    """
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    records: dict[str, dict] = {}
    for index in range(start, start + count):
        scene = generate_scene(index, seed, size)
        image_id = f"{index:06d}"
        write_bytes_atomic(_png_bytes(scene.image), out / "images" / f"{image_id}.png")
        write_bytes_atomic(_png_bytes(scene.label_map), out / "labels" / f"{image_id}.png")
        records[image_id] = scene_record(scene)
    write_bytes_atomic(("\n".join(OBJECT_CLASSES) + "\n").encode(), out / "classes.txt")
    manifest = {
        "generator": "tagclip_cli.synthetic",
        "seed": seed,
        "start": start,
        "count": count,
        "size": size,
        "classes": list(OBJECT_CLASSES),
        "background": list(STUFF_CLASSES),
        "images": records,
    }
    write_bytes_atomic((json.dumps(manifest, indent=1) + "\n").encode(), out / "tags.json")
    return out


def read_folder_dataset(root: str | Path) -> tuple[list[str], dict[str, dict]]:
    """(classes, records) of a folder written by :func:`write_folder_dataset`."""
    root = Path(root)
    classes = [ln.strip() for ln in (root / "classes.txt").read_text().splitlines() if ln.strip()]
    manifest = json.loads((root / "tags.json").read_text())
    return classes, manifest["images"]
