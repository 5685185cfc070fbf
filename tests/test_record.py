"""The run record (tagclip_cli/record.py): typed, versioned, written and read by RecordIO.

The outputs under tests/fixtures/v0.1.0 were written by main 083e69e (tagclip-cli 0.1.0; make.sh
there says how): they read back to the same bytes, and their unfinished runs resume to the very
output an uninterrupted 0.1.0 run wrote. A record of a newer tagclip-cli is refused in one line
naming its version."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from tagclip_cli.cli import app
from tagclip_cli.errors import FormatError
from tagclip_cli.formats import MaskFile, TagsFile, read_tags_schema
from tagclip_cli.jobs.parts import PartStore
from tagclip_cli.record import (
    KEYS,
    METADATA_KEY,
    RECORD_VERSION,
    RecordIO,
    RecordVersionError,
    RunRecord,
    record_version,
)
from tagclip_cli.vocab import parse_vocabulary

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "v0.1.0"
VOCAB = "examples/shapes/classes.txt"
# The options make.sh ran 0.1.0 with (inputs relative to the repository root, as recorded).
OPTIONS = ["--vocab", VOCAB, "--model", "shapes-demo", "--device", "cpu", "--workers", "0", "--batch-size", "1"]


def test_new_record_is_todays_dict_in_order():
    record = RunRecord(model={"model": "m"}, precision="fp32", classes=["a"], seg_names=["a"], background=[],
                       vocabulary="v.txt", tagclip={"tag_threshold": 0.5}, max_side=1024)
    stored = RecordIO.to_dict(record)
    assert list(stored) == ["tool", "tool_version", "model", "precision", "classes", "seg_names", "background",
                            "vocabulary", "tagclip", "max_side"]
    assert stored["tool"] == "tagclip-cli" and record.version == RECORD_VERSION
    dense = RecordIO.with_changes(record, tagclip=None, segment={"method": "sclip"}, tags_input={"sha256": "x"})
    assert list(RecordIO.to_dict(dense))[-3:] == ["max_side", "segment", "tags_input"]
    assert RecordIO.to_dict(dense)["tagclip"] is None and dense.method == "sclip" and record.method is None


def test_a_stored_record_reads_back_to_the_same_json():
    """Keys in their stored order, absent keys absent, unknown keys kept: writing it again changes nothing."""
    stored = {"model": "fake", "zeta": [1, 2], "classes": ["a", "b"], "tool": "tagclip-cli"}
    record = RecordIO.from_dict(stored, "x")
    assert (record.model, record.classes, record.precision) == ("fake", ["a", "b"], None)
    assert record.extra == {"zeta": [1, 2]}
    assert json.dumps(RecordIO.to_dict(record)) == json.dumps(stored)
    assert record.version is None  # no tool_version: read as it is
    assert RecordIO.from_dict({}).empty and not record.empty
    assert RecordIO.differences(record, RecordIO.from_dict({**stored, "classes": ["a"]})) == ["classes"]


def test_record_versions_follow_the_tool_version():
    assert record_version("0.1.0") == 1
    assert record_version("test") is None and record_version(None) is None
    assert record_version("99.0.0") is None  # newer than this tagclip-cli
    with pytest.raises(RecordVersionError, match=r"^x: written by tagclip-cli 99\.0\.0, newer than this") as info:
        RecordIO.from_dict({"tool": "tagclip-cli", "tool_version": "99.0.0", "classes": []}, "x")
    assert "\n" not in str(info.value) and info.value.exit_code == 2
    with pytest.raises(FormatError, match="not a JSON object"):
        RecordIO.from_dict([1], "x")


# ---- outputs of tagclip-cli 0.1.0 (main 083e69e) ------------------------------------------------

def test_v010_tags_parquet_reads_to_the_same_bytes():
    stored = pq.read_schema(FIXTURES / "tags.parquet").metadata[METADATA_KEY]
    record = read_tags_schema(FIXTURES / "tags.parquet")
    assert (record.tool, record.tool_version, record.version) == ("tagclip-cli", "0.1.0", 1)
    assert record.model["model"] == "shapes-demo" and record.max_side == 1024 and record.tag_threshold == 0.5
    assert record.keys is not None and set(record.keys) <= set(KEYS) and not record.extra
    assert RecordIO.metadata(record)[METADATA_KEY] == stored
    tags = TagsFile(FIXTURES / "tags.parquet", parse_vocabulary((REPO / VOCAB).read_text()))
    assert tags.record == record and tags.identity()["made_with"] == record.tagclip


@pytest.mark.parametrize("name", ["masks.json", "masks.parquet"])
def test_v010_masks_files_read(name):
    masks = MaskFile(FIXTURES / name)
    record = masks.record
    assert (record.tool_version, record.method, record.version) == ("0.1.0", "clses", 1)
    assert list(masks.classes) == record.classes
    if name == "masks.json":
        info = json.loads((FIXTURES / name).read_text())["info"]
        assert json.dumps(RecordIO.coco_info(record)) == json.dumps(info["tagclip"])  # same order, same values


@pytest.mark.parametrize("work", ["tags-partial.parquet.parts", "masks-partial.json.parts"])
def test_v010_config_json_reads_to_the_same_bytes(work):
    path = FIXTURES / work / "config.json"
    record = RecordIO.read_config(path)
    assert record.tool_version == "0.1.0" and record.keys == tuple(json.loads(path.read_text()))
    assert json.dumps(RecordIO.to_dict(record)) == path.read_text()
    assert PartStore(FIXTURES / work.removesuffix(".parts")).config() == record


def _resume(tmp_path: Path, monkeypatch, command: str, name: str) -> Path:
    """Copy 0.1.0's unfinished run (shard 0 of 2 done) and rerun the whole command with this version:
    it resumes (only the images of shard 1 are computed) and merges."""
    monkeypatch.chdir(REPO)  # the recorded input paths are relative to the repository root
    shutil.copytree(FIXTURES / f"{name}.parts", tmp_path / f"{name}.parts")
    out = tmp_path / name
    runner = CliRunner()
    cache = ["--cache-dir", str(tmp_path / "cache")]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as make.sh made the fixtures: the last bits of a score follow the thread count
    try:
        result = runner.invoke(app, [command, "examples/shapes/images", "--out", str(out),
                                     *OPTIONS, *cache])
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    assert "4 done, 4 skipped (already done), 0 failed" in result.output
    assert not (tmp_path / f"{name}.parts").exists()
    return out


# The fixtures were made on one CPU (make.sh, a Xeon with AMX); the images a resume computes are
# computed on this one, whose float kernels may round the last bits of a score differently (an AMD
# EPYC without AMX: up to 4.2e-7). So the outputs must be the fixtures' byte for byte where they
# are the same file (the same CPU), and otherwise equal in everything but those scores: the rows
# 0.1.0 wrote (its part) exactly, the recomputed scores to 1e-6.
RECOMPUTED_SCORE_TOLERANCE = 1e-6


def _done_by_v010(name: str) -> set[str]:
    """The image ids of the part 0.1.0 finished before it stopped."""
    return {i for part in (FIXTURES / f"{name}.parts").glob("part-*.parquet")
            for i in pq.read_table(part, columns=["image_id"]).column("image_id").to_pylist()}


def _assert_scores(got: float, expected: float, exact: bool, where: str) -> None:
    if exact:
        assert got == expected, f"{where}: 0.1.0's row changed"
    else:
        assert got == pytest.approx(expected, abs=RECOMPUTED_SCORE_TOLERANCE), where


@pytest.mark.slow
def test_v010_unfinished_annotate_run_resumes_to_the_same_output(tmp_path, monkeypatch):
    out = _resume(tmp_path, monkeypatch, "annotate", "tags-partial.parquet")
    if out.read_bytes() == (FIXTURES / "tags.parquet").read_bytes():
        return
    got, expected = pq.read_table(out), pq.read_table(FIXTURES / "tags.parquet")
    assert got.schema.equals(expected.schema, check_metadata=True)
    assert got.drop_columns(["scores"]).equals(expected.drop_columns(["scores"]))
    done = _done_by_v010("tags-partial.parquet")
    assert done and done < set(got.column("image_id").to_pylist())
    for row, expected_row in zip(got.to_pylist(), expected.to_pylist(), strict=True):
        assert len(row["scores"]) == len(expected_row["scores"])
        for score, expected_score in zip(row["scores"], expected_row["scores"], strict=True):
            _assert_scores(score, expected_score, row["image_id"] in done, row["image_id"])


@pytest.mark.slow
def test_v010_unfinished_segment_run_resumes_to_the_same_output(tmp_path, monkeypatch):
    out = _resume(tmp_path, monkeypatch, "segment", "masks-partial.json")
    if out.read_bytes() == (FIXTURES / "masks.json").read_bytes():
        return
    got, expected = json.loads(out.read_text()), json.loads((FIXTURES / "masks.json").read_text())
    assert list(got) == list(expected)
    assert {k: v for k, v in got.items() if k != "annotations"} == {
        k: v for k, v in expected.items() if k != "annotations"}
    assert len(got["annotations"]) == len(expected["annotations"])
    done = _done_by_v010("masks-partial.json")
    done_ids = {image["id"] for image in expected["images"] if image["file_name"] in done}
    assert done_ids and len(done_ids) < len(expected["images"])
    for ann, expected_ann in zip(got["annotations"], expected["annotations"], strict=True):
        assert list(ann) == list(expected_ann)
        assert {k: v for k, v in ann.items() if k != "score"} == {k: v for k, v in expected_ann.items() if k != "score"}
        _assert_scores(ann["score"], expected_ann["score"], ann["image_id"] in done_ids, f"annotation {ann['id']}")


def test_a_newer_versions_unfinished_run_is_refused_in_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    work = tmp_path / "tags-partial.parquet.parts"
    shutil.copytree(FIXTURES / "tags-partial.parquet.parts", work)
    config = json.loads((work / "config.json").read_text())
    (work / "config.json").write_text(json.dumps({**config, "tool_version": "99.0.0"}))
    result = CliRunner().invoke(app, ["merge", str(tmp_path / "tags-partial.parquet")])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "written by tagclip-cli 99.0.0, newer than this tagclip-cli" in lines[0], result.output


def test_a_built_in_vocabulary_from_another_install_is_the_same_setting():
    """The record stores the absolute path of a built-in vocabulary; a rerun from another checkout or
    install (same --vocab voc, other path) is the same setting, a user's own file elsewhere is not."""
    from tagclip_cli.record import changed_paths

    def rec(path: str) -> RunRecord:
        return RunRecord(model={"model": "m"}, precision="fp32", classes=["a"], seg_names=["a"], background=[],
                         vocabulary=path, tagclip={"tag_threshold": 0.5}, max_side=1024)

    here = rec("/work/main/tagclip_cli/vocabularies/voc.txt")
    there = rec("/opt/venv/lib/python3.12/site-packages/tagclip_cli/vocabularies/voc.txt")
    assert RecordIO.same(here, there) and changed_paths(here, there) == {}
    assert not RecordIO.same(here, rec("/opt/venv/lib/python3.12/site-packages/tagclip_cli/vocabularies/coco.txt"))
    mine, moved = rec("/data/a/my_classes.txt"), rec("/data/b/my_classes.txt")
    assert not RecordIO.same(mine, moved)
    assert changed_paths(mine, moved) == {"vocabulary": ("/data/a/my_classes.txt", "/data/b/my_classes.txt")}
    # what is written is unchanged: the stored record keeps the path
    assert RecordIO.to_dict(there)["vocabulary"].endswith("site-packages/tagclip_cli/vocabularies/voc.txt")
