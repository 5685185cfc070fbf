"""Fuzzing (hypothesis) of the two parsers that read untrusted input: image decoding and vocabularies.

The property is the contract the pipeline relies on: `load_rgb` returns an 8-bit RGB image or
raises DecodeError (whose message becomes the row's reason), and `parse_vocabulary` returns a valid
Vocabulary or raises VocabularyError; nothing else escapes, nothing hangs.

Bounded for CI (about 10 s on one core): a fixed number of examples, derandomised so that CI is
reproducible. For a longer, random campaign:
    TAGCLIP_FUZZ_EXAMPLES=20000 TAGCLIP_FUZZ_RANDOM=1 .venv/bin/pytest tests/test_fuzz.py
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from tagclip_cli.data import DecodeError, load_rgb
from tagclip_cli.vocab import BACKGROUND_HEADER, VocabularyError, class_key, parse_vocabulary

EXAMPLES = int(os.environ.get("TAGCLIP_FUZZ_EXAMPLES", "150"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None if os.environ.get("TAGCLIP_FUZZ_RANDOM") else 5000,
    derandomize=not os.environ.get("TAGCLIP_FUZZ_RANDOM"),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    database=None,
)
MAX_PIXELS = 4_000_000  # a mutated header may claim any size: keep allocations small


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def seed_images() -> list[bytes]:
    """Small valid files of every format and mode the decoder handles specially."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (12, 20, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:], duration=50)
    return [
        _encode(rgb, "PNG"),
        _encode(rgb, "JPEG", quality=80),
        _encode(rgb, "JPEG", exif=exif.tobytes()),
        _encode(rgb.convert("CMYK"), "JPEG"),
        _encode(rgb.convert("P"), "PNG", transparency=0),
        _encode(Image.fromarray(np.arange(240, dtype=np.uint16).reshape(12, 20) * 200), "PNG"),
        _encode(rgb.convert("RGBA"), "WEBP", lossless=True),
        _encode(rgb, "BMP"),
        _encode(rgb, "TIFF"),
        _encode(rgb.convert("L"), "TIFF", compression="tiff_deflate"),
        gif.getvalue(),
    ]


SEEDS = seed_images()


@st.composite
def mutated_images(draw) -> bytes:
    """A seed image with a few byte flips, insertions, deletions and possibly a truncation."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(["flip", "insert", "delete", "set_int"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del data[pos : pos + draw(st.integers(1, 16))]
        elif kind == "set_int" and len(data) > pos + 4:  # header fields (sizes, lengths) are integers
            data[pos : pos + 4] = draw(
                st.sampled_from([b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\x7f\xff\xff\xff", b"\x00\x01\x00\x00"])
            )
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


def check_decode(path: Path, payload: bytes) -> None:
    path.write_bytes(payload)
    try:
        img = load_rgb(str(path), max_pixels=MAX_PIXELS)
    except DecodeError as exc:
        reason = str(exc)
        assert reason and "\n" not in reason
        return
    assert img.mode == "RGB"
    assert img.width >= 1 and img.height >= 1 and img.width * img.height <= MAX_PIXELS
    arr = np.asarray(img)
    assert arr.dtype == np.uint8 and arr.shape == (img.height, img.width, 3)


@pytest.fixture(scope="module")
def fuzz_file(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz") / "input.img"


def test_seed_images_decode(fuzz_file):
    for payload in SEEDS:
        fuzz_file.write_bytes(payload)
        assert load_rgb(str(fuzz_file)).mode == "RGB"


@FUZZ
@given(payload=mutated_images())
def test_mutated_images_decode_or_give_a_reason(fuzz_file, payload):
    check_decode(fuzz_file, payload)


@FUZZ
@given(payload=st.binary(max_size=2048))
def test_arbitrary_bytes_decode_or_give_a_reason(fuzz_file, payload):
    check_decode(fuzz_file, payload)


# ---- vocabularies -------------------------------------------------------------------------------------

NAME_CHARS = st.characters(codec="utf-8", exclude_categories=("Cs",))
LINES = st.one_of(
    st.text(NAME_CHARS, max_size=30),
    st.sampled_from(
        [
            "",
            "# comment",
            BACKGROUND_HEADER,
            "[Background]",
            "[other]",
            "=",
            "cat",
            "Cat",
            "cat = x",
            "dog # dog",
            "  dog  ",
            "sky",
            "a = ",
            " = b",
            "\ufeffcat",
            "caf\u00e9",
            "cafe\u0301",
        ]
    ),
)


def vocabulary_text(vocab) -> str:
    """Serialise a Vocabulary back to the file format."""
    lines = [c if s == c else f"{c} = {s}" for c, s in zip(vocab.classes, vocab.seg_names, strict=True)]
    if vocab.background:
        lines += [BACKGROUND_HEADER, *vocab.background]
    return "\n".join(lines) + "\n"


@FUZZ
@given(lines=st.lists(LINES, max_size=12), newline=st.sampled_from(["\n", "\r\n"]))
def test_vocabulary_parses_to_a_valid_vocabulary_or_a_one_line_error(lines, newline):
    text = newline.join(lines)
    try:
        vocab = parse_vocabulary(text, "fuzz.txt")
    except VocabularyError as exc:
        message = str(exc)
        assert message.startswith("fuzz.txt") and "\n" not in message
        return
    assert vocab.classes and len(vocab.seg_names) == len(vocab.classes)
    keys = [class_key(n) for n in vocab.all_names]
    assert len(set(keys)) == len(keys)  # no duplicates, no background class among the foreground
    for name in (*vocab.all_names, *vocab.seg_names):
        assert name and name == name.strip() and "#" not in name and "\n" not in name and "\r" not in name
    assert parse_vocabulary(vocabulary_text(vocab), "again.txt").all_names == vocab.all_names
