"""The pictures of `tagclip show`: an image with its masks blended in and a legend panel below
(the overlay PNG), and its thumbnail. Pure PIL / numpy; `tagclip_cli.show` decides what to draw."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

MASK_ALPHA = 0.5
MIN_PANEL_WIDTH = 360
PLACEHOLDER_SIZE = (320, 240)
FAILED_RED = (220, 30, 30)


@lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def blend_masks(image: np.ndarray, labels: np.ndarray, colors: np.ndarray, alpha: float = MASK_ALPHA) -> np.ndarray:
    """Colour the masked pixels of an (H, W, 3) uint8 image.

    labels (H, W) int, 0 = untouched; colors (L, 3) uint8 indexed by label. Inside a mask the pixel
    becomes (1 - alpha) * pixel + alpha * colour; the mask's one-pixel boundary is the pure colour.
    Pixels outside every mask are returned unchanged. Returns (H, W, 3) uint8."""
    out = image.astype(np.float32)
    inside = labels > 0
    color = colors[labels].astype(np.float32)
    out[inside] = (1.0 - alpha) * out[inside] + alpha * color[inside]
    edge = np.zeros_like(inside)
    edge[:-1, :] |= labels[:-1, :] != labels[1:, :]
    edge[1:, :] |= labels[1:, :] != labels[:-1, :]
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    edge &= inside
    out[edge] = color[edge]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def fit_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """(width, height) scaled down so the longer side is at most max_side (never up)."""
    if max(width, height) <= max_side:
        return width, height
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    """Greedy word wrap to `width` pixels (long words are cut)."""
    lines: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}".strip()
        if draw.textlength(candidate, font=font) <= width:
            current = candidate
            continue
        if current:
            lines.append(current)
        while draw.textlength(word, font=font) > width and len(word) > 1:
            cut = len(word)
            while cut > 1 and draw.textlength(word[:cut], font=font) > width:
                cut -= 1
            lines.append(word[:cut])
            word = word[cut:]
        current = word
    if current:
        lines.append(current)
    return lines or [""]


@dataclass(frozen=True)
class LegendLine:
    """One line of the overlay's legend: optional colour swatch, text, text colour."""

    text: str
    swatch: tuple[int, int, int] | None = None
    color: tuple[int, int, int] = (20, 20, 20)
    bold: bool = False


def render_overlay(
    picture: Image.Image | None, labels: np.ndarray | None, colors: np.ndarray, lines: Sequence[LegendLine],
    failed: bool, max_side: int,
) -> tuple[Image.Image, Image.Image]:
    """The overlay (image part + legend panel below) and the image part alone (for the thumbnail).

    picture: the RGB image, or None when it cannot be read (a grey placeholder is drawn);
    labels: (H, W) label map at the picture's size, or None. The image part keeps the picture's size
    unless its longer side exceeds max_side; the panel is at least MIN_PANEL_WIDTH wide."""
    part = _image_part(picture, labels, colors, max_side)
    if failed:
        part = _mark_failed(part)
    return _add_legend(part, lines), part


def _image_part(picture: Image.Image | None, labels: np.ndarray | None, colors: np.ndarray,
                max_side: int) -> Image.Image:
    """The picture with its masks blended in, fitted to max_side; a grey crossed placeholder when None."""
    if picture is None:
        part = Image.new("RGB", PLACEHOLDER_SIZE, (200, 200, 200))
        d = ImageDraw.Draw(part)
        d.line([(0, 0), (PLACEHOLDER_SIZE[0] - 1, PLACEHOLDER_SIZE[1] - 1)], fill=(150, 150, 150), width=3)
        d.line([(0, PLACEHOLDER_SIZE[1] - 1), (PLACEHOLDER_SIZE[0] - 1, 0)], fill=(150, 150, 150), width=3)
        return part
    part = picture
    if labels is not None and labels.any():
        part = Image.fromarray(blend_masks(np.asarray(picture.convert("RGB")), labels, colors))
    size = fit_size(part.width, part.height, max_side)
    if size != part.size:
        part = part.resize(size, Image.Resampling.LANCZOS)
    return part


def _mark_failed(part: Image.Image) -> Image.Image:
    """A copy of the image part with a red border and a red "FAILED" label."""
    part = part.copy()
    d = ImageDraw.Draw(part)
    border = max(3, min(part.size) // 60)
    d.rectangle([0, 0, part.width - 1, part.height - 1], outline=FAILED_RED, width=border)
    font = _font(max(12, min(48, part.width // 10)))
    text = "FAILED"
    box = d.textbbox((0, 0), text, font=font)
    pad = border + 4
    d.rectangle([border, border, border + (box[2] - box[0]) + 2 * pad, border + (box[3]) + 2 * pad],
                fill=FAILED_RED)
    d.text((border + pad, border + pad), text, font=font, fill=(255, 255, 255))
    return part


def _add_legend(part: Image.Image, lines: Sequence[LegendLine]) -> Image.Image:
    """The image part above a white legend panel: the lines wrapped to the panel's width, with swatches."""
    panel_width = max(part.width, MIN_PANEL_WIDTH)
    size = max(12, min(28, panel_width // 40))
    font, bold = _font(size), _font(size + 2)
    line_h = int(size * 1.45)
    pad = size // 2
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    wrapped: list[tuple[LegendLine, str, bool]] = []
    for line in lines:
        indent = line_h if line.swatch is not None else 0
        line_font = bold if line.bold else font
        for k, text in enumerate(_wrap(measure, line.text, line_font, panel_width - 2 * pad - indent)):
            wrapped.append((line, text, k == 0))
    panel_h = 2 * pad + line_h * len(wrapped)
    canvas = Image.new("RGB", (panel_width, part.height + panel_h), (255, 255, 255))
    canvas.paste(part, (0, 0))
    draw = ImageDraw.Draw(canvas)
    draw.line([(0, part.height), (panel_width, part.height)], fill=(180, 180, 180), width=1)
    y = part.height + pad
    for line, text, first in wrapped:
        x = pad
        if line.swatch is not None:
            if first:
                s = line_h - 6
                draw.rectangle([x, y + 3, x + s, y + 3 + s], fill=line.swatch, outline=(60, 60, 60))
            x += line_h
        draw.text((x, y + (line_h - size) // 2 - 1), text, font=bold if line.bold else font, fill=line.color)
        y += line_h
    return canvas


def thumbnail(part: Image.Image, side: int) -> Image.Image:
    thumb = part.copy()
    thumb.thumbnail((side, side), Image.Resampling.LANCZOS)
    return thumb
