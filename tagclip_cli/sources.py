"""Listing inputs of every kind, local or remote (fsspec): folders, path lists, COCO manifests, and
the CLI's input (which kind a path or URL is); tar shards and Parquet files are listed, and every
item's bytes read, by shardsources.py (its names are importable from here).

Every image becomes an `ImageItem` (sourcebase.py) with a stable `image_id` and a global `index`
(its position in the deterministic listing), which sharding and resume rely on. Sources know
nothing of the method; decoding lives in data.py.

Libraries: fsspec opens and lists every URL (s3://, gs://, hf://, https://, local paths) with the
storage library's own credentials and configuration (s3fs, gcsfs: `pip install tagclip-cli[remote]`).
"""

from __future__ import annotations

import io
import json
import logging
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TextIO

from tagclip_cli.errors import UsageError
from tagclip_cli.fileio import output_text
from tagclip_cli.shardsources import (  # noqa: F401  (the tar / Parquet names, importable from here as before)
    ParquetColumns,
    expand_urls,
    list_parquet,
    list_tars,
    read_bytes,
)
from tagclip_cli.sourcebase import (  # noqa: F401  (importable from here as before)
    COMPRESSED_TAR_EXTENSIONS,
    IMAGE_EXTENSIONS,
    PARQUET_EXTENSIONS,
    SHARD_EXTENSIONS,
    TAR_EXTENSIONS,
    ImageItem,
    SourceError,
    is_url,
)
from tagclip_cli.sourcebase import io_reason as _reason
from tagclip_cli.sourcebase import safe_url as _safe
from tagclip_cli.sourcebase import url_fs as _fs

log = logging.getLogger(__name__)


# ---- folders, path lists, manifests ---------------------------------------------------------------

def list_folder(root: str | Path, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> list[ImageItem]:
    """All images under root (recursive), sorted by their relative POSIX path. root may be a URL."""
    if isinstance(root, str) and is_url(root):
        return _list_remote_folder(root, extensions)
    root = Path(root)
    if not root.exists():
        raise UsageError(f"{root}: no such file or directory")
    if not root.is_dir():
        raise UsageError(f"{root}: not a directory")
    found = _local_files(root, extensions)
    # Undecodable (non-UTF-8) names keep their real path for opening; the id is escaped (output_text).
    return [ImageItem(i, output_text(rel), str(root / rel)) for i, rel in enumerate(found)]


def _local_files(root: Path, extensions: Sequence[str], recursive: bool = True) -> list[str]:
    """Relative POSIX paths of the files under root with one of the extensions, sorted."""
    exts = tuple(e.lower() for e in extensions)
    found: list[str] = []
    linked_dirs: list[str] = []

    def unlisted(exc: OSError) -> None:  # os.walk skips such directories silently otherwise
        log.warning("cannot list %s (%s); images in it are not included", output_text(str(exc.filename)),
                    exc.strerror or exc)

    for dirpath, dirnames, filenames in os.walk(root, followlinks=False, onerror=unlisted):
        dirnames.sort()
        linked_dirs.extend(os.path.join(dirpath, d) for d in dirnames if os.path.islink(os.path.join(dirpath, d)))
        for name in filenames:
            if name.lower().endswith(exts):
                found.append(Path(dirpath, name).relative_to(root).as_posix())
        if not recursive:
            break
    if linked_dirs and recursive:  # not followed (loops, duplicates): say so rather than drop their images
        log.warning("%d symbolic link(s) to directories not followed (e.g. %s); list such images in a "
                    "text file of paths to include them", len(linked_dirs), output_text(linked_dirs[0]))
    found.sort()
    return found


def _remote_files(url: str, extensions: Sequence[str]) -> list[str]:
    """Full URLs of the objects under url with one of the extensions, sorted; UsageError if unreachable."""
    fs, root = _fs(url)
    try:
        names = fs.find(root)
    except Exception as exc:  # network, auth, missing bucket: before any work, exit 2
        raise UsageError(f"{_safe(url)}: cannot list ({_reason(exc)})") from None
    exts = tuple(e.lower() for e in extensions)
    protocol = url.split("://", 1)[0]
    return sorted(f"{protocol}://{name}" for name in names if name.lower().endswith(exts))


def _list_remote_folder(url: str, extensions: Sequence[str]) -> list[ImageItem]:
    base = url.rstrip("/") + "/"
    files = _remote_files(url, extensions)
    return [ImageItem(i, output_text(f[len(base):] if f.startswith(base) else f), f) for i, f in enumerate(files)]


def read_manifest(manifest: str | Path, image_root: str | Path) -> list[ImageItem]:
    """The images of a COCO-style JSON (`images`: [{id, file_name}, ...]) in the manifest's order.

    image_id is the manifest id as a string and coco_id the id itself; paths are image_root/file_name.
    Either may be a URL."""
    remote_root = isinstance(image_root, str) and is_url(image_root)
    try:
        doc = json.loads(_read_text(str(manifest)))
    except FileNotFoundError:
        raise UsageError(f"{manifest}: no such file") from None
    except UsageError:
        raise
    except OSError as exc:
        raise UsageError(f"{manifest}: cannot read ({exc.strerror or _reason(exc)})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{manifest}: not a JSON file ({exc})") from None
    if remote_root:
        _check_remote_dir(str(image_root), "--image-root ")
    elif not Path(image_root).is_dir():
        raise UsageError(f"--image-root {image_root}: not a directory")
    images = doc.get("images") if isinstance(doc, dict) else None
    if not isinstance(images, list):
        raise UsageError(f"{manifest}: not a COCO manifest (no 'images' list)")
    items: list[ImageItem] = []
    seen: set[int] = set()
    for pos, image in enumerate(images):
        try:
            coco_id, file_name = image["id"], image["file_name"]
        except (TypeError, KeyError):
            raise UsageError(f"{manifest}: images[{pos}] has no 'id' and 'file_name'") from None
        if isinstance(coco_id, bool) or not isinstance(coco_id, int) or not isinstance(file_name, str):
            raise UsageError(f"{manifest}: images[{pos}] needs an integer 'id' and a string 'file_name'")
        if coco_id in seen:
            raise UsageError(f"{manifest}: image id {coco_id} appears twice")
        seen.add(coco_id)
        path = f"{str(image_root).rstrip('/')}/{file_name}" if remote_root else str(Path(image_root) / file_name)
        items.append(ImageItem(len(items), str(coco_id), path, coco_id))
    return items


def _read_text(path: str) -> str:
    """A small text file (manifest, list of paths), local or remote."""
    if not is_url(path):
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    fs, p = _fs(path)
    try:
        with fs.open(p, "rb") as fh:
            return fh.read().decode("utf-8")
    except FileNotFoundError:
        raise
    except UnicodeDecodeError:
        raise
    except Exception as exc:
        raise UsageError(f"{_safe(path)}: cannot read ({_reason(exc)})") from None


def _check_remote_dir(url: str, what: str = "") -> None:
    fs, p = _fs(url)
    try:
        ok = fs.isdir(p)
    except Exception as exc:
        raise UsageError(f"{what}{_safe(url)}: cannot list ({_reason(exc)})") from None
    if not ok:
        raise UsageError(f"{what}{_safe(url)}: not a directory (no objects under this prefix)")


def read_path_list(lines: Iterable[str], image_root: str | Path | None = None, source: str = "-") -> list[ImageItem]:
    """Images named one per line (blank lines ignored), in the given order.

    Without image_root the id and the path are the line as given (relative to the working
    directory). With image_root, a path inside the root (lexically, e.g. `find ROOT` output) keeps
    its path and gets the id relative to the root; any other relative path is taken as relative to
    the root (id = the line). An absolute path outside the root is an error. Lines may be URLs."""
    remote_root = image_root is not None and is_url(str(image_root))
    root_abs = None if image_root is None or remote_root else os.path.abspath(image_root)
    items: list[ImageItem] = []
    seen: dict[str, int] = {}
    for lineno, raw in enumerate(lines, start=1):
        line = raw.rstrip("\r\n")
        if not line.strip():
            continue
        path, image_id = line, line
        if remote_root:
            base = str(image_root).rstrip("/") + "/"
            if line.startswith(base):
                image_id = line[len(base):]
            elif is_url(line):
                raise UsageError(f"{source}:{lineno}: {_safe(line)} is not under --image-root {_safe(str(image_root))}")
            else:
                path = base + line
        elif root_abs is not None and not is_url(line):
            absolute = os.path.abspath(line)
            if absolute == root_abs or absolute.startswith(root_abs + os.sep):
                image_id = Path(os.path.relpath(absolute, root_abs)).as_posix()
            elif os.path.isabs(line):
                raise UsageError(f"{source}:{lineno}: {line} is not under --image-root {image_root}")
            else:
                image_id = Path(os.path.normpath(line)).as_posix()
                path = os.path.join(image_root, line)
        if image_id in seen:
            raise UsageError(f"{source}:{lineno}: {line} was already listed on line {seen[image_id]}")
        seen[image_id] = lineno
        items.append(ImageItem(len(items), image_id, path))
    return items


# ---- the CLI's input ------------------------------------------------------------------------------

def _refuse_compressed(urls: Sequence[str]) -> None:
    """UsageError naming the first compressed tar among urls: such shards have no random access
    (every item would be read by decompressing the shard from its start)."""
    for url in urls:
        if url.lower().endswith(COMPRESSED_TAR_EXTENSIONS):
            raise UsageError(f"{_safe(url)}: compressed tar shards are not supported; decompress them to .tar "
                             "first (gunzip, bunzip2, unxz or unzstd)")


def _kind_of(urls: Sequence[str]) -> str | None:
    _refuse_compressed(urls)
    lowered = [u.lower() for u in urls]
    if lowered and all(u.endswith(TAR_EXTENSIONS) for u in lowered):
        return "tar"
    if lowered and all(u.endswith(PARQUET_EXTENSIONS) for u in lowered):
        return "parquet"
    return None


def _folder_of_shards(files: list[str]) -> tuple[str, list[str]] | None:
    """A folder without images but with tars (preferred: img2dataset's .parquet beside them holds
    metadata only) or Parquet files: (kind, sorted files). UsageError for a compressed tar among them."""
    _refuse_compressed(files)
    tars = [f for f in files if f.lower().endswith(TAR_EXTENSIONS)]
    if tars:
        return "tar", tars
    parquets = [f for f in files if f.lower().endswith(PARQUET_EXTENSIONS)]
    return ("parquet", parquets) if parquets else None


def _from_shards(kind: str, urls: list[str], columns: ParquetColumns) -> list[ImageItem]:
    return list_tars(urls) if kind == "tar" else list_parquet(urls, columns)


def collect_items(
    images: str | None, manifest: str | Path | None = None, image_root: str | Path | None = None,
    stdin: TextIO | None = None, images_parquet: str | None = None, columns: ParquetColumns = ParquetColumns(),
) -> list[ImageItem]:
    """Resolve the CLI's input: a folder, a text file of paths (or of tar URLs), one image, `-`
    (paths on stdin), tar shards (a pattern, one tar, a folder of tars), Parquet files with image
    bytes (images_parquet, or .parquet inputs), or a COCO manifest with its image root; local or
    URLs. Raises UsageError when nothing usable is given."""
    given = [name for name, value in (("IMAGES", images), ("--manifest", manifest),
                                      ("--images-parquet", images_parquet)) if value is not None]
    if len(given) > 1:
        raise UsageError(f"give either {' or '.join(given)}, not both")
    if (columns.image or columns.id) and images is None and images_parquet is None:
        raise UsageError("--image-column / --id-column apply to Parquet inputs")
    if manifest is not None:
        if image_root is None:
            raise UsageError("--manifest needs --image-root (the folder its file_name entries are relative to)")
        items = read_manifest(manifest, str(image_root) if is_url(str(image_root)) else image_root)
        where = str(manifest)
    elif images_parquet is not None:
        urls = expand_urls(images_parquet)
        if not urls:
            raise UsageError(f"--images-parquet {images_parquet}: no such files")
        items = list_parquet(urls, columns)
        where = images_parquet
    elif images is None:
        raise UsageError("no input: give a folder, a text file of paths, '-' for paths on stdin, tar shards, "
                         "--images-parquet or --manifest")
    else:
        items = _collect_images(images, image_root, stdin, columns)
        where = "stdin" if images == "-" else images
    if (columns.image or columns.id) and not any(it.locator and it.locator[0] == "parquet" for it in items):
        raise UsageError("--image-column / --id-column apply to Parquet inputs")
    if not items:
        raise UsageError(f"{_safe(str(where))}: no images found (extensions: "
                         f"{', '.join(e[1:] for e in IMAGE_EXTENSIONS)}; or tar shards, Parquet files)")
    return items


def _collect_images(images: str, image_root: str | Path | None, stdin: TextIO | None,
                    columns: ParquetColumns) -> list[ImageItem]:
    if images == "-":
        stream = stdin if stdin is not None else sys.stdin
        if stream.isatty():
            raise UsageError("'-' reads image paths from stdin, but stdin is a terminal; pipe a list in")
        return read_path_list(stream, image_root, "<stdin>")
    local = not is_url(images)
    if not (local and os.path.exists(images)) and any(c in images for c in "{*?"):
        urls = expand_urls(images)
        if urls != [images]:
            kind = _kind_of(urls)
            if kind is None:
                raise UsageError(f"{images}: a pattern must name .tar or .parquet files "
                                 f"(it gives e.g. {_safe(urls[0]) if urls else 'nothing'})")
            return _from_shards(kind, urls, columns)
    if not local:
        return _collect_remote(images, image_root, columns)
    path = Path(images)
    if path.is_dir():
        if image_root is not None:
            raise UsageError("--image-root applies to --manifest and path lists, not to a folder")
        items = list_folder(images)
        shard_files = _local_files(path, SHARD_EXTENSIONS, recursive=False)
        if items:
            if shard_files:  # images win; say what is left out rather than drop it silently
                log.warning("%s holds images and %d tar / Parquet file(s) (e.g. %s); only the images are read "
                            "(name the shards to read those)", output_text(images), len(shard_files),
                            output_text(shard_files[0]))
            return items
        shards = _folder_of_shards([str(path / f) for f in shard_files])  # errors name the file by its path
        return _from_shards(shards[0], shards[1], columns) if shards else []
    if path.is_file():
        lower = images.lower()
        _refuse_compressed([images])
        if lower.endswith(IMAGE_EXTENSIONS):
            return read_path_list([images], image_root, images)
        if lower.endswith(TAR_EXTENSIONS) or lower.endswith(PARQUET_EXTENSIONS):
            return _from_shards(_kind_of([lower]), [images], columns)
        try:
            with open(images, encoding="utf-8") as fh:
                return _from_list(list(fh), image_root, images, columns)
        except UnicodeDecodeError:
            raise UsageError(f"{images}: not a text file of image paths") from None
    raise UsageError(f"{images}: no such file or directory")


def _from_list(lines: list[str], image_root: str | Path | None, source: str, columns: ParquetColumns
               ) -> list[ImageItem]:
    """A text file of image paths, or of tar (or Parquet) URLs: a shard list (WebDataset's url list)."""
    listed = [line.strip() for line in lines if line.strip()]
    kind = _kind_of(listed)
    if kind is not None and image_root is None:
        return _from_shards(kind, listed, columns)
    return read_path_list(lines, image_root, source)


def _collect_remote(url: str, image_root: str | Path | None, columns: ParquetColumns) -> list[ImageItem]:
    """A URL: a prefix (folder of images, or of tars / Parquet files), one tar, one Parquet file,
    one image, or a text file of paths / shard URLs."""
    fs, p = _fs(url)
    lower = url.lower()
    _refuse_compressed([url])
    if lower.endswith(TAR_EXTENSIONS) or lower.endswith(PARQUET_EXTENSIONS):
        return _from_shards(_kind_of([lower]), [url], columns)
    if lower.endswith(IMAGE_EXTENSIONS):
        return read_path_list([url], image_root, url)
    try:
        directory = fs.isdir(p)
        exists = directory or fs.exists(p)
    except Exception as exc:  # unreachable endpoint, missing bucket, denied: exit 2 before any work
        raise UsageError(f"{_safe(url)}: cannot list ({_reason(exc)})") from None
    if not exists:
        raise UsageError(f"{_safe(url)}: no such file or directory")
    if directory:
        if image_root is not None:
            raise UsageError("--image-root applies to --manifest and path lists, not to a folder")
        items = _list_remote_folder(url, IMAGE_EXTENSIONS)
        if items:
            return items
        shards = _folder_of_shards(_remote_files(url, SHARD_EXTENSIONS))
        return _from_shards(shards[0], shards[1], columns) if shards else []
    try:
        text = _read_text(url)
    except UnicodeDecodeError:
        raise UsageError(f"{_safe(url)}: not a text file of image paths") from None
    return _from_list(list(io.StringIO(text, newline=None)), image_root, url, columns)  # universal newlines, as open()
