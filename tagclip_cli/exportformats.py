"""The five formats of `tagclip export` (see `tagclip_cli.export` for the layouts): the mask
geometry they need (connected parts, polygons with bridged holes, boxes, Label Studio and CVAT RLE)
and one streaming writer per format, each filling a temporary folder from `export.Inputs`.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape as xml_escape
from xml.sax.saxutils import quoteattr

import numpy as np

from tagclip_cli.errors import UsageError
from tagclip_cli.export import ExportSummary, Inputs, Progress, Record, voc_name, yolo_name
from tagclip_cli.record import TOOL, RecordIO, RunRecord

# ---- geometry: masks as polygons, boxes, Label Studio RLE, CVAT RLE ---------------------------------


def mask_parts(mask: np.ndarray) -> list[tuple[np.ndarray, list[np.ndarray]]]:
    """Connected parts of an (H, W) bool mask: [(outline (P, 2) int x, y, [hole outlines (Q, 2)])],
    from OpenCV's two-level contour tree (a part inside a hole is a part of its own)."""
    import cv2

    contours, hierarchy = cv2.findContours(mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if hierarchy is None:
        return []
    hierarchy = hierarchy[0]  # (N, 4): next, previous, first child, parent
    parts = []
    for i, contour in enumerate(contours):
        if hierarchy[i][3] != -1:
            continue
        holes = []
        child = hierarchy[i][2]
        while child != -1:
            holes.append(contours[child].reshape(-1, 2))
            child = hierarchy[child][0]
        parts.append((contour.reshape(-1, 2), holes))
    return parts


def bridge_holes(outline: np.ndarray, holes: Sequence[np.ndarray]) -> np.ndarray:
    """One (P, 2) polygon for an outline with holes: each hole is entered from the nearest point of
    the polygon so far, walked round and left the same way. Filled with cv2.fillPoly (even-odd)
    the zero-width cut adds no area, and the hole stays empty."""
    polygon = outline
    for hole in holes:
        d = ((polygon[:, None, :].astype(np.int64) - hole[None, :, :]) ** 2).sum(-1)  # (P, Q) squared distances
        i, j = np.unravel_index(int(d.argmin()), d.shape)
        loop = np.concatenate([hole[j:], hole[: j + 1]])
        polygon = np.concatenate([polygon[: i + 1], loop, polygon[i:]])
    return polygon


def mask_polygons(mask: np.ndarray) -> list[np.ndarray]:
    """Polygons (P, 2) in pixel coordinates, one per connected part with its holes bridged; parts
    whose outline has under 3 points (a pixel or a straight line) are dropped."""
    out = []
    for outline, holes in mask_parts(mask):
        if len(outline) < 3:
            continue
        out.append(bridge_holes(outline, [h for h in holes if len(h) >= 3]))
    return out


def part_boxes(mask: np.ndarray) -> list[tuple[int, int, int, int]]:
    """(x, y, w, h) pixel extents of each connected part of an (H, W) bool mask."""
    import cv2

    return [tuple(int(v) for v in cv2.boundingRect(outline)) for outline, _ in mask_parts(mask)]  # type: ignore[misc]


def labelstudio_rle(mask: np.ndarray) -> list[int]:
    """Label Studio's brush RLE (the rle-pack bit stream of its frontend) of an (H, W) bool mask:
    the RGBA image flattened row by row, every channel 255 inside the mask, 0 outside.

    Header: value count (32 bits), word size - 1 (5 bits, words of 8), four run-length field
    widths - 1 (4 bits each: 3, 4, 8, 16). Then runs: a repeat flag (1), the index of the width
    field (2 bits), run length - 1 in that width, and the 8-bit value."""
    flat = np.repeat(mask.reshape(-1).astype(np.uint8) * 255, 4)
    n = flat.size
    widths = (3, 4, 8, 16)
    bits = [f"{n:032b}", f"{8 - 1:05b}", "".join(f"{w - 1:04b}" for w in widths)]
    if n:
        change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
        starts = np.concatenate([[0], change])
        lengths = np.diff(np.concatenate([starts, [n]]))
        for start, length in zip(starts.tolist(), lengths.tolist(), strict=True):
            value = f"{int(flat[start]):08b}"
            while length > 0:
                piece = min(length, 1 << 16)
                index = next(k for k, w in enumerate(widths) if piece <= (1 << w))
                bits.append(f"1{index:02b}{piece - 1:0{widths[index]}b}{value}")
                length -= piece
    stream = "".join(bits)
    stream += "0" * (-len(stream) % 8)
    packed = np.packbits(np.frombuffer(stream.encode("ascii"), dtype=np.uint8) - ord("0"))
    return packed.tolist()


def cvat_rle(mask: np.ndarray, box: tuple[int, int, int, int]) -> str:
    """CVAT's mask RLE: run lengths inside box (x, y, w, h), row by row, starting with a run of
    background (possibly 0), as "a, b, c"."""
    x, y, w, h = box
    flat = mask[y : y + h, x : x + w].reshape(-1).astype(np.uint8)
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        runs = [0, *runs]
    return ", ".join(str(r) for r in runs)



def _place_image(record: Record, dest: Path, copy: bool) -> None:
    """Link (absolute symlink) or copy the record's image to dest."""
    if record.source is None or not record.source.is_file():
        raise UsageError(f"image '{record.image_id}': file not found ({record.source or 'no path recorded'}; "
                         "pass --images DIR, the folder the image ids are relative to)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    if copy:
        shutil.copyfile(record.source, dest)
    else:
        os.symlink(record.source.resolve(), dest)


def _fmt(value: float) -> str:
    return f"{value:.6f}".rstrip("0").rstrip(".") if value else "0"


def _ok_records(inputs: Inputs, summary: ExportSummary, progress: Progress) -> Iterator[Record]:
    """The records to export, counting each step of the bar and skipping (and counting) failed images."""
    for record in inputs.records():
        progress(1, inputs.count)
        if record.status != "ok":
            summary.skipped += 1
            continue
        yield record


# ---- the formats ----------------------------------------------------------------------------------


def _write_yolo(inputs: Inputs, tmp: Path, summary: ExportSummary, progress: Progress) -> None:
    config = inputs.config
    for record in _ok_records(inputs, summary, progress):
        name = yolo_name(record.image_id)
        _place_image(record, tmp / "images" / name, config.copy)
        w, h = record.width, record.height
        lines = []
        for region in record.masks:
            mask = region.mask(h, w)
            label = inputs.label_of(region)
            summary.masks += 1
            if config.task == "detect":
                for x, y, bw, bh in part_boxes(mask):
                    lines.append(f"{label} {_fmt((x + bw / 2) / w)} {_fmt((y + bh / 2) / h)} "
                                 f"{_fmt(bw / w)} {_fmt(bh / h)}")
            else:
                for polygon in mask_polygons(mask):
                    coords = " ".join(f"{_fmt(px / w)} {_fmt(py / h)}" for px, py in polygon.tolist())
                    lines.append(f"{label} {coords}")
        summary.shapes += len(lines)
        label_path = (tmp / "labels" / name).with_suffix(".txt")
        label_path.parent.mkdir(parents=True, exist_ok=True)
        label_path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        summary.images += 1
    (tmp / "images").mkdir(exist_ok=True)
    (tmp / "labels").mkdir(exist_ok=True)
    # JSON strings are YAML scalars: class names with ':' or quotes stay one value
    names = "".join(f"  {i}: {json.dumps(name)}\n" for i, name in enumerate(inputs.classes))
    (tmp / "data.yaml").write_text(
        f"# tagclip export yolo --task {config.task}: pseudo-labels from {json.dumps(str(config.masks))}\n"
        "# val is the same folder as train: hold out images yourself for a real validation split\n"
        f"path: {json.dumps(str(config.out.resolve()))}\ntrain: images\nval: images\n"
        f"nc: {len(inputs.classes)}\nnames:\n{names}",
        encoding="utf-8",
    )


def _label_map(record: Record, inputs: Inputs) -> np.ndarray:
    """(H, W) uint16 map of vocabulary index + 1; where masks overlap the higher score wins."""
    out = np.zeros((record.height, record.width), dtype=np.uint16)
    for region in sorted(record.masks, key=lambda r: r.score if r.score is not None else 0.0):
        out[region.mask(record.height, record.width)] = inputs.label_of(region) + 1
    return out


def _write_voc(inputs: Inputs, tmp: Path, summary: ExportSummary, progress: Progress) -> None:
    from PIL import Image

    from tagclip_cli.writers import voc_palette

    config = inputs.config
    palette = voc_palette()
    if len(inputs.classes) > 255:
        raise UsageError(f"voc: {len(inputs.classes)} classes do not fit VOC's 8-bit palette PNGs (255 at most)")
    main = tmp / "ImageSets" / "Main"
    seg_sets = tmp / "ImageSets" / "Segmentation"
    for folder in (tmp / "SegmentationClass", tmp / "JPEGImages", main, seg_sets):
        folder.mkdir(parents=True, exist_ok=True)
    handles = {name: open(main / f"{name}_{config.split}.txt", "w", encoding="utf-8") for name in inputs.classes}
    try:
        with open(seg_sets / f"{config.split}.txt", "w", encoding="utf-8") as seg_list, \
                open(main / f"{config.split}.txt", "w", encoding="utf-8") as main_list:
            for record in _ok_records(inputs, summary, progress):
                name = voc_name(record.image_id)
                suffix = record.source.suffix if record.source is not None else ".jpg"
                _place_image(record, tmp / "JPEGImages" / f"{name}{suffix.lower() or '.jpg'}", config.copy)
                labels = _label_map(record, inputs)
                png = Image.fromarray(labels.astype(np.uint8))  # "L"; putpalette makes it "P"
                png.putpalette(palette)
                png.save(tmp / "SegmentationClass" / f"{name}.png", format="PNG")
                seg_list.write(name + "\n")
                main_list.write(name + "\n")
                # image tags: the tags file's when given, else the classes that have a mask
                present = {t for t, _ in record.tags} if inputs.tags is not None else \
                    {r.class_name for r in record.masks}
                for cls, fh in handles.items():
                    fh.write(f"{name} {' 1' if cls in present else '-1'}\n")
                summary.masks += len(record.masks)
                summary.images += 1
    finally:
        for fh in handles.values():
            fh.close()
    lines = ["# label:color_rgb:parts:actions", "background:0,0,0::"]
    for i, name in enumerate(inputs.classes):
        r, g, b = palette[3 * (i + 1) : 3 * (i + 1) + 3]
        lines.append(f"{name}:{r},{g},{b}::")
    (tmp / "labelmap.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _model_version(inputs: Inputs) -> str:
    record = _run_record(inputs)
    return " ".join(str(p) for p in (record.tool or TOOL, record.tool_version or "", record.method) if p)


def _run_record(inputs: Inputs) -> RunRecord:
    """The run record of the masks file, else of the tags file (empty when neither has one)."""
    for source in (inputs.masks, inputs.tags):
        if source is not None and not source.record.empty:
            return source.record
    return RecordIO.from_dict({})


def _hex(rgb: Sequence[int]) -> str:
    return "#" + "".join(f"{int(c):02x}" for c in rgb)


def labelstudio_config(classes: Sequence[str], masks: bool, mask_as: str) -> str:
    """The labelling config (XML) that `tasks.json` fits: Choices "tags" and, with masks,
    BrushLabels or PolygonLabels "masks", all on the Image "image"."""
    from tagclip_cli.writers import voc_palette

    palette = voc_palette()
    choices = "".join(f'    <Choice value={quoteattr(name)}/>\n' for name in classes)
    lines = ["<View>", '  <Image name="image" value="$image" zoom="true"/>',
             '  <Choices name="tags" toName="image" choice="multiple" showInline="true">', choices.rstrip("\n"),
             "  </Choices>"]
    if masks:
        tag = "BrushLabels" if mask_as == "brush" else "PolygonLabels"
        lines.append(f'  <{tag} name="masks" toName="image">')
        for i, name in enumerate(classes):
            colour = _hex(palette[3 * (i + 1) : 3 * (i + 1) + 3])
            lines.append(f"    <Label value={quoteattr(name)} background={quoteattr(colour)}/>")
        lines.append(f"  </{tag}>")
    lines.append("</View>")
    return "\n".join(line for line in lines if line) + "\n"


def _write_labelstudio(inputs: Inputs, tmp: Path, summary: ExportSummary, progress: Progress) -> None:
    config = inputs.config
    version = _model_version(inputs)
    with open(tmp / "tasks.json", "w", encoding="utf-8") as fh:
        fh.write("[")
        first = True
        for record in _ok_records(inputs, summary, progress):
            w, h = record.width, record.height
            results: list[dict[str, Any]] = []
            if record.tags:
                scores = [s for _, s in record.tags if s is not None]
                results.append({"id": f"{summary.images}-tags", "from_name": "tags", "to_name": "image",
                                "type": "choices", "value": {"choices": [t for t, _ in record.tags]},
                                # the least certain tag: what a reviewer should look at
                                "score": min(scores) if scores else None})
            for k, region in enumerate(record.masks):
                mask = region.mask(h, w)
                common = {"from_name": "masks", "to_name": "image", "original_width": w, "original_height": h,
                          "image_rotation": 0, "score": region.score}
                summary.masks += 1
                if config.mask_as == "brush":
                    results.append({"id": f"{summary.images}-{k}", **common, "type": "brushlabels",
                                    "value": {"format": "rle", "rle": labelstudio_rle(mask),
                                              "brushlabels": [region.class_name]}})
                    summary.shapes += 1
                else:
                    for p, polygon in enumerate(mask_polygons(mask)):
                        points = [[round(100.0 * x / w, 4), round(100.0 * y / h, 4)] for x, y in polygon.tolist()]
                        results.append({"id": f"{summary.images}-{k}-{p}", **common, "type": "polygonlabels",
                                        "value": {"points": points, "closed": True,
                                                  "polygonlabels": [region.class_name]}})
                        summary.shapes += 1
            region_scores = [r.score for r in record.masks if r.score is not None]
            task = {"data": {"image": config.url_prefix + record.image_id, "tagclip_image_id": record.image_id},
                    "predictions": [{"model_version": version, "result": results,
                                     "score": float(np.mean(region_scores)) if region_scores else
                                     (results[0]["score"] if results else None)}]}
            fh.write(("" if first else ",\n") + json.dumps(task, ensure_ascii=False))
            first = False
            summary.images += 1
        fh.write("]\n")
    (tmp / "label_config.xml").write_text(
        labelstudio_config(inputs.classes, inputs.masks is not None, config.mask_as), encoding="utf-8")


def _write_cvat(inputs: Inputs, tmp: Path, summary: ExportSummary, progress: Progress) -> None:
    from tagclip_cli.writers import voc_palette

    palette = voc_palette()
    with open(tmp / "annotations.xml.body", "w", encoding="utf-8") as body:
        for record in _ok_records(inputs, summary, progress):
            body.write(f'  <image id="{summary.images}" name={quoteattr(record.image_id)} '
                       f'width="{record.width}" height="{record.height}">\n')
            for name, _score in record.tags:
                body.write(f'    <tag label={quoteattr(name)} source="auto">\n    </tag>\n')
            for z, region in enumerate(record.masks):
                mask = region.mask(record.height, record.width)
                x, y, bw, bh = (int(round(v)) for v in region.bbox)
                if bw <= 0 or bh <= 0:
                    continue
                score = "" if region.score is None else f"{region.score:.6f}"
                body.write(f'    <mask label={quoteattr(region.class_name)} source="auto" occluded="0" '
                           f'rle="{cvat_rle(mask, (x, y, bw, bh))}" left="{x}" top="{y}" width="{bw}" '
                           f'height="{bh}" z_order="{z}">\n'
                           f'      <attribute name="score">{score}</attribute>\n    </mask>\n')
                summary.masks += 1
                summary.shapes += 1
            body.write("  </image>\n")
            summary.images += 1
    labels = []
    for i, name in enumerate(inputs.classes):
        colour = _hex(palette[3 * (i + 1) : 3 * (i + 1) + 3])
        labels.append(f"        <label>\n          <name>{xml_escape(name)}</name>\n          <color>{colour}</color>\n"
                      "          <type>any</type>\n          <attributes>\n            <attribute>\n"
                      "              <name>score</name>\n              <mutable>False</mutable>\n"
                      "              <input_type>text</input_type>\n              <default_value></default_value>\n"
                      "              <values></values>\n            </attribute>\n          </attributes>\n"
                      "        </label>\n")
    head = ('<?xml version="1.0" encoding="utf-8"?>\n<annotations>\n  <version>1.1</version>\n  <meta>\n'
            f"    <task>\n      <name>{xml_escape(_model_version(inputs))} pseudo-labels</name>\n"
            f"      <size>{summary.images}</size>\n      <mode>annotation</mode>\n      <overlap>0</overlap>\n"
            f"      <labels>\n{''.join(labels)}      </labels>\n    </task>\n  </meta>\n")
    with open(tmp / "annotations.xml", "w", encoding="utf-8") as fh, \
            open(tmp / "annotations.xml.body", encoding="utf-8") as body:
        fh.write(head)
        while chunk := body.read(1 << 20):
            fh.write(chunk)
        fh.write("</annotations>\n")
    (tmp / "annotations.xml.body").unlink()


def _write_coco(inputs: Inputs, tmp: Path, summary: ExportSummary, progress: Progress) -> None:
    from tagclip_cli.fileio import json_scalar
    from tagclip_cli.writers import coco_categories

    record = inputs.masks.record if inputs.masks is not None else RecordIO.from_dict({})
    info = {"description": "tagclip export coco", "tool": record.tool, "version": record.tool_version,
            "tagclip": RecordIO.coco_info(record)}
    spool_path = tmp / "annotations.json.spool"
    ann_id = 0
    with open(tmp / "annotations.json", "w", encoding="utf-8") as fh, \
            open(spool_path, "w+", encoding="utf-8") as spool:
        fh.write('{"info": ' + json.dumps(info) + ', "licenses": [], "categories": ')
        fh.write(json.dumps(coco_categories(inputs.classes)))
        fh.write(', "images": [')
        for index, record in enumerate(inputs.records()):
            progress(1, inputs.count)
            image = {"id": index, "file_name": record.image_id, "width": record.width, "height": record.height,
                     "tagclip_image_id": record.image_id, "tagclip_status": record.status,
                     "tagclip_tags": [t for t, _ in record.tags]}
            if record.status != "ok":
                image["tagclip_error"] = record.error
                summary.skipped += 1
            else:
                summary.images += 1
            fh.write((", " if index else "") + json.dumps(image, ensure_ascii=False))
            for region in record.masks:
                ann_id += 1
                ann = {"id": ann_id, "image_id": index, "category_id": inputs.label_of(region) + 1,
                       "segmentation": {"size": [record.height, record.width], "counts": region.counts},
                       "area": region.area, "bbox": list(region.bbox), "iscrowd": 0,
                       "score": json_scalar(region.score)}
                spool.write((", " if ann_id > 1 else "") + json.dumps(ann))
                summary.masks += 1
        fh.write('], "annotations": [')
        spool.seek(0)
        while chunk := spool.read(1 << 20):
            fh.write(chunk)
        fh.write("]}\n")
    spool_path.unlink()


WRITERS = {"yolo": _write_yolo, "voc": _write_voc, "labelstudio": _write_labelstudio, "cvat": _write_cvat,
           "coco": _write_coco}
