"""Output files: tags Parquet (one row per image, every class's score, run metadata), the COCO
masks JSON, label PNGs. Atomic writes are `tagclip_cli.fileio`; reading back is `tagclip_cli.formats`."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tagclip_cli.errors import OutputWriteError, UsageError
from tagclip_cli.fileio import atomic_path, describe_os_error, json_scalar, output_text, write_json_atomic
from tagclip_cli.record import RecordIO, RunRecord

ROW_GROUP_SIZE = 4096


# Per-image columns every output table starts with (after the tags Parquet's `index`).
IMAGE_FIELDS = (
    ("image_id", pa.string()),
    ("path", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("status", pa.string()),
    ("error", pa.string()),
)


def tags_schema(record: RunRecord | Mapping | None = None) -> pa.Schema:
    """Columns of the tags Parquet. `scores` holds the fused score of every foreground class in
    vocabulary order (names in the metadata's "classes"); failed rows have status "failed", an
    error and null scores."""
    schema = pa.schema(
        [
            ("index", pa.int64()),
            *IMAGE_FIELDS,
            ("tags", pa.list_(pa.string())),
            ("scores", pa.list_(pa.float32())),
        ]
    )
    return with_record(schema, record)


def tag_row(item, width, height, error: str | None, tags: Sequence[str] = (), scores=None) -> dict:
    """One Parquet row (a dict in `tags_schema` order)."""
    return {
        "index": item.index,
        "image_id": output_text(item.image_id),
        "path": output_text(item.path),
        "width": width,
        "height": height,
        "status": "failed" if error else "ok",
        "error": output_text(error) if error else error,
        "tags": list(tags) if not error else [],
        "scores": [float(s) for s in scores] if scores is not None and not error else None,
    }


def rows_to_table(rows: Sequence[dict], schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pylist(list(rows), schema=schema)


def write_parquet_atomic(tables: Iterable[pa.Table], path: str | Path, schema: pa.Schema) -> int:
    """Stream tables into one Parquet file, atomically. Returns the number of rows."""
    rows = 0
    with atomic_path(path) as tmp:
        with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
            for table in tables:
                writer.write_table(table.cast(schema), row_group_size=ROW_GROUP_SIZE)
                rows += table.num_rows
    return rows


def with_record(schema: pa.Schema, record: RunRecord | Mapping | None) -> pa.Schema:
    """The schema holding the run record in its metadata (`RecordIO.metadata`); a plain mapping is
    taken as a stored record. None: the schema as it is."""
    if record is None:
        return schema
    if not isinstance(record, RunRecord):
        record = RecordIO.from_dict(record)
    return schema.with_metadata(RecordIO.metadata(record))


def schema_record(schema: pa.Schema, source: str | Path = "schema") -> RunRecord:
    """The run record in a schema's metadata (an empty one when there is none). Raises ValueError
    when it is not JSON."""
    return RecordIO.from_metadata(schema.metadata, source)


def read_record(path: str | Path) -> RunRecord:
    """The run record of one of our Parquet files (`tagclip_cli.formats` reads it with errors that
    name the file; this is the writer's own resume check on files it wrote)."""
    return schema_record(pq.read_schema(path), path)


# ---- masks: COCO RLE rows, the COCO JSON and label PNGs (`tagclip segment`) --------------------------

MASK_TYPE = pa.struct(
    [
        ("category_id", pa.int32()),
        ("counts", pa.string()),
        ("area", pa.int64()),
        ("bbox", pa.list_(pa.float64())),
        ("score", pa.float32()),
    ]
)
COCO_JSON_FORMAT = "coco-json"  # the job format name of a segment run (jobs.write_final)


def segment_schema(record: RunRecord | Mapping | None = None) -> pa.Schema:
    """Rows of a segment run: the tags columns (`tags_schema`), then `coco_id` (the manifest's
    image id, null for other inputs) and `masks`: one entry per class present in the label map,
    with category_id = vocabulary index + 1, the COCO RLE `counts` string of the mask at the
    image's size, its area, bbox [x, y, w, h] and score. Failed rows have null masks."""
    fields = list(tags_schema()) + [pa.field("coco_id", pa.int64()), pa.field("masks", pa.list_(MASK_TYPE))]
    schema = pa.schema(fields)
    return with_record(schema, record)


def segment_row(item, width, height, error: str | None, tags: Sequence[str] = (), scores=None,
                masks: Sequence[dict] | None = None) -> dict:
    """One row of `segment_schema`: a tags row plus coco_id and the mask entries (`mask_entries`)."""
    row = tag_row(item, width, height, error, tags, scores)
    row["coco_id"] = getattr(item, "coco_id", None)
    row["masks"] = None if error else list(masks or ())
    return row


def rle_encode(mask: np.ndarray) -> dict:
    """COCO compressed RLE of an (H, W) bool mask: {"size": [H, W], "counts": str}."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def mask_entries(label_map: np.ndarray, scores: dict[int, float]) -> list[dict]:
    """The `masks` column of one image: per label > 0 present in the (H, W) label map (ascending),
    {category_id: label, counts, area, bbox, score: scores[label]}."""
    from pycocotools import mask as mask_utils

    entries = []
    present = np.unique(label_map)
    for label in present[present > 0].tolist():
        rle = mask_utils.encode(np.asfortranarray((label_map == label).astype(np.uint8)))
        entries.append(
            {
                "category_id": int(label),
                "counts": rle["counts"].decode("ascii"),
                "area": int(mask_utils.area(rle)),
                "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                "score": float(scores.get(label, float("nan"))),
            }
        )
    return entries


def voc_palette() -> list[int]:
    """The PASCAL VOC colour map as a flat 768-entry PIL palette (index 0 black, 1 (128, 0, 0), ...).
    The label PNGs carry it; `formats.class_color` reads colours from it (the gallery's)."""
    palette = []
    for index in range(256):
        r = g = b = 0
        value = index
        for shift in range(8):
            r |= ((value >> 0) & 1) << (7 - shift)
            g |= ((value >> 1) & 1) << (7 - shift)
            b |= ((value >> 2) & 1) << (7 - shift)
            value >>= 3
        palette += [r, g, b]
    return palette


def label_png_path(png_dir: str | Path, image_id: str, suffix: str = ".png") -> Path:
    """<png_dir>/<image_id with its extension replaced by .png (or `suffix`)>; an id that is
    absolute or climbs out with '..' is kept inside png_dir (leading '/' dropped, '..' parts
    become '__')."""
    parts = [("__" if p == ".." else p) for p in Path(image_id).parts if p not in ("/", ".", "")]
    rel = Path(*parts) if parts else Path("image")
    return Path(png_dir) / rel.with_suffix(suffix)


# ---- saved cams (segment --save-cams; read back by formats.read_cam_file) -------------------------

CAMS_FORMAT = "tagclip-cams"
CAMS_INDEX = "cams.json"  # DIR/cams.json: classes, layout and label rule of every file in DIR


def cam_file_path(cams_dir: str | Path, image_id: str) -> Path:
    """<cams_dir>/<image_id with its extension replaced by .npz> (kept inside cams_dir)."""
    return label_png_path(cams_dir, image_id, ".npz")


def write_cam_file(path: str | Path, cams: np.ndarray, tags: Sequence[int], size: tuple[int, int],
                   image_id: str, image_path: str) -> None:
    """One image's cams as a compressed .npz, atomically: `cams` (K, h, w) float16 (at the image
    size or on the patch grid), `tags` (K,) int32 vocabulary indices (cam k is class tags[k]),
    `size` (2,) int32 the image's (height, width), `image_id` and `path` (str)."""
    path = Path(path)
    if cams.ndim != 3 or cams.shape[0] != len(tags):
        raise ValueError(f"cams {cams.shape} do not match {len(tags)} tags")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputWriteError(f"cannot create {path.parent} ({describe_os_error(exc)})") from None
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez_compressed(fh, cams=cams.astype(np.float16), tags=np.asarray(tags, dtype=np.int32),
                            size=np.asarray(size, dtype=np.int32), image_id=np.str_(image_id),
                            path=np.str_(image_path))


def write_cams_index(cams_dir: str | Path, index: dict, overwrite: bool = False) -> None:
    """Write DIR/cams.json, or check that the one there describes the same run (else UsageError:
    cams of two different runs must not share a directory)."""
    cams_dir = Path(cams_dir)
    if cams_dir.exists() and not cams_dir.is_dir():
        raise UsageError(f"--save-cams {cams_dir}: exists and is not a directory")
    target = cams_dir / CAMS_INDEX
    if target.is_file() and not overwrite:
        try:
            existing = json.loads(target.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            existing = None
        if existing != json.loads(json.dumps(index)):
            raise UsageError(f"--save-cams {cams_dir}: holds cams of another run (its {CAMS_INDEX} differs); "
                             "use another directory or --overwrite")
        return
    try:
        cams_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputWriteError(f"cannot create {cams_dir} ({describe_os_error(exc)})") from None
    write_json_atomic(index, target)


def write_label_png(label_map: np.ndarray, path: str | Path) -> None:
    """Write an (H, W) label map atomically: a palette PNG (VOC colours, pixel value = label) when
    every label fits in 8 bits, else a 16-bit grayscale PNG."""
    from PIL import Image

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputWriteError(f"cannot create {path.parent} ({describe_os_error(exc)})") from None
    if label_map.size == 0 or int(label_map.max()) <= 255:
        image = Image.fromarray(label_map.astype(np.uint8))  # "L"; putpalette makes it "P"
        image.putpalette(voc_palette())
    else:
        image = Image.fromarray(label_map.astype(np.uint16))  # "I;16"
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def coco_categories(classes: Sequence[str]) -> list[dict]:
    """COCO categories of a vocabulary: id = class index + 1 (0 is the background of label maps)."""
    return [{"id": i + 1, "name": name, "supercategory": "object"} for i, name in enumerate(classes)]


def write_coco_json(
    tables: Iterable[pa.Table], out: str | Path, schema: pa.Schema, tags_out: str | Path | None = None
) -> int:
    """Merge segment rows (tables in index order) into a COCO JSON at `out`, atomically; returns rows.

    - categories: the run's vocabulary (`classes` in the schema metadata), id = index + 1;
    - images: one per row; id = the manifest's coco_id when the row has one, else the row's global
      index; file_name and tagclip_image_id = the image id; width, height; tagclip_status ("ok" or
      "failed"), tagclip_error (failed rows only, which have no annotations), tagclip_tags;
    - annotations: one per (image, class present), id from 1, segmentation = compressed RLE with a
      str counts, area, bbox [x, y, w, h], iscrowd 0, and score = the mean of that class's map
      inside its mask (CLS-SEG: the normalised refined CAM; MaskCLIP: the class's softmax probability),
      not TagCLIP's image-level score (that is in the tags Parquet and the image's tagclip_tags).
    Memory stays flat: annotations are spooled to a temporary file beside `out` and appended.
    With tags_out, the same pass also writes the tags Parquet (`tags_schema`) there, atomically."""
    record = schema_record(schema)
    classes = record.classes or []
    out = Path(out)
    rows = 0
    ann_id = 0
    tag_fields = tags_schema(record)
    with atomic_path(out) as tmp, _maybe_parquet(tags_out, tag_fields) as tag_writer:
        spool_fd, spool_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".annotations")
        try:
            with open(tmp, "w", encoding="utf-8") as fh, os.fdopen(spool_fd, "w+", encoding="utf-8") as spool:
                info = {"description": "tagclip segment", "tool": record.tool,
                        "version": record.tool_version, "tagclip": RecordIO.coco_info(record)}
                fh.write('{"info": ' + json.dumps(info) + ', "licenses": [], "categories": ')
                fh.write(json.dumps(coco_categories(classes)))
                fh.write(', "images": [')
                for table in tables:
                    if tag_writer is not None:
                        tag_writer.write_table(table.select(tag_fields.names).cast(tag_fields),
                                               row_group_size=ROW_GROUP_SIZE)
                    for row in table.to_pylist():
                        image_id = row["coco_id"] if row.get("coco_id") is not None else row["index"]
                        image = {"id": int(image_id), "file_name": row["image_id"], "width": row["width"],
                                 "height": row["height"], "tagclip_image_id": row["image_id"],
                                 "tagclip_status": row["status"], "tagclip_tags": row["tags"] or []}
                        if row["status"] != "ok":
                            image["tagclip_error"] = row["error"]
                        fh.write((", " if rows else "") + json.dumps(image, ensure_ascii=False))
                        rows += 1
                        for mask in row.get("masks") or ():
                            ann_id += 1
                            ann = {"id": ann_id, "image_id": int(image_id), "category_id": mask["category_id"],
                                   "segmentation": {"size": [row["height"], row["width"]], "counts": mask["counts"]},
                                   "area": mask["area"], "bbox": mask["bbox"], "iscrowd": 0,
                                   "score": json_scalar(mask["score"])}
                            spool.write((", " if ann_id > 1 else "") + json.dumps(ann))
                fh.write('], "annotations": [')
                spool.seek(0)
                while chunk := spool.read(1 << 20):
                    fh.write(chunk)
                fh.write("]}\n")
        finally:
            Path(spool_name).unlink(missing_ok=True)
    return rows


MASKS_PARQUET_FORMAT = "masks-parquet"  # `tagclip segment --out masks.parquet` (jobs.write_final)


def masks_schema(record: RunRecord | Mapping | None = None) -> pa.Schema:
    """Columns of the masks Parquet: one row per (image, class mask), and one row with null
    class_id for an image without masks or a failed image (status "failed", its error).

    class_id is the COCO category id of `coco_categories` (vocabulary index + 1), class_name its
    name; score, area, bbox ([x, y, w, h] in pixels, as COCO) and counts (COCO compressed RLE at
    the image's height x width, column-major) are those of the COCO JSON's annotation. The run
    metadata (with "classes") is stored under `record.METADATA_KEY`, as in the tags Parquet."""
    schema = pa.schema(
        [
            *IMAGE_FIELDS,
            ("class_id", pa.int32()),
            ("class_name", pa.string()),
            ("score", pa.float32()),
            ("area", pa.int64()),
            ("bbox", pa.list_(pa.float64())),
            ("counts", pa.string()),
        ]
    )
    return with_record(schema, record)


def mask_rows_table(table: pa.Table, classes: Sequence[str], schema: pa.Schema) -> pa.Table:
    """Segment rows (`segment_schema`, one per image) -> masks Parquet rows (`masks_schema`):
    each image's `masks` entries become rows in order; an image with none (or failed) becomes one
    row with null mask columns. Vectorised with Arrow (no Python loop over masks)."""
    import pyarrow.compute as pc

    n = table.num_rows
    masks = table.column("masks").combine_chunks()
    lengths = pc.fill_null(pc.list_value_length(masks), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    per_image = np.maximum(lengths, 1)  # rows per image in the output
    image_of_row = np.repeat(np.arange(n), per_image)
    out_start = np.cumsum(per_image) - per_image
    flat_start = np.cumsum(lengths) - lengths
    total = int(per_image.sum())
    # output row -> position in the flattened mask entries, or null for an image without masks
    mask_of_row = np.full(total, -1, dtype=np.int64)
    n_masks = int(lengths.sum())
    if n_masks:
        rows_with_mask = np.repeat(out_start, lengths) + (np.arange(n_masks) - np.repeat(flat_start, lengths))
        mask_of_row[rows_with_mask] = np.arange(n_masks)
    # masks.flatten() would ignore the offsets of a sliced array; values + offsets do not
    entries = pc.list_flatten(masks)
    take = pa.array(mask_of_row, mask=mask_of_row < 0)
    picked = entries.take(take) if n_masks else pa.nulls(total, entries.type)
    images = table.select(["image_id", "path", "width", "height", "status", "error"]).take(pa.array(image_of_row))
    class_id = pc.struct_field(picked, "category_id")
    names = pa.array(list(classes), type=pa.string())
    class_name = names.take(pc.subtract(class_id, 1)) if len(classes) else pa.nulls(total, pa.string())
    columns = {name: images.column(name) for name in images.column_names}
    columns |= {
        "class_id": class_id,
        "class_name": class_name,
        "score": pc.struct_field(picked, "score"),
        "area": pc.struct_field(picked, "area"),
        "bbox": pc.struct_field(picked, "bbox"),
        "counts": pc.struct_field(picked, "counts"),
    }
    return pa.table([columns[f.name] for f in schema], schema=schema)


def write_masks_parquet(
    tables: Iterable[pa.Table], out: str | Path, schema: pa.Schema, tags_out: str | Path | None = None
) -> int:
    """Merge segment rows (tables in index order, `segment_schema`) into the masks Parquet at
    `out` (`masks_schema`, row groups of ROW_GROUP_SIZE rows), atomically; returns the number of
    images. One table of rows is in memory at a time. With tags_out, the same pass also writes the
    tags Parquet there, as `write_coco_json` does."""
    record = schema_record(schema)
    classes = record.classes or []
    out_schema = masks_schema(record)
    tag_fields = tags_schema(record)
    images = 0
    with atomic_path(out) as tmp, _maybe_parquet(tags_out, tag_fields) as tag_writer:
        with pq.ParquetWriter(tmp, out_schema, compression="zstd") as writer:
            for table in tables:
                if tag_writer is not None:
                    tag_writer.write_table(table.select(tag_fields.names).cast(tag_fields),
                                           row_group_size=ROW_GROUP_SIZE)
                writer.write_table(mask_rows_table(table, classes, out_schema), row_group_size=ROW_GROUP_SIZE)
                images += table.num_rows
    return images


@contextmanager
def _maybe_parquet(path: str | Path | None, schema: pa.Schema):
    """A ParquetWriter on an atomic temporary for `path`, or None when path is None."""
    if path is None:
        yield None
        return
    with atomic_path(path) as tmp, pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
        yield writer

