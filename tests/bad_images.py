"""A corpus of broken and unusual image files, generated on the fly, with the expected outcome of each.

Shared by tests/test_hardening.py (decoding in-process) and tests/e2e/test_bad_inputs_e2e.py (the CLI).
pytest puts tests/ on sys.path because tests/conftest.py lives there, so `import bad_images` works
from tests/e2e too.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

NON_UTF8_NAME = b"caf\xe9.png"  # Latin-1 "café.png": not valid UTF-8
NON_UTF8_ID = "caf\\xe9.png"  # how it appears in the output (backslash-escaped byte)


@dataclass(frozen=True)
class Expect:
    """What a file should become: status "ok" with (width, height), or "failed" with a reason fragment."""

    status: str
    reason: str | None = None
    size: tuple[int, int] | None = None


def running_as_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def noise(h: int, w: int, seed: int = 0, channels: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (h, w, channels) if channels > 1 else (h, w)
    return rng.integers(0, 256, shape, dtype=np.uint8)


def gradient(h: int, w: int) -> np.ndarray:
    """A smooth RGB image (JPEG keeps it close): red grows left to right, green top to bottom."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), np.full_like(x, 128)], -1).astype(np.uint8)


def jpeg_bytes(arr: np.ndarray, **save_args) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90, **save_args)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height (8-bit RGB) with a tiny, useless IDAT: PIL reads the size
    without decoding, which is what a decompression bomb looks like before its first pixel."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def exif_rotated_jpeg(width: int, height: int, orientation: int = 6) -> bytes:
    """A width x height JPEG whose EXIF orientation says "rotate 90 degrees" (6): viewers show it
    height x width."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return jpeg_bytes(noise(height, width, seed=3), exif=exif.tobytes())


def animated(fmt: str, size: tuple[int, int] = (24, 16)) -> bytes:
    """Two frames: solid red, then solid blue (so the first frame is recognisable)."""
    frames = [Image.new("RGB", size, (255, 0, 0)), Image.new("RGB", size, (0, 0, 255))]
    buf = io.BytesIO()
    extra = {"lossless": True} if fmt == "WEBP" else {}
    frames[0].save(buf, format=fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, **extra)
    return buf.getvalue()


def make_bad_corpus(root: Path) -> dict[str, Expect]:
    """Write the corpus under root; returns {image_id: Expect}. Every file has an image extension."""
    root.mkdir(parents=True, exist_ok=True)
    expect: dict[str, Expect] = {}

    def put(name: str, data: bytes, outcome: Expect) -> None:
        (root / name).write_bytes(data)
        expect[name] = outcome

    put("good.jpg", jpeg_bytes(noise(48, 64)), Expect("ok", size=(64, 48)))
    put("empty.jpg", b"", Expect("failed", "empty file"))
    full = jpeg_bytes(noise(64, 64, seed=1))
    put("truncated.jpg", full[: len(full) // 2], Expect("failed", "truncated image"))
    png = io.BytesIO()
    Image.fromarray(noise(64, 64, seed=2)).save(png, format="PNG")
    put("truncated.png", png.getvalue()[: len(png.getvalue()) // 2], Expect("failed", "truncated image"))
    put("notes.png", b"this is a text file, not a picture\n" * 20, Expect("failed", "not an image"))
    put("page.jpg", b"<!DOCTYPE html><html><body>404 Not Found</body></html>\n", Expect("failed", "not an image"))

    gray16 = io.BytesIO()
    Image.fromarray(np.arange(30 * 20, dtype=np.uint16).reshape(20, 30) * 100).save(gray16, format="PNG")
    put("gray16.png", gray16.getvalue(), Expect("ok", size=(30, 20)))

    pal = Image.fromarray(noise(20, 24, seed=4)).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    pal_buf = io.BytesIO()
    pal.save(pal_buf, format="PNG", transparency=0)
    put("palette_transparent.png", pal_buf.getvalue(), Expect("ok", size=(24, 20)))

    cmyk = io.BytesIO()
    Image.fromarray(gradient(20, 28)).convert("CMYK").save(cmyk, format="JPEG", quality=95)
    put("cmyk.jpg", cmyk.getvalue(), Expect("ok", size=(28, 20)))

    put("exif_rotated.jpg", exif_rotated_jpeg(40, 20), Expect("ok", size=(20, 40)))
    put("animated.gif", animated("GIF"), Expect("ok", size=(24, 16)))
    put("animated.webp", animated("WEBP"), Expect("ok", size=(24, 16)))
    tiny = io.BytesIO()
    Image.fromarray(noise(2, 3, seed=6)).save(tiny, format="PNG")
    put("tiny_3x2.png", tiny.getvalue(), Expect("ok", size=(3, 2)))
    put("bomb.png", png_header_only(30_000, 30_000), Expect("failed", "decompression-bomb guard"))
    put("UPPER.JPG", jpeg_bytes(noise(16, 16, seed=7)), Expect("ok", size=(16, 16)))

    # Root reads anything regardless of mode bits, so there the file is simply fine.
    put(
        "unreadable.jpg",
        jpeg_bytes(noise(16, 16, seed=8)),
        Expect("ok", size=(16, 16)) if running_as_root() else Expect("failed", "permission denied"),
    )
    os.chmod(root / "unreadable.jpg", 0)

    os.symlink(root / "no-such-target.jpg", root / "broken_link.jpg")
    expect["broken_link.jpg"] = Expect("failed", "broken symbolic link")
    os.mkfifo(root / "pipe.png")
    expect["pipe.png"] = Expect("failed", "not a regular file")

    (root / "sub").mkdir()
    (root / "sub" / "nested.png").write_bytes(tiny.getvalue())
    expect["sub/nested.png"] = Expect("ok", size=(3, 2))

    with open(os.path.join(os.fsencode(root), NON_UTF8_NAME), "wb") as fh:
        fh.write(tiny.getvalue())
    expect[NON_UTF8_ID] = Expect("ok", size=(3, 2))
    return expect


def restore_permissions(root: Path) -> None:
    """Let pytest clean the corpus up."""
    path = root / "unreadable.jpg"
    if path.exists():
        os.chmod(path, 0o644)
