"""Vocabulary parsing: the format, every error (one line, file and line), and what is merely warned about."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from tagclip_cli.vocab import (
    VocabularyError,
    builtin_vocabularies,
    class_key,
    load_vocabulary,
    parse_vocabulary,
    read_name_list,
    truncated_names,
)


def test_format_with_seg_names_comments_blank_lines_and_background():
    text = "# header\n\ncat   # felines\nperson = person with clothes,people\n\n[Background]\nsky\n  grass  \n"
    voc = parse_vocabulary(text, "v.txt")
    assert voc.classes == ("cat", "person")
    assert voc.seg_names == ("cat", "person with clothes,people")
    assert voc.background == ("sky", "grass")
    assert voc.all_names == ("cat", "person", "sky", "grass")


def test_byte_order_mark_and_crlf_are_ignored(tmp_path: Path):
    path = tmp_path / "v.txt"
    path.write_bytes("\ufeffcat\r\ndog\r\n".encode())
    assert load_vocabulary(path).classes == ("cat", "dog")


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "v.txt: the vocabulary is empty; it needs at least one foreground class"),
        ("# only a comment\n\n", "v.txt: the vocabulary is empty"),
        ("[background]\nsky\n", "v.txt: the vocabulary has only background classes"),
        ("cat\ndog\ncat\n", "v.txt:3: duplicate class 'cat', first on line 1"),
        (
            "cat\n\nCat\n",
            "v.txt:3: duplicate class 'Cat' (same as 'cat' once case and spacing are ignored), first on line 1",
        ),
        ("tv monitor\ntv   monitor\n", "v.txt:2: duplicate class 'tv   monitor'"),
        (
            "cat\n[background]\nsky\ncat\n",
            "v.txt:4: background class 'cat' is also a foreground class ('cat' on line 1)",
        ),
        ("cat\n[background]\nsky\nSKY\n", "v.txt:4: background class 'SKY' is listed twice ('sky' on line 3)"),
        ("cat\n[background]\n[background]\n", "v.txt:3: second [background] section"),
        ("cat\n[stuff]\n", "v.txt:2: unknown section [stuff] (only [background])"),
        ("= x\n", "v.txt:1: empty class name before '='"),
        ("cat =\n", "v.txt:1: empty CLS-SEG name after '=' for 'cat'"),
        ("cat\n[background]\nsky = blue sky\n", "v.txt:3: background classes take no '= name' part"),
    ],
)
def test_errors_name_file_and_line(text: str, message: str):
    with pytest.raises(VocabularyError) as info:
        parse_vocabulary(text, "v.txt")
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)


def test_nfc_and_nfd_spellings_are_the_same_class():
    nfc, nfd = "caf\u00e9", "cafe\u0301"
    assert nfc != nfd and class_key(nfc) == class_key(nfd)
    with pytest.raises(VocabularyError, match="v.txt:2: duplicate class"):
        parse_vocabulary(f"{nfc}\n{nfd}\n", "v.txt")


def test_non_ascii_names_are_accepted_with_one_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="tagclip_cli"):
        voc = parse_vocabulary("chat\ncaf\u00e9\n\u732b\n", "fr.txt")
    assert voc.classes == ("chat", "caf\u00e9", "\u732b")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "fr.txt: 2 class name(s) with non-ASCII characters ('caf\u00e9', '\u732b')" in warnings[0]


def test_ascii_vocabulary_has_no_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="tagclip_cli"):
        parse_vocabulary("cat\n# comment\n\ndog\n")
    assert not caplog.records


def test_missing_unreadable_and_binary_files(tmp_path: Path):
    with pytest.raises(VocabularyError, match=r"^nope\.txt: no such vocabulary file \(built-in names: coco, "):
        load_vocabulary("nope.txt")
    with pytest.raises(VocabularyError, match="is a directory"):
        load_vocabulary(tmp_path)
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"cat\n\xff\xfe\x00dog\n")
    with pytest.raises(VocabularyError, match=r"bin\.txt: not UTF-8 text \(invalid start byte at byte 4\)"):
        load_vocabulary(binary)


def test_builtin_vocabularies_parse():
    assert {"voc", "coco"} <= set(builtin_vocabularies())
    voc = load_vocabulary("voc")
    assert voc.num_classes == 20 and voc.classes[0] == "aeroplane" and len(voc.background) > 0


def test_background_file_errors_name_its_lines(tmp_path: Path):
    voc = parse_vocabulary("cat\ndog\n", "v.txt")
    bg = tmp_path / "bg.txt"
    bg.write_text("# sky things\nsky\ncloud\nDog\n")
    message = r"bg\.txt:4: background class 'Dog' is also a foreground class \('dog'\)"
    with pytest.raises(VocabularyError, match=message):
        voc.with_background_file(bg)
    bg.write_text("sky\n\ncloud\nsky\n")
    with pytest.raises(VocabularyError, match=r"bg\.txt:4: background class 'sky' is listed twice \('sky' on line 1\)"):
        voc.with_background_file(bg)
    bg.write_text("sky\ncloud\n")
    assert voc.with_background_file(bg).background == ("sky", "cloud")
    assert read_name_list(bg) == ("sky", "cloud")
    with pytest.raises(VocabularyError, match=r"missing\.txt: cannot read \(No such file or directory\)"):
        voc.with_background_file(tmp_path / "missing.txt")
    with pytest.raises(VocabularyError, match="background class 'cat' is also a foreground class"):
        voc.with_background(("cat",))


def test_truncated_names_counts_template_plus_name():
    # A toy tokenizer: one token per whitespace-separated word.
    def words(text: str) -> int:
        return len(text.split())

    templates = ("a {}.", "a photo of a {}.")  # 1 and 4 words besides the name
    six, seven = " ".join("w" * 6), " ".join("w" * 7)
    names = ["cat", six, seven]
    # context 12 -> 10 tokens of budget: "a photo of a" + 6 = 10 fits, + 7 = 11 does not.
    assert truncated_names(names, templates, words, 12) == [seven]
    assert truncated_names(names, templates, words, 11) == [six, seven]
    assert truncated_names(names, (), words, 5) == []


def test_backbone_warns_once_per_truncated_class(tiny_backbone, caplog):
    from tagclip_cli.tagclip import tagclip_templates

    long_name = " ".join(["zebra"] * 80)
    with caplog.at_level(logging.WARNING, logger="tagclip_cli"):
        found = tiny_backbone.warn_truncated(["cat", long_name, long_name], tagclip_templates())
    assert found == [long_name]
    warnings = [r.getMessage() for r in caplog.records if "text context" in r.getMessage()]
    assert warnings == [f"class '{long_name}' is longer than the 77-token text context; its prompts are truncated"]
    # Exactly at the limit: "a photo of a {}." is the longest short template; find the largest name
    # that still fits and check it is not reported while one more word is.
    encode = tiny_backbone.tokenizer.encode
    budget = 75 - max(len(encode(t.format(""))) for t in tagclip_templates())
    fitting = " ".join(["zebra"] * budget)
    assert max(len(encode(t.format(fitting))) for t in tagclip_templates()) <= 75
    assert tiny_backbone.warn_truncated([fitting], tagclip_templates()) == []
    assert tiny_backbone.warn_truncated([fitting + " zebra"], tagclip_templates()) == [fitting + " zebra"]


def test_builtin_name_wins_over_a_directory_of_that_name(tmp_path, monkeypatch):
    from tagclip_cli.vocab import BUILTIN_DIR, resolve_vocabulary_path

    monkeypatch.chdir(tmp_path)
    (tmp_path / "voc").mkdir()
    assert resolve_vocabulary_path("voc") == BUILTIN_DIR / "voc.txt"
    (tmp_path / "mine").mkdir()
    with pytest.raises(VocabularyError, match="is a directory"):
        resolve_vocabulary_path("mine")
