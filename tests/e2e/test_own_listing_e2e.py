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


def tar_dataset(root: Path) -> Path:
    """Six shards: 0, 1 and 3 plain, 2 empty, 4 with a key repeated (`#2`), 5 cut in the middle of a
    member (its samples before the cut, then a failed row)."""
    from shard_fixtures import encode, write_dataset, write_tar

    tars, _ = write_dataset(root, noise_images(9, seed=23, sizes=((64, 48), (48, 64))), shards=3)
    (tars / "00002.tar").rename(tars / "00003.tar")
    write_tar(tars / "00002.tar", [])
    one, two = noise_images(2, seed=24, sizes=((64, 48),))
    write_tar(tars / "00004.tar", [("k.png", encode(one)), ("x.png", encode(two)), ("k.png", encode(two))])
    members = [(f"{k:03d}.png", encode(arr)) for k, arr in enumerate(noise_images(4, seed=25, sizes=((48, 64),)))]
    whole = write_tar(root / "whole.tar", members).read_bytes()
    (tars / "00005.tar").write_bytes(whole[: len(whole) // 2])
    return tars


def own_copy(pristine: Path, data: Path, rank: int, world: int) -> None:
    """data/: only the shards task rank/world owns (shard % world == rank)."""
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir()
    for shard in range(rank, 6, world):
        shutil.copy(pristine / f"{shard:05d}.tar", data)


def test_tar_tasks_number_their_own_shards_and_the_merge_renumbers_to_one_process(tiny_checkpoint, cache, tmp_path):
    """--shard tasks over tars with no plan, each on a copy holding only its own shards, in the
    order 0, 2, 1; task 0 is killed after its first part and resumed before the others run. The
    merge refuses while task 1 has not run (naming its shards), then gives the single process's rows
    and metadata; a whole-list run on a copy of the parts finds every image done and writes the
    single process's bytes; a rerun of a task after the merge finds the output complete."""
    from conftest import kill_after_first_part

    pristine = tar_dataset(tmp_path / "pristine")
    tars = f"{tmp_path}/data/{{00000..00005}}.tar"  # (absolute: kill_after_first_part runs in another folder)
    shutil.copytree(pristine, tmp_path / "data")
    ref = tagclip(*annotate(tars, tmp_path / "ref.parquet", tiny_checkpoint), cache=cache)
    assert ref.returncode == 1 and "failed" in ref.stderr, ref.stderr  # (the cut shard's failed row)
    reference = pq.read_table(tmp_path / "ref.parquet")
    out, parts, world = tmp_path / "own.parquet", tmp_path / "own.parquet.parts", 3
    own_copy(pristine, tmp_path / "data", 0, world)
    args = annotate(tars, out, tiny_checkpoint, "--shard", f"0/{world}", "--part-size", "1")
    assert kill_after_first_part(args, env_for(cache), parts) < 0
    written = sum(pq.read_metadata(p).num_rows for p in parts.glob("part-*.parquet"))
    assert 0 < written < 6 and min(pq.read_table(parts / next(iter(sorted(p.name for p in parts.glob("part-*"))))
                                   ).column("index").to_pylist()) >= 1 << 62  # local indices
    resumed = tagclip(*args, cache=cache)
    assert resumed.returncode == 0 and f"{6 - written} done, {written} skipped" in resumed.stderr, resumed.stderr
    for rank in (2, 1):
        if rank == 1:
            early = tagclip("merge", str(out), cache=cache)
            assert early.returncode == 2 and "Traceback" not in early.stderr and len(early.stderr.splitlines()) == 1
            assert "2 of 6 tar shards have not been listed yet (e.g. #1, #4)" in early.stderr, early.stderr
        own_copy(pristine, tmp_path / "data", rank, world)
        proc = tagclip(*annotate(tars, out, tiny_checkpoint, "--shard", f"{rank}/{world}"), cache=cache)
        assert proc.returncode == (1 if rank == 2 else 0), proc.stderr  # (task 2 owns the cut shard)
        assert ("All shards are done" in proc.stderr) == (rank == 1), proc.stderr
    assert not (parts / "items.parquet").exists() and len(list((parts / "listing").glob("*.parquet"))) == world
    shutil.rmtree(tmp_path / "data")
    shutil.copytree(pristine, tmp_path / "data")
    shutil.copytree(parts, tmp_path / "again.parquet.parts")
    again = tagclip(*annotate(tars, tmp_path / "again.parquet", tiny_checkpoint), cache=cache)
    assert again.returncode == 1 and f"0 done, {reference.num_rows} skipped" in again.stderr, again.stderr
    assert (tmp_path / "again.parquet").read_bytes() == (tmp_path / "ref.parquet").read_bytes()
    merged = tagclip("merge", str(out), cache=cache)
    assert merged.returncode == 0 and f"merged {reference.num_rows} rows" in merged.stderr, merged.stderr
    table = pq.read_table(out)
    assert table.schema.equals(reference.schema, check_metadata=True)
    for name in reference.column_names:
        assert table.column(name).equals(reference.column(name)), name
    assert "k#2" in " ".join(table.column("image_id").to_pylist())
    rerun = tagclip(*annotate(tars, out, tiny_checkpoint, "--shard", "1/3"), cache=cache)
    assert rerun.returncode == 1 and "already complete" in rerun.stderr, rerun.stderr  # (1: the failed rows)
    assert not (tmp_path / "own.parquet.parts").exists()  # (nothing created beside the finished output)
