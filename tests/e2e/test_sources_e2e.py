"""End to end: `tagclip annotate` / `segment` on WebDataset tar shards, Parquet with image bytes and
S3 (moto's server on loopback), against a folder run of the same images; sharding by tar shard,
resume after SIGKILL, and bad inputs (one line, never a traceback)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import kill_after_first_part
from shard_fixtures import (
    SECRET,
    add_member,
    encode,
    env_for,
    link_member,
    moto_s3,
    noise_images,
    rewrite_header,
    s3_env,
    s3fs_client,
    tar_layout,
    write_dataset,
    write_parquet,
    write_tar,
)

N_IMAGES = 26
SHARDS = 4


def args_for(images: str | None, out: Path, checkpoint: Path, *extra: str, command: str = "annotate") -> list[str]:
    first = [images] if images is not None else []
    return [command, *first, "--vocab", "voc", "--out", str(out), "--checkpoint", str(checkpoint),
            "--workers", "0", "--batch-size", "3", "--device", "cpu", *extra]


def tagclip(*args: str, cache: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tagclip_cli", *args], capture_output=True, text=True,
                          env=env_for(cache, env), timeout=600)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources_e2e")
    images = noise_images(N_IMAGES, seed=11, sizes=((64, 48), (48, 64), (64, 64)))
    tars, folder = write_dataset(root, images, shards=SHARDS)
    write_parquet(root / "hf.parquet", images, row_group_size=5, style="hf")
    return root, tars, folder


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("sources_cache")


@pytest.fixture(scope="module")
def folder_run(data, tiny_checkpoint, cache, tmp_path_factory):
    _, _, folder = data
    out = tmp_path_factory.mktemp("folder_run") / "folder.parquet"
    proc = tagclip(*args_for(str(folder), out, tiny_checkpoint), cache=cache)
    assert proc.returncode == 0, proc.stderr
    return pq.read_table(out)


@pytest.fixture(scope="module")
def tar_run(data, tiny_checkpoint, cache, tmp_path_factory):
    _, tars, _ = data
    out = tmp_path_factory.mktemp("tar_run") / "tars.parquet"
    proc = tagclip(*args_for(str(tars / "{00000..00003}.tar"), out, tiny_checkpoint, "--workers", "2"), cache=cache)
    assert proc.returncode == 0, proc.stderr
    assert f"{N_IMAGES} done, 0 skipped (already done), 0 failed" in proc.stderr
    return pq.read_table(out)


def assert_same_results(table, reference, ids: bool = True) -> None:
    """Same images in the same order, same tags, scores equal to 1e-6."""
    assert table.num_rows == reference.num_rows
    assert table.column("index").to_pylist() == reference.column("index").to_pylist()
    if ids:
        assert table.column("image_id").equals(reference.column("image_id"))
    assert table.column("tags").to_pylist() == reference.column("tags").to_pylist()
    for name in ("width", "height", "status"):
        assert table.column(name).equals(reference.column(name)), name
    got, want = (np.array(t.column("scores").to_pylist(), dtype=np.float64) for t in (table, reference))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_tars_give_the_folder_results(tar_run, folder_run):
    assert tar_run.column("image_id").to_pylist()[:2] == ["00000/0000000", "00000/0000001"]
    assert folder_run.column("image_id").to_pylist()[:2] == ["00000/0000000.png", "00000/0000001.png"]
    assert tar_run.column("path").to_pylist()[0].startswith("tar://0000000.png::")
    assert_same_results(tar_run, folder_run, ids=False)


def test_parquet_gives_the_folder_results(data, tiny_checkpoint, cache, folder_run, tmp_path):
    root, _, _ = data
    out = tmp_path / "pq.parquet"
    proc = tagclip(*args_for(None, out, tiny_checkpoint, "--images-parquet", str(root / "hf.parquet"),
                             "--workers", "2"), cache=cache)
    assert proc.returncode == 0, proc.stderr
    table = pq.read_table(out)
    assert table.column("image_id").to_pylist()[:2] == ["hf/0", "hf/1"]
    assert_same_results(table, folder_run, ids=False)


def test_shards_split_by_tar_and_merge_to_the_same_output(data, tiny_checkpoint, cache, tar_run, tmp_path):
    _, tars, _ = data
    out, count = tmp_path / "sharded.parquet", 3  # 4 tars over 3 shards: shard 0 does tars 0 and 3
    per_tar = {f"{s:05d}": 0 for s in range(SHARDS)}
    for row in tar_run.select(["image_id"]).to_pylist():
        per_tar[row["image_id"].split("/")[0]] += 1
    for index in range(count):
        proc = tagclip(*args_for(str(tars), out, tiny_checkpoint, "--shard", f"{index}/{count}"), cache=cache)
        assert proc.returncode == 0, proc.stderr
        parts = (tmp_path / "sharded.parquet.parts").glob("part-*.parquet")
        done: dict[str, int] = {}
        for part in parts:
            for image_id in pq.read_table(part, columns=["image_id"]).column(0).to_pylist():
                done[image_id.split("/")[0]] = done.get(image_id.split("/")[0], 0) + 1
        # whole tars only, exactly those of the shards run so far
        assert done == {name: n for s, (name, n) in enumerate(per_tar.items()) if s % count <= index}
    merged = tagclip("merge", str(out), cache=cache)
    assert merged.returncode == 0, merged.stderr
    assert_same_results(pq.read_table(out), tar_run)


def test_sigkill_mid_shard_then_rerun_resumes_from_the_last_part(data, tiny_checkpoint, cache, tar_run, tmp_path):
    _, tars, _ = data
    out = tmp_path / "killed.parquet"
    parts = tmp_path / "killed.parquet.parts"
    args = args_for(str(tars), out, tiny_checkpoint, "--part-size", "3")
    assert kill_after_first_part(args, env_for(cache), parts) == -signal.SIGKILL and not out.exists()
    written = sum(pq.read_metadata(p).num_rows for p in parts.glob("part-*.parquet"))
    assert 0 < written < N_IMAGES
    rerun = tagclip(*args, cache=cache)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{N_IMAGES - written} done, {written} skipped (already done)" in rerun.stderr
    assert_same_results(pq.read_table(out), tar_run)
    again = tagclip(*args, cache=cache)  # finished: nothing is redone
    assert "already complete" in again.stderr and f"0 done, {N_IMAGES} skipped" in again.stderr


def test_segment_reads_tars(data, tiny_checkpoint, cache, tmp_path):
    _, tars, _ = data
    out, pngs = tmp_path / "masks.json", tmp_path / "png"
    proc = tagclip(*args_for(str(tars / "00001.tar"), out, tiny_checkpoint, "--png-dir", str(pngs),
                             command="segment"), cache=cache)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text())
    assert len(doc["images"]) == 7 and (pngs / "00001" / "0010000.png").is_file()


def test_bad_inputs_one_line_each(data, tiny_checkpoint, cache, tmp_path):
    root, tars, _ = data
    import pyarrow as pa

    pq.write_table(pa.table({"url": ["http://x/a.jpg"], "caption": ["a"]}), tmp_path / "meta.parquet")
    cut = tmp_path / "cut" / "00000.tar"
    cut.parent.mkdir()
    full = (tars / "00000.tar").read_bytes()
    cut.write_bytes(full[: len(full) * 2 // 3])
    cases = [
        (args_for(str(tmp_path / "meta.parquet"), tmp_path / "a.parquet", tiny_checkpoint), 2,
         "meta.parquet: no 'image' or 'jpg' column; its columns are: url, caption"),
        (args_for(str(tmp_path / "none-{0..3}.tar"), tmp_path / "b.parquet", tiny_checkpoint), 2,
         "cannot read tar shard"),
        (args_for(str(cut), tmp_path / "c.parquet", tiny_checkpoint), 1, "truncated"),
    ]
    for args, code, message in cases:
        proc = tagclip(*args, cache=cache)
        assert proc.returncode == code, proc.stderr
        assert message in proc.stderr and "Traceback" not in proc.stderr
        if code == 2:
            assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    table = pq.read_table(tmp_path / "c.parquet")
    failed = [r for r in table.to_pylist() if r["status"] == "failed"]
    assert failed and all(str(cut) in r["error"] for r in failed)
    assert table.num_rows - len(failed) >= 1  # the samples before the cut have results


def test_s3_run_matches_local_and_never_shows_the_secret(data, tiny_checkpoint, cache, tar_run, tmp_path):
    _, tars, _ = data
    out = tmp_path / "s3.parquet"
    with moto_s3() as endpoint:
        fs = s3fs_client()
        fs.mkdir("wds")
        fs.put(str(tars) + "/", "wds/shards/", recursive=True)
        proc = tagclip(*args_for("s3://wds/shards/{00000..00003}.tar", out, tiny_checkpoint, "--workers", "2",
                                 "--verbose"), cache=cache, env=s3_env(endpoint))
        missing = tagclip(*args_for("s3://no-bucket/shards/", tmp_path / "x.parquet", tiny_checkpoint),
                          cache=cache, env=s3_env(endpoint))
    assert proc.returncode == 0, proc.stderr
    table = pq.read_table(out)
    assert table.column("path").to_pylist()[0] == "tar://0000000.png::s3://wds/shards/00000.tar"
    assert_same_results(table, tar_run)
    assert missing.returncode == 2 and "s3://no-bucket/shards/" in missing.stderr
    assert "Traceback" not in missing.stderr and len(missing.stderr.strip().splitlines()) == 1
    for text in (proc.stdout, proc.stderr, missing.stdout, missing.stderr, json.dumps(table.schema.metadata[b"tagclip"]
                                                                                     .decode())):
        assert SECRET not in text
    assert SECRET.encode() not in out.read_bytes()


# ---- damaged shards: every sample a row, exit 1, no traceback, resume gives the same rows -------------

@pytest.fixture(scope="module")
def damaged_shards(tmp_path_factory):
    """A folder of four damaged shards of 4 samples each (`<k>.png` + `<k>.json`): 0 cut inside the
    json of sample 1, 1 a bad header checksum at sample 1's image, 2 an 8 GiB size at sample 2's
    image, 3 links (sample 1 a hard link to sample 0's image, sample 2 a symbolic link outside)."""
    root = tmp_path_factory.mktemp("damaged")
    images = noise_images(16, seed=12, sizes=((64, 48), (48, 64)))
    outside = tmp_path_factory.mktemp("elsewhere") / "outside.png"
    outside.write_bytes(encode(images[0]))
    for s in range(3):
        members = []
        for k in range(4):
            members += [(f"{k}.png", encode(images[s * 4 + k])), (f"{k}.json", b'{"caption": "noise damaged"}')]
        path = write_tar(root / f"{s:05d}.tar", members)
        data, layout = path.read_bytes(), {name: (h, d) for name, h, d in tar_layout(path)}
        if s == 0:
            data = data[:layout["1.json"][1] + 5]
        elif s == 1:
            data = rewrite_header(data, layout["1.png"][0], checksum=False)
        else:
            data = rewrite_header(data, layout["2.png"][0], size=8 << 30)
        path.write_bytes(data)
    with tarfile.open(root / "00003.tar", "w") as tar:
        add_member(tar, "0.png", encode(images[12]))
        link_member(tar, "1.png", "0.png", hard=True)
        link_member(tar, "2.png", str(outside), hard=False)
        add_member(tar, "3.png", encode(images[15]))
    return root


def damaged_rows(table) -> dict[str, tuple[str, str | None]]:
    return {r["image_id"]: (r["status"], r["error"]) for r in table.select(["image_id", "status", "error"]).to_pylist()}


@pytest.fixture(scope="module")
def damaged_run(damaged_shards, tiny_checkpoint, cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("damaged_run") / "d.parquet"
    proc = tagclip(*args_for(str(damaged_shards), out, tiny_checkpoint), cache=cache)
    return proc, pq.read_table(out)


def test_damaged_shards_give_a_row_per_sample_and_exit_1(damaged_shards, damaged_run):
    proc, table = damaged_run
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    rows = damaged_rows(table)
    ok = sorted(i for i, (status, _) in rows.items() if status == "ok")
    assert ok == ["00000/0", "00000/1", "00001/0", "00001/2", "00001/3", "00002/0", "00002/1", "00002/3",
                  "00003/0", "00003/1", "00003/3"]
    failed = {i: e for i, (status, e) in rows.items() if status == "failed"}
    root = damaged_shards
    assert failed["00000/<unreadable>"].startswith(f"truncated tar shard {root / '00000.tar'}: the file ends at byte ")
    assert failed["00001/1"] == f"no image in this sample of {root / '00001.tar'} (1.json)"
    assert failed["00001/<unreadable>"].startswith(f"damaged tar shard {root / '00001.tar'}: a header with a bad "
                                                   "checksum at byte ")
    assert failed["00002/2"].startswith(f"damaged tar shard {root / '00002.tar'}: 2.png declares 8589934592 bytes")
    assert "at byte" in failed["00002/<unreadable>"]
    assert failed["00003/2"].startswith("2.png is a symbolic link to /") and failed["00003/2"].endswith(
        "outside.png, outside the tar shard (not read)")
    assert len(failed) == 6
    for shard in ("00000", "00001", "00002"):  # each shard's damage is a warning too
        assert f"WARNING  {'truncated' if shard == '00000' else 'damaged'} tar shard" in proc.stderr
        assert f"{shard}.tar" in proc.stderr
    assert "11 done, 0 skipped (already done), 6 failed" in proc.stderr


def test_sigkill_on_damaged_shards_then_resume_gives_the_same_rows(damaged_shards, damaged_run, tiny_checkpoint,
                                                                  cache, tmp_path):
    _, reference = damaged_run
    out, parts = tmp_path / "killed.parquet", tmp_path / "killed.parquet.parts"
    args = args_for(str(damaged_shards), out, tiny_checkpoint, "--part-size", "3")
    assert kill_after_first_part(args, env_for(cache), parts) == -signal.SIGKILL and not out.exists()
    rerun = tagclip(*args, cache=cache)
    assert rerun.returncode == 1 and "Traceback" not in rerun.stderr
    table = pq.read_table(out)
    assert damaged_rows(table) == damaged_rows(reference)
    ok = [r["status"] == "ok" for r in table.select(["status"]).to_pylist()]
    assert table.column("index").to_pylist() == reference.column("index").to_pylist()
    assert table.column("tags").to_pylist() == reference.column("tags").to_pylist()
    got, want = (np.array([s for s, good in zip(t.column("scores").to_pylist(), ok, strict=True) if good],
                          dtype=np.float64) for t in (table, reference))
    assert got.shape == (11, want.shape[1])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)  # failed rows have no scores


def test_compressed_shards_are_refused_in_one_line(damaged_shards, tiny_checkpoint, cache, tmp_path):
    import gzip

    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "a.tar").write_bytes((damaged_shards / "00003.tar").read_bytes())
    (folder / "b.tar.gz").write_bytes(gzip.compress((damaged_shards / "00003.tar").read_bytes()))
    for given in (folder, folder / "b.tar.gz"):
        proc = tagclip(*args_for(str(given), tmp_path / "x.parquet", tiny_checkpoint), cache=cache)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert proc.stderr.strip() == (f"error: {folder / 'b.tar.gz'}: compressed tar shards are not supported; "
                                       "decompress them to .tar first (gunzip, bunzip2, unxz or unzstd)")
    assert not (tmp_path / "x.parquet").exists()
