"""Walking the headers of one tar shard into WebDataset samples, stepping over damage as GNU tar does.

The scanner reads headers only (512-byte blocks; the data of each member is sought over) with the
standard library's header parser (`tarfile.TarInfo.fromtarfile`: ustar, GNU long names, pax). What
it finds besides the samples:
- a header whose checksum does not verify, or that declares a negative size, a member whose data
  runs past the end of the file (a cut, or a size field damaged beyond belief): the scanner looks
  for the next 512-byte block that is a valid header (its checksum verifies) and reads on from
  there; the skipped bytes are reported (byte offsets, cause);
- a file that ends inside a member or a header, or without the end-of-archive marker: reported;
- hard and symbolic links: read from the regular member they name in the same shard; a link to
  an absolute path, out of the shard (`../`), or to nothing in it is a failed sample. Nothing
  outside the shard is ever opened.

Reading: `_Reader` fetches a span of bytes at a header (a local `pread`, or one ranged request of a
remote file opened without a cache) and serves the headers inside it; the span grows while the
walk steps over little data between headers and shrinks to what was used when it jumps over a large
member, so a shard of large members costs about one small request per sample and one of small
members a few large reads. The usual header (ustar or GNU, type "0", octal fields, no prefix) is
parsed by one regular expression and a checksum, many headers per call (`_plain_run`).

Used by shardsources.list_tars; the scan result is (samples, problem): one TarSample per sample (a
failed one carries its reason) and one line describing what was lost, or None. `scan_columns`
gives the same samples as columns.
"""

from __future__ import annotations

import io
import os
import posixpath
import re
import stat
import tarfile
import zlib
from collections.abc import Sequence
from typing import NamedTuple

BLOCK = tarfile.BLOCKSIZE
FIRST_SPAN = 1 << 16  # bytes read at the first header
MIN_SPAN = 1 << 12  # the smallest read: a header, a small member beside it and the next header
MAX_SPAN = 1 << 22  # the largest read while the members are small
SKIP_GAP = 1 << 16  # member data at least this long is stepped over (a new read), shorter is read through
SEARCH_CHUNK = 1 << 20  # bytes read at a time while looking for the next valid header
END = 1 << 62  # the limit of a file of unknown size
LINK_HOPS = 8  # links followed before a chain counts as a loop
SHOWN_DAMAGE = 3  # damaged regions described in the shard's line (the rest counted)
NUMERIC_FIELDS = ((100, 108), (108, 116), (116, 124), (136, 148), (329, 337), (337, 345))  # mode .. devminor
COMPRESSED = ((b"\x1f\x8b", "gzip"), (b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"), (b"\x28\xb5\x2f\xfd", "zstd"))
_F8 = rb"(?:[0-7]{7}[ \0]|[0-7]{6} [ \0]|\0{8})"  # an 8-byte number field in the forms tar writers use
_F12 = rb"(?:[0-7]{11}[ \0]|[0-7]{10} [ \0]|\0{12})"
# Bytes 0..345 of the usual header: a name (captured up to its NUL), mode, uid,
# gid, the size (captured), mtime, a checksum of 6 digits, NUL, space (captured), type "0" or NUL,
# link name, magic, owner names (any bytes), devmajor, devminor and an empty prefix. What it accepts,
# tarfile reads the same way; anything else goes to the slower parsers.
_PLAIN = re.compile(rb"(?=([^\0]{1,100})).{100}" + _F8 * 3 + rb"([0-7]{11})[ \0]" + _F12
                    + rb"([0-7]{6})\0 [0\0].{172}" + _F8 * 2 + rb"\0", re.DOTALL)


def _digit_sums() -> bytes:
    """The sum of the octal digits of each number below 8**6 (index -> sum), built by concatenation."""
    table = bytes(range(8))
    for _ in range(5):
        table = b"".join(table.translate(bytes((x + d) & 0xFF for x in range(256))) for d in range(8))
    return table


_DIGIT_SUM = _digit_sums()  # 256 KB


class TarSample(NamedTuple):
    """One sample found in a tar: its key and the image member (None: the sample has no image).
    A named tuple: a shard's thousands are made in a few microseconds each."""

    key: str
    member: str | None
    offset: int = 0
    size: int = 0
    error: str | None = None  # why it cannot be read (truncated shard, no image member, bad link)


def _sample_key(name: str) -> tuple[str, str]:
    """(key, extension) as WebDataset splits a member name: the key is the path up to the first
    dot of the base name (`a/b/000012.seg.png` -> `a/b/000012`, `seg.png`)."""
    cut = name.rfind("/") + 1
    if "//" in name or name.endswith("/"):  # posixpath's rules for repeated slashes
        folder, base = posixpath.split(name)
        stem, dot, ext = base.partition(".")
        return (posixpath.join(folder, stem) if folder else stem), ext if dot else ""
    stem, dot, ext = name[cut:].partition(".")
    return name[:cut] + stem, ext if dot else ""


class _Reader:
    """The tar's bytes for the walk, file-like for tarfile's parser (seek, tell, read): a read at
    a position outside the buffer fetches `span` bytes there (one pread or one ranged request), and
    the span adapts (see the module docstring). reads / fetched: requests made and bytes received."""

    def __init__(self, fileobj) -> None:
        self.fileobj, self.fd = fileobj, _regular_fd(fileobj)
        self.buf, self.at, self.used, self.pos = b"", 0, 0, 0
        self.big = -1  # the end of the header of the buffer's first member of SKIP_GAP bytes or more
        self.span = FIRST_SPAN
        self.reads = self.fetched = 0

    def _fetch(self, pos: int, need: int) -> None:
        if self.buf:  # the next span: what the last read served up to the first large member
            if self.big >= 0:
                self.span = max(MIN_SPAN, 1 << (self.big - self.at - 1).bit_length())
            elif pos - (self.at + len(self.buf)) < SKIP_GAP:  # only small members: read through, more at a time
                self.span = min(2 * self.span, MAX_SPAN)
            else:
                self.span = max(MIN_SPAN, 1 << max(0, self.used - self.at - 1).bit_length())
        self.buf = self._raw(pos, max(self.span, need))
        self.at = self.used = pos
        self.big = -1

    def _raw(self, pos: int, length: int) -> bytes:
        if self.fd is not None:
            data = os.pread(self.fd, length, pos)
        else:
            self.fileobj.seek(pos)
            data = self.fileobj.read(length)
        self.reads, self.fetched = self.reads + 1, self.fetched + len(data)
        return data

    def block(self, pos: int) -> bytes:
        """The 512 bytes at pos (fewer at the end of the file)."""
        at = pos - self.at
        if at < 0 or at + BLOCK > len(self.buf):
            self._fetch(pos, BLOCK)
            at = 0
        self.used = max(self.used, pos + BLOCK)
        return self.buf[at:at + BLOCK]

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        self.pos = pos if whence == io.SEEK_SET else self.pos + pos
        return self.pos

    def tell(self) -> int:
        return self.pos

    def read(self, length: int = -1) -> bytes:
        pos, at = self.pos, self.pos - self.at
        if length is None or length < 0 or length > MAX_SPAN:  # rare (big pax / long-name records): as asked
            if length is None or length < 0:
                self.fileobj.seek(pos)
                data = self.fileobj.read()
            else:
                data = self._raw(pos, length)
        else:
            if at < 0 or at + length > len(self.buf):
                self._fetch(pos, length)
                at = 0
            data = self.buf[at:at + length]
            self.used = max(self.used, pos + len(data))
        self.pos += len(data)
        return data


def _regular_fd(fileobj) -> int | None:
    """The descriptor of a local regular file (read with pread), else None."""
    try:
        fd = fileobj.fileno()
        return fd if stat.S_ISREG(os.fstat(fd).st_mode) else None
    except (AttributeError, OSError, ValueError):  # BytesIO, remote files: no descriptor
        return None


class _Cursor:
    """What `TarInfo.fromtarfile` reads from a TarFile: the file (a `_Reader`), the next header's
    offset (it sets it), the name encoding and the global pax headers (as tarfile.open's defaults)."""

    def __init__(self, reader: _Reader) -> None:
        self.fileobj = reader
        self.offset = 0
        self.encoding = tarfile.ENCODING
        self.errors = "surrogateescape"
        self.pax_headers: dict = {}
        self.checked = b""  # the last plain header's other numeric fields, known to parse


class _Samples:
    """Members in file order -> samples: consecutive members with one key are one sample (a name
    seen again in it starts a new one), its image the first member with an image extension. The
    samples are kept as columns: keys, image members (None: no image), data offsets and sizes, and
    the reasons of the failed ones by sample number."""

    def __init__(self, shard: str, extensions: tuple[str, ...]) -> None:
        self.shard, self.extensions = shard, extensions
        self.keys: list[str] = []
        self.places: list[tuple] = []  # per sample: (image member or None, data offset, size)
        self.errors: dict[int, str] = {}
        self.kinds: dict[str, bool] = {}  # extension (after the key) -> whether it is an image's
        self.key: str | None = None  # the open sample: its key, member names and image
        self.names: list[str] = []
        self.image: tuple | None = None  # (member, offset, size) or (member, "link", target) / ("error", reason)
        self.regular: dict[str, tuple[int, int]] = {}  # member name -> (data offset, size): link targets
        self.linked: dict[str, str] = {}  # link member name -> target name (for chains)
        self.pending: list[int] = []  # samples whose image is a link, resolved at the end

    def add(self, name: str, image: tuple | None) -> None:
        key, ext = _sample_key(name)
        if key != self.key or name in self.names:  # a new sample (or the same key again)
            self.close()
            self.key, self.names, self.image = key, [], None
        self.names.append(name)
        if self.image is None and image is not None and ext and \
                "." + ext[ext.rfind(".") + 1:].lower() in self.extensions:
            self.image = (name, *image)

    def close(self) -> None:
        if self.key is None:
            return
        key, image, self.key = self.key, self.image, None
        at = len(self.keys)
        self.keys.append(key)
        if image is None:
            shown = ", ".join(self.names[:4]) + (", ..." if len(self.names) > 4 else "")
            self.errors[at] = f"no image in this sample of {self.shard} ({shown})"
            image = (None, 0, 0)
        elif image[1] == "error" or image[1] == "link":  # a link: the target's name until resolve_links
            if image[1] == "link":
                self.pending.append(at)
            self.errors[at] = image[2]
            image = (image[0], 0, 0)
        self.places.append(image)

    def resolve_links(self) -> None:
        """Each link sample gets its target's data, or the reason it has none."""
        normal: dict[str, tuple[int, int]] | None = None
        for at in self.pending:
            member, target, found = self.places[at][0], self.errors[at], None
            for _ in range(LINK_HOPS):
                found = self.regular.get(target)
                if found is None:
                    if normal is None:
                        normal = {posixpath.normpath(k): v for k, v in self.regular.items()}
                    found = normal.get(target)
                if found is not None or target not in self.linked:
                    break
                target = self.linked[target]
            if found is None:
                why = "a chain of links too long" if target in self.linked else "no such regular member"
                self.errors[at] = f"link {member} -> {self.errors[at]}: {why} in {self.shard}"
            else:
                del self.errors[at]
                self.places[at] = (member, *found)

    def tar_samples(self) -> list[TarSample]:
        pairs = enumerate(zip(self.keys, self.places, strict=True))
        return [TarSample(key, *place, self.errors.get(at)) for at, (key, place) in pairs]

    def columns(self) -> tuple[list, list, list]:
        """The image members, data offsets and sizes as three lists."""
        if not self.places:
            return [], [], []
        members, offsets, sizes = zip(*self.places, strict=True)
        return list(members), list(offsets), list(sizes)


def _link_target(info: tarfile.TarInfo) -> tuple[str, str]:
    """("link", target member name) for a link inside the shard, else ("error", reason)."""
    kind = "hard link" if info.islnk() else "symbolic link"
    name = info.linkname
    if info.issym() and not name.startswith("/"):
        name = posixpath.join(posixpath.dirname(info.name), name)
    target = posixpath.normpath(name) if name else ""
    if not target or target.startswith("/") or target == ".." or target.startswith("../"):
        return "error", f"{info.name} is a {kind} to {info.linkname or 'nothing'}, outside the tar shard (not read)"
    return "link", target


def _member_image(info: tarfile.TarInfo, samples: _Samples) -> tuple | None:
    """Where a member's bytes are, for the sample grouping: (offset, size), ("link", target),
    ("error", reason), or None for a directory."""
    if info.isreg():
        if info.issparse():
            return "error", f"{info.name} is a sparse member (not supported)"
        samples.regular[info.name] = (info.offset_data, info.size)
        return info.offset_data, info.size
    if info.islnk() or info.issym():
        kind, target = _link_target(info)
        if kind == "link":
            samples.linked[info.name] = target
        return kind, target
    if info.isdir():
        return None
    return "error", f"{info.name} is not a regular file (tar member type {info.type!r})"


def _valid_header(block: bytes) -> bool:
    field = block[148:156].split(b"\0", 1)[0].strip()
    if not field.isdigit():  # fast reject: not an octal checksum field
        return False
    try:
        info = tarfile.TarInfo.frombuf(block, tarfile.ENCODING, "surrogateescape")
    except (tarfile.HeaderError, ValueError):
        return False
    return info.size >= 0


def next_header(fileobj, start: int) -> tuple[int | None, bool]:
    """(offset of the first block at or after start that is a valid header, or None; whether a
    non-zero byte was skipped on the way). start is a multiple of 512."""
    pos, skipped = start, False
    while True:
        fileobj.seek(pos)
        chunk = fileobj.read(SEARCH_CHUNK)
        for at in range(0, len(chunk) - BLOCK + 1, BLOCK):
            block = chunk[at:at + BLOCK]
            if _valid_header(block):
                return pos + at, skipped or bool(chunk[:at].strip(b"\0"))
        if len(chunk) < SEARCH_CHUNK:
            return None, skipped or bool(chunk.strip(b"\0"))
        skipped = skipped or bool(chunk.strip(b"\0"))
        pos += len(chunk)


class _Damage:
    """What a scan lost, as one line: damaged regions stepped over, and where (if) it stopped."""

    def __init__(self, shard: str) -> None:
        self.shard = shard
        self.regions: list[str] = []
        self.end: str | None = None
        self.truncated = False  # the file is cut (rather than damaged inside)

    def skipped(self, where: int, cause: str, resumed: int) -> None:
        self.regions.append(f"{cause} at byte {where} (members lost up to the next valid header, at byte {resumed})")

    def stop(self, text: str, truncated: bool = False) -> None:
        self.end, self.truncated = text, truncated

    def line(self) -> str | None:
        parts = self.regions[:SHOWN_DAMAGE]
        if len(self.regions) > SHOWN_DAMAGE:
            parts.append(f"and {len(self.regions) - SHOWN_DAMAGE} more damaged regions")
        if self.end:
            parts.append(self.end)
        if not parts:
            return None
        kind = "truncated" if self.truncated and not self.regions else "damaged"
        return f"{kind} tar shard {self.shard}: " + "; ".join(parts)


class TarColumns(NamedTuple):
    """A scanned shard as columns, one entry per sample (what `scan_tar` gives as TarSamples):
    keys, image members (None: none), data offsets and sizes, the failed samples' reasons by sample
    number; problem: the shard's line (None: sound); reads / fetched: reads made, bytes read."""

    keys: list[str]
    members: list[str | None]
    offsets: list[int]
    sizes: list[int]
    errors: dict[int, str]
    problem: str | None
    reads: int
    fetched: int


def scan_columns(fileobj, size: int | None, shard: str, extensions: Sequence[str]) -> TarColumns:
    """The samples of one tar (in file order, grouped by key as WebDataset does), walking the
    headers only. fileobj: the open file (seek / read; a local file is read by its descriptor);
    size: the file's size (None if unknown); extensions: those of image members. The samples
    read around any damage are kept; the problem line says what was lost and where."""
    samples, problem, reader = _scan(fileobj, size, shard, extensions)
    return TarColumns(samples.keys, *samples.columns(), samples.errors, problem, reader.reads, reader.fetched)


def scan_tar(fileobj, size: int | None, shard: str, extensions: Sequence[str]) -> tuple[list[TarSample], str | None]:
    """`scan_columns` as (samples, problem): one TarSample per sample, and the shard's line (None
    for a sound shard)."""
    samples, problem, _ = _scan(fileobj, size, shard, extensions)
    return samples.tar_samples(), problem


def _scan(fileobj, size: int | None, shard: str, extensions: Sequence[str]) -> tuple[_Samples, str | None, _Reader]:
    samples, damage, reader = _Samples(shard, tuple(e.lower() for e in extensions)), _Damage(shard), _Reader(fileobj)
    cursor, pos = _Cursor(reader), 0
    while pos is not None:
        pos = _step(cursor, pos, size, samples, damage)
    samples.close()
    samples.resolve_links()
    return samples, damage.line(), reader


def _octal(field: bytes) -> int | None:
    """An octal header field as tarfile reads it (None: base-256, left to tarfile); ValueError if bad."""
    if field[-1] == 0 and field[:-1].isdigit():  # the usual form: zero-padded digits, a NUL
        return int(field[:-1], 8)
    if field[0] in (0o200, 0o377):
        return None
    return int(field.split(b"\0", 1)[0].decode("ascii").strip() or "0", 8)


def _byte_sum(data: bytes) -> int:
    """sum(data) for len(data) <= 257 (the low half of Adler-32 is 1 + the byte sum below 65521)."""
    return (zlib.adler32(data) & 0xFFFF) - 1


def _header_sum(block: bytes) -> int:
    """tarfile's unsigned header checksum: the bytes, with the checksum field read as 8 spaces."""
    return 256 + _byte_sum(block[:148]) + _byte_sum(block[156:400]) + _byte_sum(block[400:])


def _plain_member(block: bytes, cursor: _Cursor) -> tuple[str, int] | None:
    """(name, size) of a plain regular member (type "0" / NUL, octal fields, checksum right),
    parsed as tarfile would; None for anything else (long names, pax, links, damage, the end):
    tarfile's own parser then reads it. The common header costs a few slices, not a TarInfo."""
    if len(block) != BLOCK or block[156:157] not in (b"0", b"\0") or cursor.pax_headers:
        return None
    try:
        size, checksum = _octal(block[124:136]), _octal(block[148:156])
        others = block[100:124] + block[136:148] + block[329:345]
        if others != cursor.checked:  # most members of a shard repeat the last one's mode, owner, time
            for at, end in NUMERIC_FIELDS:  # tarfile refuses a header whose other numbers do not parse
                if block[at] not in (0o200, 0o377):
                    _octal(block[at:end])
            cursor.checked = others
    except ValueError:
        return None
    if size is None or checksum is None:
        return None
    if size < 0 or checksum != _header_sum(block):
        return None
    name = block[:100].split(b"\0", 1)[0].decode(cursor.encoding, cursor.errors)
    prefix = block[345:500].split(b"\0", 1)[0]
    if prefix:
        name = prefix.decode(cursor.encoding, cursor.errors) + "/" + name
    if name.endswith("/"):  # tarfile reads such a member as a directory
        return None
    return name, size


def _step(cursor: _Cursor, pos: int, size: int | None, samples: _Samples, damage: _Damage) -> int | None:
    """Read the member whose header is at pos (and the plain ones after it while their headers are
    in the read buffer); the next header's offset, or None at the end."""
    fileobj = cursor.fileobj
    try:
        plain = _plain_member(fileobj.block(pos), cursor)
    except OSError:
        plain = None  # tarfile's reading below reports it
    if plain is not None and (size is None or pos + BLOCK + plain[1] <= size):
        name, length = plain
        data = pos + BLOCK
        samples.regular[name] = (data, length)
        samples.add(name, (data, length))
        if length >= SKIP_GAP and fileobj.big < 0:
            fileobj.big = data
        return _plain_run(cursor, data + -(-length // BLOCK) * BLOCK, END if size is None else size, samples)
    try:
        fileobj.seek(pos)
        info = tarfile.TarInfo.fromtarfile(cursor)
    except tarfile.EOFHeaderError:  # a zero block: the end-of-archive marker
        return _after_end_marker(fileobj, pos, damage)
    except tarfile.EmptyHeaderError:
        pos = pos if size is None else min(pos, size)  # a cut in the last member's padding
        damage.stop(f"the file ends at byte {pos} without the end-of-archive marker (any members after it are lost)"
                    if pos else "empty file (0 bytes), not a tar", truncated=True)
        return None
    except tarfile.TruncatedHeaderError:
        damage.stop(f"the file ends inside a header at byte {pos} (any members after it are lost)", truncated=True)
        return None
    except (tarfile.TarError, EOFError, ValueError) as exc:  # bad checksum, broken pax / long-name data
        return _resync(fileobj, pos, pos + BLOCK, _cause(fileobj, pos, exc), damage)
    except OSError as exc:
        damage.stop(f"cannot read at byte {pos} ({type(exc).__name__}: {exc}), the rest is not listed")
        return None
    if info.size < 0:
        return _resync(fileobj, pos, pos + BLOCK, f"a header declaring a negative size ({info.size})", damage)
    if size is not None and cursor.offset > info.offset_data and info.offset_data + info.size > size:
        return _cut_member(fileobj, info, size, samples, damage)
    image = _member_image(info, samples)
    if image is not None:
        samples.add(info.name, image)
    return cursor.offset


def _plain_run(cursor: _Cursor, pos: int, limit: int, samples: _Samples) -> int:
    """The plain members from pos on while their headers are in the read buffer, as `_plain_member`
    and `_Samples.add` read them, in a few steps each: `_PLAIN` matches the fields, the checksum
    is checked on two halves of the block (the checksum field's own bytes taken out by its digit
    sum). Returns the offset of the first header it leaves to `_step` (the end of the buffer, or a
    header it does not take: another type, a prefix, damage, a member past limit)."""
    reader = cursor.fileobj
    buf, at = reader.buf, reader.at
    last = at + len(buf) - BLOCK  # the last header offset whose block is in buf
    if cursor.pax_headers or pos > last:
        return pos
    match, adler, digit_sum, regular, exts = _PLAIN.match, zlib.adler32, _DIGIT_SUM, samples.regular, samples.extensions
    encoding, errors = cursor.encoding, cursor.errors
    key, names, image = samples.key, samples.names, samples.image
    keys, places, kinds = samples.keys, samples.places, samples.kinds
    served, big = pos, reader.big
    skip = SKIP_GAP if big < 0 else END  # the first large member is noted for the reader
    while pos <= last:
        o = pos - at
        m = match(buf, o, o + 346)
        if m is None:
            break
        raw, length, checksum = m.groups()
        length, checksum = int(length, 8), int(checksum, 8)
        data = pos + 512
        if data + length > limit or (adler(buf[o:o + 256]) & 0xFFFF) + (adler(buf[o + 256:o + 512]) & 0xFFFF) - 66 \
                != checksum + digit_sum[checksum]:
            break
        if raw[-1] == 47 or b"//" in raw:  # a directory to tarfile; posixpath's key rules (_Samples.add)
            break
        name = raw.decode(encoding, errors)
        if "/" in name:
            dot = name.find(".", name.rfind("/") + 1)
            k, ext = (name, "") if dot < 0 else (name[:dot], name[dot + 1:])
        else:
            k, _, ext = name.partition(".")
        if k != key or name in names:
            if key is not None:
                if image is None or image[1].__class__ is not int:  # a failed or linked image: close()
                    samples.key, samples.names, samples.image = key, names, image
                    samples.close()
                else:
                    keys.append(key)
                    places.append(image)
            key, names, image = k, [name], None
        else:
            names.append(name)
        if image is None and ext:
            is_image = kinds.get(ext)
            if is_image is None:
                is_image = kinds[ext] = "." + ext[ext.rfind(".") + 1:].lower() in exts
            if is_image:
                image = (name, data, length)
        regular[name] = (data, length)
        if length >= skip:
            big, skip = data, END
        served, pos = data, data + ((length + 511) & -512)  # the data in whole blocks
    samples.key, samples.names, samples.image = key, names, image
    reader.used, reader.big = max(reader.used, served), big
    return pos


def _cause(fileobj, pos: int, exc: BaseException) -> str:
    if pos == 0:
        fileobj.seek(0)
        head = fileobj.read(8)
        for magic, name in COMPRESSED:
            if head.startswith(magic):
                return f"{name}-compressed data (compressed tar shards are not supported: decompress it first)"
    text = str(exc) or type(exc).__name__
    return "a header with a bad checksum" if text == "bad checksum" else f"an unreadable header ({text})"


def _resync(fileobj, where: int, start: int, cause: str, damage: _Damage) -> int | None:
    found, _ = next_header(fileobj, start)
    if found is None:
        damage.stop(f"{cause} at byte {where} and no valid header after it (the rest of the file is lost)"
                    if where else f"not a tar file ({cause}; no valid header in it)")
        return None
    damage.skipped(where, cause, found)
    return found


def _cut_member(fileobj, info: tarfile.TarInfo, size: int, samples: _Samples, damage: _Damage) -> int | None:
    """A member whose data runs past the end of the file: its sample fails; a valid header inside
    the claimed data means the size field was damaged (read on from there), else the file is cut."""
    found, _ = next_header(fileobj, info.offset_data)
    if found is None:
        samples.add(info.name, ("error", f"truncated tar shard {samples.shard}: {info.name} is cut off at byte "
                                         f"{size} (it declares {info.size} bytes)"))
        damage.stop(f"the file ends at byte {size} inside {info.name} (header at byte {info.offset}; any members "
                    "after it are lost)", truncated=True)
        return None
    cause = f"{info.name} declares {info.size} bytes, past the end of the file at byte {size}"
    samples.add(info.name, ("error", f"damaged tar shard {samples.shard}: {cause}"))
    damage.skipped(info.offset, f"a damaged size field ({cause})", found)
    return found


def _after_end_marker(fileobj, pos: int, damage: _Damage) -> int | None:
    """At a zero block: the end, unless a valid header follows (zeroed damage or concatenated
    tars): read on from it, reporting the gap as damage if anything but zeros was skipped."""
    found, lost = next_header(fileobj, pos + BLOCK)
    if found is None:
        return None
    if lost:
        damage.skipped(pos, "zero blocks (an end-of-archive marker) amid the members", found)
    return found
