"""End to end: `--shard I/N` tasks over Parquet inputs with no plan yet list only their own row
groups (jobs/listing.py): each task runs on the input with every byte it does not own zeroed (only
the footers left intact), and `tagclip merge` of the tasks' parts gives the same file, byte for
byte, as one process over the intact input; also on S3 (moto on loopback), mixed with a run that
lists the whole input, and the refusal of a task of another input. (`tagclip merge` writes the
same rows and metadata as a run's own merge; the Arrow schema it stores in the footer is serialized
from the parts' schema and can differ in bytes, so bytes are compared after a run's own merge.)

`--batch-size 1`: with tar / Parquet inputs a task's batches hold only the images of its own row
groups, so with larger batches its scores equal one process's to 1e-6, not to the bit (as for any
split by shard, docs/scaleout.md); one image per batch takes that out of the comparison."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from shard_fixtures import env_for, moto_s3, noise_images, s3_env, s3fs_client, write_parquet

FILES = (("a", 7, 2), ("b", 9, 3), ("c", 6, 4))  # (name, rows, row group size): 4 + 3 + 2 = 9 row groups


def tagclip(*args: str, cache: Path, env: dict[str, str] | None = None, cwd: Path | None = None
            ) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tagclip_cli", *args], capture_output=True, text=True,
                          env=env_for(cache, env), timeout=600, cwd=cwd)


def annotate(images: str, out: Path, checkpoint: Path, *extra: str) -> list[str]:
    return ["annotate", images, "--vocab", "voc", "--out", str(out), "--checkpoint", str(checkpoint),
            "--workers", "0", "--batch-size", "1", "--device", "cpu", *extra]


def write_files(folder: Path, style: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    images = noise_images(sum(rows for _, rows, _ in FILES), seed=21, sizes=((64, 48), (48, 64), (64, 64)))
    start = 0
    for name, rows, group in FILES:
        write_parquet(folder / f"{name}.parquet", images[start:start + rows], row_group_size=group, style=style)
        start += rows
    return folder


def zero_unowned(pristine: Path, folder: Path, rank: int, world: int) -> None:
    """folder/<name>.parquet: the pristine file with every column chunk of a row group that this
    task does not own (global row group number % world != rank) overwritten by zeros; footers kept."""
    unit = 0
    for name, _, _ in FILES:
        data = bytearray((pristine / f"{name}.parquet").read_bytes())
        meta = pq.read_metadata(pristine / f"{name}.parquet")
        for g in range(meta.num_row_groups):
            if (unit + g) % world != rank:
                for c in range(meta.num_columns):
                    chunk = meta.row_group(g).column(c)
                    start = chunk.dictionary_page_offset or chunk.data_page_offset
                    data[start:start + chunk.total_compressed_size] = bytes(chunk.total_compressed_size)
        unit += meta.num_row_groups
        (folder / f"{name}.parquet").write_bytes(bytes(data))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("own_cache")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """The pristine files (hf style: no id column, so a task reads nothing of a group it does not
    own) and one single-process run over them, in a work folder the tests run from."""
    root = tmp_path_factory.mktemp("own_listing")
    return write_files(root / "pristine", "hf"), root


@pytest.fixture(scope="module")
def reference(dataset, tiny_checkpoint, cache):
    pristine, root = dataset
    shutil.copytree(pristine, root / "data")
    proc = tagclip(*annotate("data/*.parquet", root / "ref.parquet", tiny_checkpoint), cache=cache, cwd=root)
    assert proc.returncode == 0, proc.stderr
    return root / "ref.parquet"


def test_each_task_reads_only_its_row_groups_and_the_merge_is_the_same_file(dataset, reference, tiny_checkpoint,
                                                                             cache):
    pristine, root = dataset
    out, world = root / "own.parquet", 3
    try:
        for rank in range(world):
            run_task_on_zeroed(pristine, root, out, tiny_checkpoint, cache, rank, world)
    finally:
        shutil.rmtree(root / "data")
        shutil.copytree(pristine, root / "data")
    # a run over the whole input on a copy of the parts finds every image done and merges: the same bytes
    shutil.copytree(root / "own.parquet.parts", root / "again.parquet.parts")
    again = tagclip(*annotate("data/*.parquet", root / "again.parquet", tiny_checkpoint), cache=cache, cwd=root)
    assert again.returncode == 0 and "0 done, 22 skipped (already done)" in again.stderr, again.stderr
    assert (root / "again.parquet").read_bytes() == reference.read_bytes()
    # `tagclip merge` puts items.parquet together from the tasks' pieces: the same rows and metadata
    merged = tagclip("merge", str(out), cache=cache)
    assert merged.returncode == 0 and "merged 22 rows" in merged.stderr, merged.stderr
    table, ref = pq.read_table(out), pq.read_table(reference)
    assert table.schema.equals(ref.schema, check_metadata=True)
    for name in ref.column_names:
        assert table.column(name).equals(ref.column(name)), name
    assert not (root / "own.parquet.parts").exists()
    rerun = tagclip(*annotate("data/*.parquet", out, tiny_checkpoint, "--shard", "1/3"), cache=cache, cwd=root)
    assert rerun.returncode == 0 and "already complete" in rerun.stderr, rerun.stderr


def run_task_on_zeroed(pristine: Path, root: Path, out: Path, checkpoint: Path, cache: Path, rank: int,
                       world: int) -> None:
    """Task rank/world on root/data with all it does not own zeroed: it works, and leaves its piece
    of the input list (no items.parquet, no plan); a merge after the first task says what is missing."""
    zero_unowned(pristine, root / "data", rank, world)
    proc = tagclip(*annotate("data/*.parquet", out, checkpoint, "--shard", f"{rank}/{world}"), cache=cache, cwd=root)
    assert proc.returncode == 0, proc.stderr
    assert "0 failed" in proc.stderr
    parts = root / "own.parquet.parts"
    assert not (parts / "items.parquet").exists() and not (parts / "plan.parquet").exists()
    assert len(list((parts / "listing").glob("*.parquet"))) == rank + 1
    if rank == 0:
        early = tagclip("merge", str(out), cache=cache)
        assert early.returncode == 2 and "Traceback" not in early.stderr
        assert "images have not been listed yet (e.g. #2, #3, #4)" in early.stderr


def test_s3_tasks_then_a_whole_list_run_on_the_same_output(dataset, reference, tiny_checkpoint, cache, tmp_path):
    """Two of three tasks list their own row groups from S3, then one process (which lists the whole
    input and writes items.parquet) finishes the rest and merges: the reference's rows (paths are
    the S3 URLs)."""
    pristine, root = dataset
    out = root / "s3.parquet"
    with moto_s3() as endpoint:
        fs = s3fs_client()
        fs.mkdir("pqdata")
        fs.put(str(pristine) + "/", "pqdata/data/", recursive=True)
        env = s3_env(endpoint)
        for rank in (0, 2):
            proc = tagclip(*annotate("s3://pqdata/data/*.parquet", out, tiny_checkpoint, "--shard", f"{rank}/3"),
                           cache=cache, env=env, cwd=root)
            assert proc.returncode == 0, proc.stderr
        assert len(list((root / "s3.parquet.parts" / "listing").glob("*.parquet"))) == 2
        rest = tagclip(*annotate("s3://pqdata/data/*.parquet", out, tiny_checkpoint), cache=cache, env=env, cwd=root)
    assert rest.returncode == 0, rest.stderr
    assert "skipped (already done)" in rest.stderr
    ref, got = pq.read_table(reference), pq.read_table(out)
    assert got.column("path").to_pylist()[0] == "s3://pqdata/data/a.parquet#row=0"
    assert got.schema.metadata == ref.schema.metadata
    for name in ref.column_names:
        if name != "path":
            assert got.column(name).equals(ref.column(name)), name


def test_a_task_of_another_input_is_refused(dataset, tiny_checkpoint, cache, tmp_path):
    pristine, _ = dataset
    shutil.copytree(pristine, tmp_path / "data")
    out = tmp_path / "out.parquet"
    first = tagclip(*annotate("data/*.parquet", out, tiny_checkpoint, "--shard", "0/2"), cache=cache, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    other = tagclip(*annotate("data/{a,b}.parquet", out, tiny_checkpoint, "--shard", "1/2"), cache=cache,
                    cwd=tmp_path)
    assert other.returncode == 2 and "Traceback" not in other.stderr
    assert len(other.stderr.strip().splitlines()) == 1
    assert "the --shard tasks there listed a different input" in other.stderr
    assert "22 images, now 16" in other.stderr


TARS = "data/{00000..00004}.tar"  # (named, not globbed: a task's copy lacks the shards it does not own)


def test_tar_tasks_read_only_their_shards_and_the_merge_is_the_same_file(tiny_checkpoint, cache, tmp_path):
    """--shard tasks over tars with no plan: the first one (nothing published yet) counts the other
    shards from their headers and publishes the counts; the later ones run on a copy holding only
    their own shards. A whole-list run on a copy of the parts finds every image done and merges to
    the single process's bytes; `tagclip merge` of the tasks' pieces gives its rows and metadata."""
    from shard_fixtures import write_dataset

    pristine, _ = write_dataset(tmp_path / "pristine", noise_images(14, seed=23, sizes=((64, 48), (48, 64))), shards=5)
    shutil.copytree(pristine, tmp_path / "data")
    ref = tagclip(*annotate(TARS, tmp_path / "ref.parquet", tiny_checkpoint), cache=cache, cwd=tmp_path)
    assert ref.returncode == 0, ref.stderr
    out, world = tmp_path / "own.parquet", 3
    for rank in range(world):
        if rank:
            for shard in range(5):
                if shard % world != rank:
                    (tmp_path / "data" / f"{shard:05d}.tar").unlink(missing_ok=True)
                else:
                    shutil.copy(pristine / f"{shard:05d}.tar", tmp_path / "data")
        proc = tagclip(*annotate(TARS, out, tiny_checkpoint, "--shard", f"{rank}/{world}"), cache=cache, cwd=tmp_path)
        assert proc.returncode == 0 and "0 failed" in proc.stderr, proc.stderr
        assert ("counted 3 tar shards of other tasks" in proc.stderr) == (rank == 0), proc.stderr
    parts = tmp_path / "own.parquet.parts"
    assert not (parts / "items.parquet").exists() and len(list((parts / "listing").glob("*.parquet"))) == world
    shutil.rmtree(tmp_path / "data")
    shutil.copytree(pristine, tmp_path / "data")
    shutil.copytree(parts, tmp_path / "again.parquet.parts")
    again = tagclip(*annotate(TARS, tmp_path / "again.parquet", tiny_checkpoint), cache=cache, cwd=tmp_path)
    assert again.returncode == 0 and "0 done, 14 skipped (already done)" in again.stderr, again.stderr
    assert (tmp_path / "again.parquet").read_bytes() == (tmp_path / "ref.parquet").read_bytes()
    merged = tagclip("merge", str(out), cache=cache)
    assert merged.returncode == 0 and "merged 14 rows" in merged.stderr, merged.stderr
    table, reference = pq.read_table(out), pq.read_table(tmp_path / "ref.parquet")
    assert table.schema.equals(reference.schema, check_metadata=True)
    for name in reference.column_names:
        assert table.column(name).equals(reference.column(name)), name
    rerun = tagclip(*annotate(TARS, out, tiny_checkpoint, "--shard", "1/3"), cache=cache, cwd=tmp_path)
    assert rerun.returncode == 0 and "already complete" in rerun.stderr, rerun.stderr
    assert not (tmp_path / "own.parquet.parts").exists()  # (nothing created beside the finished output)
