"""The run record: everything that determines an output, stored with it and checked on resume.

`RunRecord` is the typed record; `RecordIO` is the one class that writes and reads it: the dict
form (`to_dict`, key order included, as config.json holds it), config.json in a work directory, the
Parquet schema metadata (key "tagclip", sorted keys) and the `info.tagclip` object of the COCO
masks JSON. Everything else reads a record's attributes.

The record's version follows from the `tool_version` that wrote it (`record_version`): every
tagclip-cli up to this one writes record version 1. A record written by a newer tagclip-cli is
refused in one line that names that version; a record without a version (a file made by hand or
by another tool) is read as it is, missing keys absent.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from tagclip_cli import __version__
from tagclip_cli.errors import FormatError
from tagclip_cli.fileio import write_json_atomic

TOOL = "tagclip-cli"
METADATA_KEY = b"tagclip"  # the Parquet schema metadata key (and the COCO JSON's info key)
RECORD_VERSION = 1  # the record this tagclip-cli writes
FIRST_TOOL_VERSION = {1: "0.1.0"}  # record version -> the first tool_version that wrote it

# Written only when set (a run without per-class thresholds, a tags-only run, a run without --tags).
OPTIONAL = ("thresholds", "segment", "tags_input", "tagger")


class RecordVersionError(FormatError):
    """A run record written by a tagclip-cli newer than this one (exit code 2)."""


@dataclass(frozen=True)
class RunRecord:
    """What determines one run's output, in the order it is written.

    model: the backbone's identity ({"model", "weights" or "pretrained", ...}); classes /
    seg_names / background: the vocabulary (background [] without background scoring); tagclip:
    TagCLIP's settings (None when TagCLIP did not run: the dense baselines, `--tags`); segment:
    the segmentation settings (segment runs only); thresholds: per-class thresholds when set;
    tags_input: the `--tags` file's identity ({"sha256", "made_with"}); tagger: the settings of a
    tagging method other than TagCLIP ({"method": "piaa", ..., "fit": the fitted model's file,
    sha256 and inputs}; then tagclip is None).

    A record read from a file keeps what it holds exactly: `keys` are its keys in their stored
    order (None for a new record: every key but the OPTIONAL ones left None, in field order) and
    `extra` the values of keys this version does not know, so writing it again gives the same JSON."""

    tool: str | None = TOOL
    tool_version: str | None = __version__
    model: Any = None
    precision: str | None = None
    classes: Sequence[str] | None = None
    seg_names: Sequence[str] | None = None
    background: Sequence[str] | None = None
    vocabulary: str | None = None
    tagclip: Mapping[str, Any] | None = None
    max_side: int | None = None
    thresholds: Mapping[str, Any] | None = None
    segment: Mapping[str, Any] | None = None
    tags_input: Mapping[str, Any] | None = None
    tagger: Mapping[str, Any] | None = None
    keys: tuple[str, ...] | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        """Whether the record holds nothing (a file without a run record)."""
        return self.keys == ()

    @property
    def version(self) -> int | None:
        """The record version (`record_version` of tool_version); None when it has none."""
        return record_version(self.tool_version)

    @property
    def method(self) -> str | None:
        """The segmentation method of a segment run (None for annotate)."""
        return self.segment.get("method") if isinstance(self.segment, Mapping) else None

    @property
    def tag_threshold(self) -> float | None:
        """The recorded tag threshold of TagCLIP, or of the other tagging method that ran."""
        for settings in (self.tagclip, self.tagger):
            if isinstance(settings, Mapping):
                return settings.get("tag_threshold")
        return None

    @property
    def tag_method(self) -> str | None:
        """The tagging method that made the tags: "tagclip", another method's name, or None."""
        if isinstance(self.tagger, Mapping):
            return self.tagger.get("method")
        return "tagclip" if isinstance(self.tagclip, Mapping) else None

    @property
    def made_by_tool(self) -> str:
        """"tagclip-cli 0.1.0" (or what the record says made it)."""
        return " ".join(str(v) for v in (self.tool or TOOL, self.tool_version) if v)


KEYS = tuple(f.name for f in fields(RunRecord) if f.name not in ("keys", "extra"))


def _version_tuple(text: object) -> tuple[int, ...] | None:
    match = re.fullmatch(r"(\d+)\.(\d+)\.(\d+)\S*", text) if isinstance(text, str) else None
    return tuple(int(part) for part in match.groups()) if match else None


def record_version(tool_version: object) -> int | None:
    """The record version a tagclip-cli of `tool_version` wrote: the newest one whose first tool
    version is not later than it; None for no version (not "X.Y.Z") or one newer than this tool."""
    version = _version_tuple(tool_version)
    if version is None or version > _version_tuple(__version__):
        return None
    known = [v for v, first in FIRST_TOOL_VERSION.items() if _version_tuple(first) <= version]
    return max(known) if known else None


class RecordIO:
    """Writes and reads run records: the dict form, config.json, Parquet metadata, COCO info."""

    @staticmethod
    def to_dict(record: RunRecord) -> dict:
        """The record as written: a new record's keys in field order, a read one's as they were."""
        names = record.keys
        if names is None:
            names = tuple(k for k in KEYS if not (k in OPTIONAL and getattr(record, k) is None))
        return {k: getattr(record, k) if k in KEYS else record.extra[k] for k in names}

    @staticmethod
    def stored(record: RunRecord) -> dict:
        """The record as a JSON file reads it back (tuples as lists): what resumes compare."""
        return json.loads(json.dumps(RecordIO.to_dict(record)))

    @staticmethod
    def from_dict(data: object, source: str | Path = "run record") -> RunRecord:
        """The record of a stored dict. Raises FormatError when it is not a JSON object, and
        RecordVersionError (one line naming the version) when a newer tagclip-cli wrote it."""
        if not isinstance(data, Mapping):
            raise FormatError(f"{source}: the run record is not a JSON object")
        if data.get("tool") == TOOL and _version_tuple(data.get("tool_version")) is not None \
                and record_version(data.get("tool_version")) is None:
            raise RecordVersionError(
                f"{source}: written by {TOOL} {data['tool_version']}, newer than this {TOOL} {__version__} "
                f"(run record version {RECORD_VERSION}); upgrade tagclip-cli to read or resume it")
        return RunRecord(**{k: data.get(k) for k in KEYS}, keys=tuple(data),
                         extra={k: v for k, v in data.items() if k not in KEYS})

    @staticmethod
    def differences(a: RunRecord, b: RunRecord) -> list[str]:
        """The keys whose stored values differ between two records, sorted."""
        return differing_keys(RecordIO.stored(a), RecordIO.stored(b))

    @staticmethod
    def same(a: RunRecord, b: RunRecord) -> bool:
        return comparable(a) == comparable(b)

    # ---- config.json ----
    @staticmethod
    def write_config(record: RunRecord, path: Path) -> None:
        """config.json, atomically: the dict form in field order."""
        write_json_atomic(RecordIO.to_dict(record), path)

    @staticmethod
    def read_config(path: Path) -> RunRecord:
        try:
            data = json.loads(Path(path).read_text())
        except ValueError as exc:
            raise FormatError(f"{path}: not JSON ({exc})") from None
        return RecordIO.from_dict(data, path)

    # ---- Parquet schema metadata and the COCO JSON's info ----
    @staticmethod
    def metadata(record: RunRecord) -> dict[bytes, bytes]:
        """The Parquet schema metadata holding the record (sorted keys)."""
        return {METADATA_KEY: json.dumps(RecordIO.to_dict(record), sort_keys=True).encode("utf-8")}

    @staticmethod
    def from_metadata(metadata: Mapping[bytes, bytes] | None, source: str | Path = "run record") -> RunRecord:
        """The record in a Parquet schema's metadata (an empty record when there is none). Raises
        ValueError when it is not JSON, RecordVersionError for a newer tagclip-cli's."""
        raw = (metadata or {}).get(METADATA_KEY)
        return RecordIO.from_dict(json.loads(raw) if raw else {}, source)

    @staticmethod
    def coco_info(record: RunRecord) -> dict:
        """The `info.tagclip` object of a COCO masks JSON (the record read from the rows' Parquet
        schema, so in sorted key order; an exported one in the order its masks file has)."""
        return RecordIO.stored(record)

    @staticmethod
    def with_changes(record: RunRecord, **changes: Any) -> RunRecord:
        """The record with some values replaced; an OPTIONAL key set to None is left out, a key it
        did not hold is added at the end."""
        if record.keys is None:
            return replace(record, **changes)
        dropped = {k for k, v in changes.items() if k in OPTIONAL and v is None}
        keys = [k for k in record.keys if k not in dropped] + [k for k in changes if k not in record.keys]
        return replace(record, **changes, keys=tuple(k for k in keys if k not in dropped))


# ---- what changed between two records (the refusal of a rerun with other settings) ------------------

# A record path (keys joined by ".") -> the option that sets it; a leaf not listed here is named by
# its last key when that is an option of `segment` (`SEGMENT_OPTIONS`), else by its path.
OPTION_OF = {
    "model": "--model", "model.model": "--model", "model.weights": "--pretrained/--checkpoint",
    "precision": "--precision",
    "classes": "--vocab classes", "seg_names": "--vocab names", "vocabulary": "--vocab",
    "background": "--background/--no-background", "max_side": "--max-side", "tags_input": "--tags",
    "tagclip": "TagCLIP (--tags/--method)", "tagclip.tag_threshold": "--tag-threshold",
    "tagclip.reference_compat": "--reference-compat", "tagclip.use_background": "background scoring (--no-background)",
    "thresholds": "--thresholds", "thresholds.default": "--thresholds default", "segment.method": "--method",
}
SEGMENT_OPTIONS = ("setting", "crf", "save_cams", "key_smoothing", "prompt_denoising", "rcs")
THRESHOLD_PATHS = ("tagclip.tag_threshold", "thresholds")  # what `tagclip retag` can change without the model


def differing_keys(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """The keys whose values differ between two dicts (a key missing from one counts as None), sorted."""
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def _builtin_vocabulary(value: Any) -> Any:
    """A recorded path to a vocabulary shipped with the package (…/tagclip_cli/vocabularies/NAME.txt)
    as "built-in NAME", so that the same --vocab from another checkout or install compares equal
    (its classes and names are recorded beside it and still compared); anything else as it is."""
    if not isinstance(value, str):
        return value
    path = Path(value)
    if path.suffix == ".txt" and path.parent.name == "vocabularies" and path.parent.parent.name == "tagclip_cli":
        return f"built-in {path.stem}"
    return value


def comparable(record: RunRecord) -> dict:
    """The stored record as a rerun compares it (a built-in vocabulary by its name, not its path)."""
    stored = dict(RecordIO.stored(record))
    if "vocabulary" in stored:
        stored["vocabulary"] = _builtin_vocabulary(stored["vocabulary"])
    return stored


def _leaves(value: Any, path: str) -> dict[str, Any]:
    """path -> value of every leaf of a stored record value (a dict is descended, anything else a leaf)."""
    if isinstance(value, Mapping) and value:
        out: dict[str, Any] = {}
        for key, sub in value.items():
            out.update(_leaves(sub, f"{path}.{key}"))
        return out
    return {path: value}


def _shown(value: Any) -> str:
    """A stored value as a change line shows it: short JSON, a long list by its length."""
    if value is None or value == []:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    text = value if isinstance(value, str) else json.dumps(value)
    if isinstance(value, list) and len(text) > 40:
        return f"{len(value)} names"
    return text if len(text) <= 60 else text[:57] + "..."


def _option(path: str) -> str:
    if path in OPTION_OF:
        return OPTION_OF[path]
    if path.startswith("thresholds.per_class."):
        return f"--thresholds {path.removeprefix('thresholds.per_class.')}"
    last = path.rsplit(".", 1)[-1]
    return f"--{last.replace('_', '-')}" if path.startswith("segment.") and last in SEGMENT_OPTIONS else path


def _list_change(old: Any, new: Any) -> str:
    """' (+ added; - removed)' for two lists of names, '' otherwise."""
    if not (isinstance(old, list) and isinstance(new, list)):
        return ""
    added = [str(n) for n in new if n not in old]
    removed = [str(n) for n in old if n not in new]
    parts = [f"+ {', '.join(added[:5])}{' ...' if len(added) > 5 else ''}"] if added else []
    parts += [f"- {', '.join(removed[:5])}{' ...' if len(removed) > 5 else ''}"] if removed else []
    return f" ({'; '.join(parts)})" if parts else ""


def changed_paths(previous: RunRecord, current: RunRecord) -> dict[str, tuple[Any, Any]]:
    """path -> (old, new) of every stored leaf that differs (tool and tool_version aside), in the
    record's order."""
    old, new = comparable(previous), comparable(current)
    changes: dict[str, tuple[Any, Any]] = {}
    for key in [*new, *(k for k in old if k not in new)]:
        if key in ("tool", "tool_version") or old.get(key) == new.get(key):
            continue
        a, b = _leaves(old.get(key), key), _leaves(new.get(key), key)
        for path in [*b, *(p for p in a if p not in b)]:
            if a.get(path) != b.get(path):
                changes[path] = (a.get(path), b.get(path))
    return changes


def describe_changes(previous: RunRecord, current: RunRecord, limit: int = 6) -> str:
    """Each differing setting with its old and new value, by the option that sets it:
    "--tag-threshold: 0.5 -> 0.6; --max-side: 1024 -> 512" (at most `limit`, then "and N more")."""
    changes = changed_paths(previous, current)
    if not changes:  # only the tool differs
        return f"made by {previous.made_by_tool}, now {current.made_by_tool}"
    lines = [f"{_option(p)}: {_shown(a)} -> {_shown(b)}{_list_change(a, b)}" for p, (a, b) in changes.items()]
    more = f"; and {len(lines) - limit} more" if len(lines) > limit else ""
    return "; ".join(lines[:limit]) + more


def only_thresholds_changed(previous: RunRecord, current: RunRecord) -> bool:
    """Whether the two records differ only in the tag thresholds (what `tagclip retag` redoes)."""
    changes = changed_paths(previous, current)
    return bool(changes) and all(any(p == t or p.startswith(t + ".") for t in THRESHOLD_PATHS) for p in changes)
