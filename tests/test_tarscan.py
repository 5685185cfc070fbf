"""The tar header walk (tarscan.py): the many-headers-at-a-time path reads exactly what tarfile's
parser reads, on header forms other tar writers use, around links, pax records, long names and
damage, whatever the read spans; and its reads fetch the headers of large members, not their data."""

from __future__ import annotations

import io
import tarfile

import pytest
from shard_fixtures import rewrite_header

from tagclip_cli import tarscan
from tagclip_cli.sourcebase import IMAGE_EXTENSIONS


def _add(tar: tarfile.TarFile, name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    info.size = len(data) if kind in (tarfile.REGTYPE, tarfile.AREGTYPE) else 0
    tar.addfile(info, io.BytesIO(data) if info.size else None)


def _field(data: bytes, header: int, at: int, value: bytes) -> bytes:
    """data with bytes at..at+len(value) of the header at `header` replaced, the checksum redone."""
    block = bytearray(data[header:header + 512])
    block[at:at + len(value)] = value
    return rewrite_header(data[:header] + bytes(block) + data[header + 512:], header)


def varied_tar() -> bytes:
    """A tar whose members take every turn of the walk: plain runs, samples with several members,
    a name repeated in a sample, folders with dots, "//", upper-case and empty extensions, empty
    members, a prefix (ustar long name), a GNU long name, a pax record, links, a directory, an
    old-style regular type, non-UTF-8 and non-ASCII names, and numeric fields written as other
    tar programs write them."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for i in range(6):
            _add(tar, f"{i:04d}.jpg", bytes([i]) * (100 + 300 * i))
            _add(tar, f"{i:04d}.json", b"{}")
        _add(tar, "0006.jpg", b"a")
        _add(tar, "0006.txt", b"b")
        _add(tar, "0006.jpg", b"c")  # the same name again: a new sample
        _add(tar, "d.v/0007.seg.png", b"x" * 700)
        _add(tar, "d.v/0007x.PNG", b"y" * 10)  # an image by its upper-case extension
        _add(tar, "a//0008.jpg", b"z")
        _add(tar, "0009.", b"")
        _add(tar, "0009.txt", b"only text")
        _add(tar, "p" * 60 + "/" + "q" * 70 + "/0010.webp", b"w" * 1100)  # ustar prefix
        _add(tar, "r" * 120 + "/0011.jpg", b"v" * 5)  # a GNU long name
        _add(tar, "/".join(["s" * 99] * 27) + "/0011.png", b"l" * 7)  # one longer than the tiny reads
        _add(tar, "0012.jpg", kind=tarfile.LNKTYPE, link="0001.jpg")
        _add(tar, "0013.jpg", kind=tarfile.SYMTYPE, link="../outside.jpg")
        _add(tar, "dir", kind=tarfile.DIRTYPE)
        _add(tar, "0014.png", b"old", kind=tarfile.AREGTYPE)
        _add(tar, "caf\u00e9/0015.jpg", b"u" * 2000)
        _add(tar, "0016.jpg", b"t" * 3)
        for i in range(17, 40):
            _add(tar, f"{i:04d}.jpg", b"s" * (37 * i))
            _add(tar, f"{i:04d}.cls", b"1")
    data = buffer.getvalue()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        offsets = {m.name: m.offset for m in tar.getmembers()}
        end = tar.offset  # after the last member
    data = _field(data, offsets["0001.jpg"], 100, b"000644 \0")  # libarchive's mode
    data = _field(data, offsets["0001.json"], 124, b"%011o " % 2)  # a size ended by a space
    data = _field(data, offsets["0002.jpg"], 136, b"\0" * 12)  # no mtime
    data = _field(data, offsets["0002.json"], 108, b"   1750\0")  # a uid padded with spaces
    data = _field(data, offsets["0003.jpg"], 329, b"\0" * 16)  # no device numbers
    data = _field(data, offsets["0016.jpg"], 0, b"0016\xff.jpg\0")  # a name that is not UTF-8
    pax = io.BytesIO()
    with tarfile.open(fileobj=pax, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("0040.jpg")
        info.size, info.mtime = 4, 1.5  # a float mtime: a pax record
        tar.addfile(info, io.BytesIO(b"pax!"))
    return data[:end] + pax.getvalue()  # then the pax member and its end marker


def _scan(blob: bytes, path=None):
    if path is not None:
        path.write_bytes(blob)
        with open(path, "rb") as fh:  # read by its descriptor
            return tarscan.scan_tar(fh, len(blob), "t.tar", IMAGE_EXTENSIONS)
    return tarscan.scan_tar(io.BytesIO(blob), len(blob), "t.tar", IMAGE_EXTENSIONS)


def _variants(data: bytes) -> list[bytes]:
    """The tar, cut at many places, and with a header's checksum or size broken at several members."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        headers = [m.offset for m in tar.getmembers()]
    out = [data] + [data[:cut] for cut in range(0, len(data), 1531)]
    out += [rewrite_header(data, h, checksum=False) for h in headers[::5]]
    out += [rewrite_header(data, h, size=1 << 40) for h in headers[2::7]]
    out += [data[:h] + b"\0" * 512 + data[h + 512:] for h in headers[3::9]]
    return out


@pytest.mark.parametrize("spans", ["default", "tiny"])
def test_the_header_run_reads_what_tarfile_reads(spans, monkeypatch, tmp_path):
    if spans == "tiny":  # reads of 1-4 blocks: headers and runs cut at every buffer end
        for name, value in (("FIRST_SPAN", 512), ("MIN_SPAN", 512), ("MAX_SPAN", 2048), ("SKIP_GAP", 1024)):
            monkeypatch.setattr(tarscan, name, value)
    variants = _variants(varied_tar())
    fast = [_scan(blob) for blob in variants]
    by_descriptor = [_scan(blob, tmp_path / "t.tar") for blob in variants[:12]]
    monkeypatch.setattr(tarscan, "_plain_member", lambda block, cursor: None)  # tarfile for every header
    slow = [_scan(blob) for blob in variants]
    assert fast == slow
    assert by_descriptor == slow[:12]
    samples, problem = fast[0]
    assert problem is None
    keys = [s.key for s in samples]
    assert keys[:8] == ["0000", "0001", "0002", "0003", "0004", "0005", "0006", "0006"]
    assert "d.v/0007" in keys and "p" * 60 + "/" + "q" * 70 + "/0010" in keys and "0040" in keys
    assert sum(s.error is None for s in samples) > 30


def test_the_run_takes_the_usual_headers_and_leaves_the_rest_to_tarfile(monkeypatch):
    data = varied_tar()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = tar.getmembers()
    slow_calls = []
    parse = tarfile.TarInfo.fromtarfile.__func__

    def counted(cls, cursor):
        slow_calls.append(cursor.fileobj.tell())
        return parse(cls, cursor)

    monkeypatch.setattr(tarfile.TarInfo, "fromtarfile", classmethod(counted))
    _scan(data)
    assert 0 < len(slow_calls) < 20 < len(members)  # links, pax, long names, odd fields: not the plain ones
    plain = {m.offset for m in members if m.name.endswith((".json", ".cls")) and m.offset > members[30].offset}
    assert not plain & set(slow_calls)


def _shard(samples: int, size: int) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(samples):
            _add(tar, f"{i:06d}.jpg", bytes([i % 251]) * size)
            _add(tar, f"{i:06d}.txt", b"a caption")
    return buffer.getvalue()


def test_reads_step_over_large_members_and_read_small_ones_through(tmp_path):
    large, small = _shard(40, 200_000), _shard(2000, 700)
    for blob, name in ((large, "large.tar"), (small, "small.tar")):
        (tmp_path / name).write_bytes(blob)
    with open(tmp_path / "large.tar", "rb") as fh:
        got = tarscan.scan_columns(fh, len(large), "large.tar", IMAGE_EXTENSIONS)
    assert len(got.keys) == 40 and not got.errors
    assert got.fetched < len(large) // 20 and got.reads <= 42  # one small read per sample
    with open(tmp_path / "small.tar", "rb") as fh:
        got = tarscan.scan_columns(fh, len(small), "small.tar", IMAGE_EXTENSIONS)
    assert len(got.keys) == 2000 and not got.errors
    assert got.reads <= 8 and got.fetched <= 1.1 * len(small)  # read through, in growing reads
