"""Helpers for tests of tar / Parquet / S3 inputs: write WebDataset shards and Parquet files from
images, and a real S3 API on loopback (moto's server) for the remote tests.

Imported as `import shard_fixtures` (pytest puts tests/ on sys.path, see bad_images.py)."""

from __future__ import annotations

import io
import logging
import os
import socket
import tarfile
import threading
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileOpener, LocalFileSystem
from PIL import Image

SECRET = "tagclip-test-secret-9f3b1c"  # the fake AWS secret: must never appear in any output


class _RecordingFile(LocalFileOpener):
    """A local file whose every read is recorded as (offset, length) in its file system's `reads`;
    without a descriptor when the file system says so (tarscan then reads it as a remote file)."""

    def fileno(self):
        if not self.fs.descriptor:
            raise io.UnsupportedOperation("no descriptor here")
        return super().fileno()

    def read(self, *args):
        at = self.tell()
        data = super().read(*args)
        with self.fs.lock:
            self.fs.reads[self.path].append((at, len(data)))
        return data


def recording_filesystem(protocol: str, descriptor: bool = True) -> dict[str, list[tuple[int, int]]]:
    """Register `protocol://`: local files, every read recorded per path as (offset, length) in the
    returned dict (the real fsspec machinery, only the reads noted); descriptor=False: the files
    have no descriptor, so that they are read through `read` as remote ones are."""
    reads: dict[str, list[tuple[int, int]]] = defaultdict(list)

    class Recording(LocalFileSystem):
        def _open(self, path, mode="rb", block_size=None, **kwargs):
            return _RecordingFile(self._strip_protocol(path), mode, fs=self, **kwargs)

    Recording.protocol = (protocol,)
    Recording.reads, Recording.lock, Recording.descriptor = reads, threading.Lock(), descriptor
    fsspec.register_implementation(protocol, Recording, clobber=True)
    return reads


def encode(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt)
    return buf.getvalue()


def noise_images(count: int, seed: int = 0, sizes: Sequence[tuple[int, int]] = ((48, 32), (32, 48), (48, 48))
                 ) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for w, h in (sizes[i % len(sizes)] for i in range(count))]


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_tar(path: Path, members: Sequence[tuple[str, bytes]]) -> Path:
    """A tar with the given (name, bytes) members, in order."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            add_member(tar, name, data)
    return path


def write_dataset(root: Path, images: Sequence[np.ndarray], shards: int) -> tuple[Path, Path]:
    """The same images as WebDataset shards (`root/tars/000NN.tar`, members `<key>.png` and
    `<key>.json`) and as a folder (`root/folder/000NN/<key>.png`), in the same order."""
    tars, folder = root / "tars", root / "folder"
    tars.mkdir(parents=True)
    per = -(-len(images) // shards)
    for s in range(shards):
        members = []
        (folder / f"{s:05d}").mkdir(parents=True)
        for k, arr in enumerate(images[s * per:(s + 1) * per]):
            key = f"{s:03d}{k:04d}"
            data = encode(arr)
            members += [(f"{key}.png", data), (f"{key}.json", b'{"caption": "noise"}')]
            (folder / f"{s:05d}" / f"{key}.png").write_bytes(data)
        write_tar(tars / f"{s:05d}.tar", members)
    return tars, folder


def write_parquet(path: Path, images: Sequence[np.ndarray], row_group_size: int = 4, style: str = "hf") -> Path:
    """Images as a Parquet file: style "hf" (Hugging Face: `image` {bytes, path} struct, no key) or
    "img2dataset" (`key` string, `jpg` binary), in row groups of row_group_size."""
    data = [encode(arr) for arr in images]
    if style == "hf":
        image = pa.array([{"bytes": d, "path": f"img{i}.png"} for i, d in enumerate(data)],
                         pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
        table = pa.table({"image": image, "label": pa.array(list(range(len(data))))})
    else:
        table = pa.table({"key": [f"{i:09d}" for i in range(len(data))], "jpg": pa.array(data, pa.binary()),
                          "caption": ["noise"] * len(data)})
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def env_for(cache: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a `tagclip` subprocess: its own cache, one thread, no torchrun variables."""
    env = dict(os.environ, TAGCLIP_CACHE_DIR=str(cache), COLUMNS="200", OMP_NUM_THREADS="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    env.update(extra or {})
    return env


def s3_env(endpoint: str) -> dict[str, str]:
    """The usual AWS variables for boto/s3fs: fake credentials and the moto endpoint."""
    return {"AWS_ACCESS_KEY_ID": "testing-key-id", "AWS_SECRET_ACCESS_KEY": SECRET,
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}


@contextmanager
def moto_s3(served: list[tuple[str, str, int]] | None = None) -> Iterator[str]:
    """moto's S3 server on 127.0.0.1 (a free port) for the duration; yields the endpoint URL, with
    the AWS variables set in this process's environment meanwhile (restored after). served: if
    given, the server appends (method, path, bytes of the response body) for every request: what
    was fetched, counted where it is sent."""
    from moto.server import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
    app = DomainDispatcherApplication(create_backend_app)
    port = free_port()
    server = make_server("127.0.0.1", port, app if served is None else _counting(app, served), threaded=True,
                         request_handler=MotoRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in s3_env(endpoint)}
    os.environ.update(s3_env(endpoint))
    try:
        yield endpoint
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.shutdown()
        thread.join()


def _counting(app, served: list[tuple[str, str, int]]):
    """A WSGI wrapper of app that records (method, path, response body bytes) per request."""
    def counted(environ, start_response):
        body = list(app(environ, start_response))
        served.append((environ["REQUEST_METHOD"], environ.get("PATH_INFO", ""), sum(len(b) for b in body)))
        return body
    return counted


def s3fs_client():
    """A fresh s3fs filesystem from the environment (no instance cache: the endpoint changes per test)."""
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True)


# ---- damaged tars: headers rewritten by hand --------------------------------------------------------

def tar_layout(path: Path) -> list[tuple[str, int, int]]:
    """(name, header offset, data offset) of each member of a sound tar, in file order."""
    with tarfile.open(path) as tar:
        return [(m.name, m.offset, m.offset_data) for m in tar.getmembers()]


def rewrite_header(data: bytes, header: int, size: int | None = None, checksum: bool = True) -> bytes:
    """data with the header at byte `header` given a new size field (octal, or base-256 when it
    does not fit or is negative, as GNU tar writes them) and a recomputed checksum; checksum=False
    leaves the checksum field as it was (the header no longer verifies)."""
    block = bytearray(data[header:header + 512])
    if size is not None:
        block[124:136] = tarfile.itn(size, 12, tarfile.GNU_FORMAT)
    if checksum:
        block[148:156] = b" " * 8
        block[148:156] = b"%06o\0 " % tarfile.calc_chksums(bytes(block))[0]
    else:
        block[148:156] = b"%06o\0 " % ((tarfile.calc_chksums(bytes(block))[0] + 1) % 0o777777)
    return data[:header] + bytes(block) + data[header + 512:]


def link_member(tar: tarfile.TarFile, name: str, target: str, hard: bool) -> None:
    info = tarfile.TarInfo(name)
    info.type = tarfile.LNKTYPE if hard else tarfile.SYMTYPE
    info.linkname = target
    tar.addfile(info)
