"""Plain-text vocabularies: foreground classes, CLS-SEG prompt names and a background set.

File format (one entry per line, UTF-8)::

    # comment (also allowed after an entry: "cat  # felines")
    aeroplane
    person = person with clothes,people,human     <- "= name" is the CLS-SEG prompt name
    [background]                                  <- every later line is a background class
    sky

Blank lines are ignored. A bare name may be given instead of a path for the vocabularies shipped
with the package (``voc``, ``coco``, ...). Errors name the file and the line.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

BUILTIN_DIR = Path(__file__).resolve().parent / "vocabularies"
BACKGROUND_HEADER = "[background]"


class VocabularyError(ValueError):
    """A vocabulary file that cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class Vocabulary:
    """Foreground classes (tagged), their CLS-SEG names, and background classes (scored only)."""

    classes: tuple[str, ...]
    seg_names: tuple[str, ...]
    background: tuple[str, ...]
    source: str = "<memory>"

    def __post_init__(self) -> None:
        if len(self.seg_names) != len(self.classes):
            raise VocabularyError(f"{self.source}: seg_names and classes differ in length")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def all_names(self) -> tuple[str, ...]:
        """Foreground classes followed by the background set (the C columns of every score matrix)."""
        return self.classes + self.background

    def with_background(self, background: tuple[str, ...]) -> Vocabulary:
        _check_background(self.classes, background, self.source)
        return Vocabulary(self.classes, self.seg_names, tuple(background), self.source)

    def fingerprint(self) -> str:
        text = "\n".join(["fg", *self.classes, "seg", *self.seg_names, "bg", *self.background])
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def builtin_vocabularies() -> list[str]:
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.txt"))


def resolve_vocabulary_path(spec: str | Path) -> Path:
    """A path as given, or the shipped vocabulary of that name (``voc`` -> vocabularies/voc.txt)."""
    path = Path(spec)
    if path.exists():
        return path
    builtin = BUILTIN_DIR / f"{spec}.txt"
    if not path.suffix and builtin.exists():
        return builtin
    known = ", ".join(builtin_vocabularies())
    raise VocabularyError(f"{spec}: no such vocabulary file (built-in names: {known})")


def _strip_comment(line: str) -> str:
    return line.split("#", 1)[0].strip()


def _check_background(classes: tuple[str, ...], background: tuple[str, ...], source: str) -> None:
    seen: set[str] = set()
    for name in background:
        if name in classes:
            raise VocabularyError(f"{source}: background class '{name}' is also a foreground class")
        if name in seen:
            raise VocabularyError(f"{source}: background class '{name}' is listed twice")
        seen.add(name)


def parse_vocabulary(text: str, source: str = "<string>") -> Vocabulary:
    """Parse the vocabulary format described in the module docstring."""
    classes: list[str] = []
    seg_names: list[str] = []
    background: list[str] = []
    where: dict[str, int] = {}
    in_background = False
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = _strip_comment(raw)
        if not line:
            continue
        if line.lower() == BACKGROUND_HEADER:
            if in_background:
                raise VocabularyError(f"{source}:{lineno}: second {BACKGROUND_HEADER} section")
            in_background = True
            continue
        if line.startswith("[") and line.endswith("]"):
            raise VocabularyError(f"{source}:{lineno}: unknown section {line} (only {BACKGROUND_HEADER})")
        name, sep, seg = (part.strip() for part in line.partition("="))
        if not name:
            raise VocabularyError(f"{source}:{lineno}: empty class name before '='")
        if sep and not seg:
            raise VocabularyError(f"{source}:{lineno}: empty CLS-SEG name after '=' for '{name}'")
        if in_background:
            if sep:
                raise VocabularyError(f"{source}:{lineno}: background classes take no '= name' part")
            if name in where and name in classes:
                raise VocabularyError(
                    f"{source}:{lineno}: background class '{name}' is also a foreground class "
                    f"(line {where[name]})"
                )
            if name in background:
                raise VocabularyError(
                    f"{source}:{lineno}: background class '{name}' is listed twice (line {where[name]})"
                )
            background.append(name)
        else:
            if name in where:
                raise VocabularyError(
                    f"{source}:{lineno}: duplicate class '{name}' (first on line {where[name]})"
                )
            classes.append(name)
            seg_names.append(seg if sep else name)
        where[name] = lineno
    if not classes:
        raise VocabularyError(f"{source}: the vocabulary has no foreground classes")
    return Vocabulary(tuple(classes), tuple(seg_names), tuple(background), source)


def read_name_list(path: str | Path) -> tuple[str, ...]:
    """A plain list of names (e.g. a ``--background`` file): one per line, comments allowed."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise VocabularyError(f"{path}: cannot read ({exc})") from exc
    names = [_strip_comment(line) for line in text.splitlines()]
    return tuple(n for n in names if n and n.lower() != BACKGROUND_HEADER)


def load_vocabulary(spec: str | Path) -> Vocabulary:
    """Load a vocabulary file, or a shipped vocabulary by name."""
    path = resolve_vocabulary_path(spec)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise VocabularyError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except OSError as exc:
        raise VocabularyError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    return parse_vocabulary(text, source=str(path))
