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

Used by sources.list_tars; the scan result is (samples, problem): one TarSample per sample (a
failed one carries its reason) and one line describing what was lost, or None.
"""

from __future__ import annotations

import posixpath
import tarfile
import zlib
from collections.abc import Sequence
from typing import NamedTuple

BLOCK = tarfile.BLOCKSIZE
READ_AHEAD = 1 << 14  # bytes read at a header: the next headers too when members are small
SEARCH_CHUNK = 1 << 20  # bytes read at a time while looking for the next valid header
LINK_HOPS = 8  # links followed before a chain counts as a loop
SHOWN_DAMAGE = 3  # damaged regions described in the shard's line (the rest counted)
NUMERIC_FIELDS = ((100, 108), (108, 116), (116, 124), (136, 148), (329, 337), (337, 345))  # mode .. devminor
COMPRESSED = ((b"\x1f\x8b", "gzip"), (b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"), (b"\x28\xb5\x2f\xfd", "zstd"))


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


class _Cursor:
    """What `TarInfo.fromtarfile` reads from a TarFile: the file, the next header's offset (it sets
    it), the name encoding and the global pax headers (as tarfile.open's defaults)."""

    def __init__(self, fileobj) -> None:
        self.fileobj = fileobj
        self.offset = 0
        self.encoding = tarfile.ENCODING
        self.errors = "surrogateescape"
        self.pax_headers: dict = {}
        self.checked = b""  # the last plain header's other numeric fields, known to parse
        self.ahead, self.ahead_at = b"", -1  # bytes read ahead (small members: many headers per read)

    def block(self, pos: int) -> bytes:
        """The 512 bytes at pos, from the read-ahead when they are in it."""
        at = pos - self.ahead_at
        if self.ahead_at < 0 or at < 0 or at + BLOCK > len(self.ahead):
            self.fileobj.seek(pos)
            self.ahead, self.ahead_at, at = self.fileobj.read(READ_AHEAD), pos, 0
        return self.ahead[at:at + BLOCK]


class _Samples:
    """Members in file order -> samples: consecutive members with one key are one sample (a name
    seen again in it starts a new one), its image the first member with an image extension."""

    def __init__(self, shard: str, extensions: tuple[str, ...]) -> None:
        self.shard, self.extensions = shard, extensions
        self.samples: list[TarSample] = []
        self.key: str | None = None
        self.members: list[str] = []
        self.image: tuple | None = None  # (member, offset, size) or (member, "link", target) / ("error", reason)
        self.regular: dict[str, tuple[int, int]] = {}  # member name -> (data offset, size): link targets
        self.linked: dict[str, str] = {}  # link member name -> target name (for chains)
        self.pending: list[int] = []  # samples whose image is a link, resolved at the end

    def add(self, name: str, image: tuple | None) -> None:
        key, ext = _sample_key(name)
        if key != self.key or name in self.members:  # a new sample (or the same key again)
            self.close()
            self.key, self.members, self.image = key, [], None
        self.members.append(name)
        if self.image is None and image is not None and ext and \
                "." + ext[ext.rfind(".") + 1:].lower() in self.extensions:
            self.image = (name, *image)

    def close(self) -> None:
        if self.key is None:
            return
        key, image, self.key = self.key, self.image, None
        if image is None:
            shown = ", ".join(self.members[:4]) + (", ..." if len(self.members) > 4 else "")
            self.samples.append(TarSample(key, None, error=f"no image in this sample of {self.shard} ({shown})"))
        elif image[1] == "error":
            self.samples.append(TarSample(key, image[0], error=image[2]))
        elif image[1] == "link":  # the target's name until resolve_links
            self.pending.append(len(self.samples))
            self.samples.append(TarSample(key, image[0], error=image[2]))
        else:
            self.samples.append(TarSample(key, *image))

    def resolve_links(self) -> None:
        """Each link sample gets its target's data, or the reason it has none."""
        normal: dict[str, tuple[int, int]] | None = None
        for at in self.pending:
            sample = self.samples[at]
            target, found = sample.error, None
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
                reason = (f"link {sample.member} -> {sample.error}: "
                          f"{'a chain of links too long' if target in self.linked else 'no such regular member'} "
                          f"in {self.shard}")
                self.samples[at] = TarSample(sample.key, sample.member, error=reason)
            else:
                self.samples[at] = TarSample(sample.key, sample.member, *found)


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


def scan_tar(fileobj, size: int | None, shard: str, extensions: Sequence[str]) -> tuple[list[TarSample], str | None]:
    """The samples of one tar (in file order, grouped by key as WebDataset does), walking the
    headers only. size: the file's size (None if unknown); extensions: those of image members.
    Returns (samples, problem): problem is one line saying what was lost and where (None for a
    sound shard); the samples read around any damage are kept."""
    samples, damage, cursor = _Samples(shard, tuple(e.lower() for e in extensions)), _Damage(shard), _Cursor(fileobj)
    pos = 0
    while pos is not None:
        pos = _step(cursor, pos, size, samples, damage)
    samples.close()
    samples.resolve_links()
    return samples.samples, damage.line()


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
    """Read the member whose header is at pos; the next header's offset, or None at the end."""
    fileobj = cursor.fileobj
    try:
        plain = _plain_member(cursor.block(pos), cursor)
    except OSError:
        plain = None  # tarfile's reading below reports it
    if plain is not None and (size is None or pos + BLOCK + plain[1] <= size):
        name, length = plain
        data = pos + BLOCK
        samples.regular[name] = (data, length)
        samples.add(name, (data, length))
        return data + -(-length // BLOCK) * BLOCK
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
