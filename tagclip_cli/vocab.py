"""Plain-text vocabularies: foreground classes, CLS-SEG prompt names and a background set.

File format (one entry per line, UTF-8, a byte-order mark is ignored)::

    # comment (also allowed after an entry: "cat  # felines")
    aeroplane
    person = person with clothes,people,human     <- "= name" is the CLS-SEG prompt name
    [background]                                  <- every later line is a background class
    sky

Blank lines and comments are ignored. A bare name may be given instead of a path for the
vocabularies shipped with the package (``voc``, ``coco``, ...).

Errors (`VocabularyError`, one line naming the file and line): no foreground class, a class listed
twice, a background class that is also a foreground class, an unknown ``[section]``, an empty name.
Two names count as the same class when they differ only in case, Unicode normal form or spacing,
because CLIP's tokenizer lower-cases and collapses whitespace: their text embeddings are identical.
Accepted with a warning: names with non-ASCII characters (CLIP's text encoder saw mostly English)
and names whose prompts exceed the text context (the tokenizer truncates them; see
`truncated_names`).
"""

from __future__ import annotations

import hashlib
import logging
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tagclip_cli.errors import VocabularyError, with_suggestion

log = logging.getLogger(__name__)

BUILTIN_DIR = Path(__file__).resolve().parent / "vocabularies"
BACKGROUND_HEADER = "[background]"


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

    def with_background(self, background: Sequence[str], source: str | None = None) -> Vocabulary:
        """The same foreground with another background set (checked like a vocabulary's own)."""
        entries = [(name, None) for name in background]
        _check_background(self.classes, entries, source or self.source)
        return Vocabulary(self.classes, self.seg_names, tuple(background), self.source)

    def with_background_file(self, path: str | Path) -> Vocabulary:
        """The background set read from a file of names (one per line); errors name its lines."""
        entries = _read_entries(Path(path))
        _check_background(self.classes, entries, str(path))
        return Vocabulary(self.classes, self.seg_names, tuple(n for n, _ in entries), self.source)

    def fingerprint(self) -> str:
        text = "\n".join(["fg", *self.classes, "seg", *self.seg_names, "bg", *self.background])
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def builtin_vocabularies() -> list[str]:
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.txt"))


def resolve_vocabulary_path(spec: str | Path) -> Path:
    """A path as given, or the shipped vocabulary of that name (``voc`` -> vocabularies/voc.txt)."""
    path = Path(spec)
    builtin = BUILTIN_DIR / f"{spec}.txt"
    is_name = not path.suffix and "/" not in str(spec) and builtin.exists()
    if path.is_dir() and not is_name:
        raise VocabularyError(f"{spec}: is a directory, not a vocabulary file")
    if path.exists() and not path.is_dir():
        return path
    if is_name:  # a built-in name wins over a same-named directory (e.g. ./shapes/ of images)
        return builtin
    known = builtin_vocabularies()
    message = f"{spec}: no such vocabulary file (built-in names: {', '.join(known)})"
    named = not path.suffix and "/" not in str(spec)  # a misspelt built-in name, not a missing file
    raise VocabularyError(with_suggestion(message, spec, known) if named else message)


def class_key(name: str) -> str:
    """What CLIP's tokenizer sees of a name: NFC, case-folded, whitespace collapsed."""
    return " ".join(unicodedata.normalize("NFC", name).casefold().split())


def _strip_comment(line: str) -> str:
    return line.split("#", 1)[0].strip()


def _at(source: str, lineno: int | None) -> str:
    return f"{source}:{lineno}" if lineno is not None else source


def _check_background(classes: Sequence[str], entries: Sequence[tuple[str, int | None]], source: str) -> None:
    """entries: (name, line or None). Raises on a name that is a foreground class or listed twice."""
    foreground = {class_key(c): c for c in classes}
    seen: dict[str, tuple[str, int | None]] = {}
    for name, lineno in entries:
        key = class_key(name)
        if not key:
            raise VocabularyError(f"{_at(source, lineno)}: empty background class name")
        if key in foreground:
            raise VocabularyError(
                f"{_at(source, lineno)}: background class '{name}' is also a foreground class ('{foreground[key]}')"
            )
        if key in seen:
            first, first_line = seen[key]
            where = f" on line {first_line}" if first_line is not None else ""
            raise VocabularyError(
                f"{_at(source, lineno)}: background class '{name}' is listed twice ('{first}'{where})"
            )
        seen[key] = (name, lineno)


def parse_vocabulary(text: str, source: str = "<string>") -> Vocabulary:
    """Parse the vocabulary format described in the module docstring.

    Raises VocabularyError (never anything else) for unusable text."""
    classes: list[str] = []
    seg_names: list[str] = []
    background: list[tuple[str, int]] = []
    first_seen: dict[str, tuple[str, int]] = {}  # class_key -> (name, line) of foreground classes
    in_background = False
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = _strip_comment(raw.replace("\ufeff", ""))  # byte-order marks, also of concatenated files
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
            background.append((name, lineno))
            continue
        key = class_key(name)
        if key in first_seen:
            first, first_line = first_seen[key]
            same = "" if first == name else f" (same as '{first}' once case and spacing are ignored)"
            raise VocabularyError(f"{source}:{lineno}: duplicate class '{name}'{same}, first on line {first_line}")
        first_seen[key] = (name, lineno)
        classes.append(name)
        seg_names.append(seg if sep else name)
    if not classes:
        what = "is empty" if not background else "has only background classes"
        raise VocabularyError(f"{source}: the vocabulary {what}; it needs at least one foreground class")
    _check_background_lines(first_seen, background, source)
    vocab = Vocabulary(tuple(classes), tuple(seg_names), tuple(n for n, _ in background), source)
    _warn_non_ascii(vocab)
    return vocab


def _check_background_lines(
    foreground: dict[str, tuple[str, int]], background: list[tuple[str, int]], source: str
) -> None:
    """Like _check_background, but the foreground's line is named too."""
    for name, lineno in background:
        key = class_key(name)
        if key in foreground:
            fg_name, fg_line = foreground[key]
            raise VocabularyError(
                f"{source}:{lineno}: background class '{name}' is also a foreground class "
                f"('{fg_name}' on line {fg_line})"
            )
    _check_background((), background, source)


def _warn_non_ascii(vocab: Vocabulary) -> None:
    names = [n for n in (*vocab.classes, *vocab.seg_names, *vocab.background) if not n.isascii()]
    if names:
        shown = ", ".join(f"'{n}'" for n in dict.fromkeys(names[:3]))
        log.warning(
            "%s: %d class name(s) with non-ASCII characters (%s%s); accepted, but CLIP's text encoder "
            "was trained mostly on English and may score them poorly",
            vocab.source,
            len(set(names)),
            shown,
            ", ..." if len(set(names)) > 3 else "",
        )


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise VocabularyError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except IsADirectoryError:
        raise VocabularyError(f"{path}: is a directory, not a text file") from None
    except OSError as exc:
        raise VocabularyError(f"{path}: cannot read ({exc.strerror or exc})") from None


def _read_entries(path: Path) -> list[tuple[str, int]]:
    entries = []
    for lineno, line in enumerate(_read_text(path).splitlines(), start=1):
        name = _strip_comment(line.replace("\ufeff", ""))
        if name and name.lower() != BACKGROUND_HEADER:
            entries.append((name, lineno))
    return entries


def read_name_list(path: str | Path) -> tuple[str, ...]:
    """A plain list of names (e.g. a ``--background`` file): one per line, comments allowed."""
    return tuple(name for name, _ in _read_entries(Path(path)))


def load_vocabulary(spec: str | Path) -> Vocabulary:
    """Load a vocabulary file, or a shipped vocabulary by name."""
    path = resolve_vocabulary_path(spec)
    return parse_vocabulary(_read_text(path), source=str(path))


def truncated_names(
    names: Sequence[str], templates: Sequence[str], count_tokens: Callable[[str], int], context_length: int
) -> list[str]:
    """The names for which some prompt `template.format(name)` is longer than the text context.

    count_tokens(text) is the tokenizer's token count without the start/end tokens, so a prompt
    fits when count + 2 <= context_length. Tokens are (nearly) additive, so only names whose own
    count comes within a few tokens of the budget are checked against every template."""
    if not names or not templates:
        return []
    budget = context_length - 2
    longest_template = max(count_tokens(t.format("")) for t in templates)
    out = []
    for name in names:
        if count_tokens(name) + longest_template + 4 <= budget:
            continue
        if any(count_tokens(t.format(name)) > budget for t in templates):
            out.append(name)
    return out
