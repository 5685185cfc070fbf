"""The Python API on in-memory images: a loaded model that tags and segments paths, PIL images or
arrays, batched inside, with the results in memory (docs/api.md).

    import tagclip_cli as tc
    model = tc.load_model("shapes-demo")
    tags = model.tag(images, tc.vocabulary("voc"))          # one ImageTags per image
    masks = model.segment(images, "voc")                    # one ImageMasks per image

The numbers are the commands' own: the same decoding, preprocessing, size bucketing and method
code as `tagclip annotate` / `tagclip segment` (pipeline.py), without the files. The commands
themselves, with their files, resume and shards, are `tagclip_cli.commands`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from tagclip_cli import defaults, methods
from tagclip_cli.backbone import Backbone
from tagclip_cli.commands import (
    check_segment_options,
    check_tag_method,
    class_thresholds,
    model_options,
    piaa_job_options,
    segment_config,
    tagclip_config,
    vocabulary,
)
from tagclip_cli.data import DecodedImage, ImageDataset, Preprocess, bucket_batches, decoded, to_device
from tagclip_cli.faults import OomSplitter
from tagclip_cli.formats import FileTags
from tagclip_cli.jobs.runner import WINDOW_BATCHES
from tagclip_cli.pipeline import SegResult, TagResult, segment_images, tag_images
from tagclip_cli.quirks import Quirks
from tagclip_cli.sources import ImageItem
from tagclip_cli.tagclip import TagCLIPConfig, Tagger
from tagclip_cli.vocab import Vocabulary

ImageInput = str | os.PathLike | Image.Image | np.ndarray


@dataclass(frozen=True)
class ImageTags:
    """TagCLIP's answer for one image: the tags (class names, vocabulary order) and the fused score
    of every class in [0, 1] (what the tags Parquet's `scores` column holds); or why it has none
    (error: an unreadable file), with no tags and no scores. width, height: the image's size."""

    tags: list[str]
    scores: dict[str, float]
    width: int | None
    height: int | None
    error: str | None = None


@dataclass(frozen=True)
class ImageMasks:
    """The segmentation of one image.

    label_map: (H, W) int32 at the image size, 0 = background, c + 1 = vocabulary class c (what
    `segment --png-dir` writes). masks: class name -> (H, W) bool mask of each class present.
    scores: class name -> the mask's score (as in the COCO JSON). tags: the classes segmented
    (TagCLIP's tags, the ones given, or for the dense baselines the classes present);
    tag_scores: TagCLIP's fused score of every class when it ran, else None. error: why the image
    has no masks (then label_map is None)."""

    label_map: np.ndarray | None
    masks: dict[str, np.ndarray]
    scores: dict[str, float]
    tags: list[str]
    tag_scores: dict[str, float] | None
    error: str | None = None


def load_model(name: str | None = None, pretrained: str = defaults.PRETRAINED, checkpoint: str | Path | None = None,
               device: str = defaults.DEVICE, precision: str = defaults.PRECISION,
               cache_dir: str | Path | None = None) -> Model:
    """A CLIP ViT ready to tag and segment, loaded as `--model/--pretrained/--checkpoint` load it.

    name: an open_clip model (default the paper's ViT-B-16) or a built-in one ("shapes-demo", the
    offline demo); pretrained: open_clip's weights tag ("random": seeded random weights, tests
    only); checkpoint: a weights file instead (OpenAI .pt, open_clip .bin / .safetensors).
    device: "auto" (CUDA when available), "cpu", "cuda", "cuda:N"; precision: fp32, bf16, fp16.
    cache_dir: the text-embedding cache (default ~/.cache/tagclip)."""
    return Model(model_options(name, pretrained, checkpoint, device, cache_dir, precision).load())


class Model:
    """A loaded CLIP (`load_model`) with TagCLIP tagging and CLS-SEG / baseline segmentation."""

    def __init__(self, backbone: Backbone) -> None:
        self.backbone = backbone

    def __repr__(self) -> str:
        return f"Model({self.backbone.identity()}, device={self.backbone.device})"

    def tag(self, images: Sequence[ImageInput], vocab, *, tag_threshold: float = defaults.TAG_THRESHOLD,
            thresholds: str | Path | None = None, reference_compat: bool = False, no_background: bool = False,
            config: TagCLIPConfig | None = None, batch_size: int = defaults.BATCH_SIZE,
            max_side: int = defaults.MAX_SIDE, method: str = defaults.TAG_METHOD, setting: str | None = None,
            dense: str | None = None, bank_size: int | None = None, piaa_model: str | Path | None = None,
            fit_on: Sequence[ImageInput] | None = None) -> list[ImageTags]:
        """Tag images (paths, PIL images or (H, W, 3) uint8 arrays): one ImageTags per image, in order.

        vocab: anything `vocabulary` takes. tag_threshold, thresholds (a per-class file),
        reference_compat, no_background: as annotate's options; config: a full TagCLIPConfig instead.
        method="piaa": PIAA, fitted on the images themselves (or on fit_on, other images), or
        scoring with piaa_model (a model file of `annotate --method piaa`); setting, dense,
        bank_size as annotate's options."""
        voc = vocabulary(vocab, no_background=no_background)
        piaa = {"dense": dense, "setting": setting, "bank_size": bank_size, "piaa_model": piaa_model,
                "fit_on": None if fit_on is None else "images"}
        check_tag_method(method, piaa, None)
        if method == "piaa":
            cfg = TagCLIPConfig(tag_threshold=tag_threshold,
                                class_thresholds=class_thresholds(thresholds, voc.classes, tag_threshold))
            options = piaa_job_options(cfg, dense, setting, bank_size, piaa_model, None)
            return self._tag_piaa(images, voc, options, fit_on, batch_size)
        if config is None:
            config = TagCLIPConfig(tag_threshold=tag_threshold, use_background=not no_background,
                                   class_thresholds=class_thresholds(thresholds, voc.classes, tag_threshold))
        tagger = Tagger(self.backbone, voc, config, quirks=Quirks(reference_compat))
        results = self._map(images, lambda batch: tag_images(tagger, batch), batch_size, max_side, keep_rgb=False)
        return [_image_tags(result, voc) for result in results]

    def _tag_piaa(self, images: Sequence[ImageInput], voc: Vocabulary, options, fit_on: Sequence[ImageInput] | None,
                  batch_size: int) -> list[ImageTags]:
        """PIAA on in-memory images: the fit (one bank over fit_on, else images) or the model file,
        then the scores; batched as annotate --method piaa batches."""
        from tagclip_cli.piaa import PiaaModel
        from tagclip_cli.piaajob import BankFitter, CropPreprocess, check_model_file, fit_identity, score_images

        runner = methods.get("piaa", "tags").build(self.backbone, voc, options.config, quirks=Quirks())
        crop = CropPreprocess(self.backbone.patch_size, self.backbone.mean, self.backbone.std,
                              size=options.config.input_size)
        if options.model_file is not None:
            model, _ = check_model_file(options.model_file, fit_identity(self.backbone, runner))
        else:
            fitter = BankFitter(runner)
            with torch.inference_mode():
                for batch, _ in bucket_batches(_decode(images if fit_on is None else fit_on, crop, False), batch_size,
                                               batch_size * WINDOW_BATCHES):
                    good = [im for im in batch if im.error is None]
                    if good:
                        fitter.offer(good)
            model = PiaaModel.from_state(fitter.fit())
        results = self._map(images, lambda batch: score_images(runner, model, batch), batch_size, None,
                            keep_rgb=False, preprocess=crop)
        return [_image_tags(result, voc) for result in results]

    def segment(self, images: Sequence[ImageInput], vocab, tags: Sequence[Sequence[str]] | None = None,
                method: str = defaults.SEGMENT_METHOD, *, setting: str = defaults.SEGMENT_SETTING, crf: bool = False,
                key_smoothing: bool = False, prompt_denoising: bool = False, rcs: bool = False,
                reference_compat: bool = False, tag_threshold: float | None = None, no_background: bool = False,
                batch_size: int = defaults.BATCH_SIZE, max_side: int = defaults.MAX_SIDE) -> list[ImageMasks]:
        """Segment images: one ImageMasks per image, in order.

        tags: the class names to segment in each image, one list per image (None: TagCLIP tags
        them first, in the same dense forward; an empty list: all background). method: a registered mask method
        (`tagclip_cli.methods.names("masks")`: clses = CLS-SEG, the paper's, maskclip, sclip,
        clearclip, naclip, resclip, scclip, and plug-ins); rcs: ResCLIP's RCS + SFR on sclip / clearclip /
        naclip; setting: voc, coco or cocostuff; the other options as
        `segment`'s."""
        voc = vocabulary(vocab, no_background=no_background)
        paths = {"out": None, "tags_in": None if tags is None else "tags", "tags_out": None, "save_cams": None}
        check_segment_options(method, setting, crf, paths, False, key_smoothing, prompt_denoising, None)
        seg_cfg = segment_config(setting, method, crf, key_smoothing, prompt_denoising, rcs=rcs)
        tag_cfg = tagclip_config(setting, tag_threshold, no_background)
        segmenter = methods.get(method, "masks").build(self.backbone, voc, seg_cfg, quirks=Quirks(reference_compat),
                                                       tagclip=tag_cfg, run_tagclip=tags is None)
        given = None if tags is None else GivenTags(voc, tags)
        results = self._map(images, lambda batch: segment_images(segmenter, batch, given), batch_size, max_side,
                            keep_rgb=segmenter.needs_rgb)
        return [_image_masks(result, voc) for result in results]

    def _map(self, images: Sequence[ImageInput], mapper: Callable[[list[DecodedImage]], list[TagResult]],
             batch_size: int, max_side: int | None, keep_rgb: bool, preprocess: Preprocess | None = None) -> list:
        """Decode the images and run `mapper` on same-size batches (as a job does: `bucket_batches`
        over windows of WINDOW_BATCHES batches, halves on out-of-memory); results in input order."""
        device = self.backbone.device
        preprocess = preprocess or Preprocess(self.backbone.patch_size, self.backbone.mean, self.backbone.std, max_side)
        split = OomSplitter(lambda batch: mapper(to_device(batch, device)))
        results: list = [None] * len(images)
        records = _decode(images, preprocess, keep_rgb)
        with torch.inference_mode():
            for batch, _ in bucket_batches(records, batch_size, batch_size * WINDOW_BATCHES):
                for result in split(batch) if batch else ():
                    results[result.image.item.index] = result
        return results


class GivenTags:
    """The tags a caller gives `Model.segment`, looked up like a tags file (formats.TagsFile)."""

    def __init__(self, vocab: Vocabulary, tags: Sequence[Sequence[str]]) -> None:
        index = {name: c for c, name in enumerate(vocab.classes)}
        self.entries = []
        for names in tags:
            unknown = [name for name in names if name not in index]
            if unknown:
                raise ValueError(f"tags not in the vocabulary: {', '.join(unknown)}")
            self.entries.append(FileTags([index[name] for name in names], list(names), None))

    def lookup(self, item: ImageItem) -> FileTags:
        """The image's tags; none (the image is all background) stand aside as NO_TAGS."""
        if item.index >= len(self.entries):
            raise ValueError(f"tags given for {len(self.entries)} images, not for image {item.index}")
        entry = self.entries[item.index]
        return entry if entry.tags else FileTags([], [], None, NO_TAGS)


NO_TAGS = "no tags given for this image"


def _decode(images: Sequence[ImageInput], preprocess: Preprocess, keep_rgb: bool) -> Iterator[DecodedImage]:
    """Each input decoded as a job decodes a file (paths: the same code; PIL images and arrays:
    EXIF orientation and colour mode as for a file), one by one in order."""
    for index, image in enumerate(images):
        if isinstance(image, str | os.PathLike):
            yield ImageDataset([ImageItem(index, str(image), str(image))], preprocess, keep_rgb)[0]
            continue
        if isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        elif not isinstance(image, Image.Image):
            raise TypeError(f"image {index}: a path, a PIL image or an array, not {type(image).__name__}")
        yield decoded(ImageItem(index, f"image-{index}", f"<image {index}>"), ImageOps.exif_transpose(image),
                      preprocess, keep_rgb)


def _scores(names: Sequence[str], scores) -> dict[str, float] | None:
    if scores is None:
        return None
    values = scores.tolist() if isinstance(scores, torch.Tensor) else list(scores)
    return dict(zip(names, values, strict=True))


def _image_tags(result: TagResult, voc: Vocabulary) -> ImageTags:
    image = result.image
    return ImageTags(list(result.tags), _scores(voc.classes, result.scores) or {}, image.width, image.height,
                     result.error)


def _image_masks(result: SegResult, voc: Vocabulary) -> ImageMasks:
    if result.error == NO_TAGS:  # nothing to segment: every pixel is background
        return ImageMasks(np.zeros((result.image.height, result.image.width), np.int32), {}, {}, [], None)
    if result.error is not None:
        return ImageMasks(None, {}, {}, [], None, result.error)
    label_map = result.label_map
    present = [label for label in np.unique(label_map).tolist() if label > 0]
    masks = {voc.classes[label - 1]: label_map == label for label in present}
    scores = {voc.classes[label - 1]: float(result.mask_scores[label]) for label in present}
    return ImageMasks(label_map, masks, scores, list(result.tags), _scores(voc.classes, result.scores))
