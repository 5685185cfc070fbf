"""`tagclip evaluate`: ground-truth loaders, pure-numpy metrics and the evaluation driver.

Modules, each testable on its own:

* ``metrics`` (pure numpy): :func:`average_precision`, :func:`ap_per_class`, :func:`tag_prf`,
  :class:`ConfusionMatrix`.
* ``classes``: the datasets' class vocabularies and prediction-to-ground-truth name matching.
* ``ground_truth`` and ``datasets``: VOC XML (``xml.etree``), label PNGs (PIL), COCO instances JSON
  (read by ``tagclip_cli.formats``). Every loader yields :class:`GtImage` records in split order,
  image-level labels ``(N, F)`` and, where the dataset has them, one semantic map ``(H, W)`` at a
  time. ``datasets.REGISTRY`` maps each ``--gt`` name to its loader.
* ``predictions``: our tags Parquet and COCO RLE JSON (read by ``tagclip_cli.formats``), or a
  directory of label PNGs.
* ``report``: :func:`evaluate`, :func:`write_report`, :func:`render_report`.

Rules (they are also written into every JSON report):

* **AP** ("paper", docs/algorithm.md §6): per class, over all evaluated images, the mean of the
  precision at the rank of each positive. *Ties*: the reference sorts with ``torch.sort`` whose
  order among equal scores is undefined, so we define it: equal scores form one threshold, and
  every positive in a tied group gets the precision measured after the whole group. This is the
  convention of scikit-learn's ``average_precision_score`` (so the two agree with or without
  ties) and it is neither the optimistic nor the pessimistic order. Without ties it is exactly
  the reference formula. ``voc07`` is the 11-point interpolated variant (recall 0, 0.1, ..., 1).
* **Classes with no positive image** get no AP and are left out of the mean (the report lists
  them). The reference code would count them as 0; on the full VOC/COCO splits every class has
  positives, so the published numbers are the same either way.
* **Tags**: precision, recall and F1 of the ``tags`` column. "overall" pools every
  (image, class) cell (the reference's reported P/R/F1); "per-class" averages per-class precision
  and recall over classes with a positive and takes F1 of the two means (CP/CR/CF1).
* **mIoU**: one confusion matrix ``(K, K+1)`` accumulated over the whole set, one image at a time;
  ground-truth value 255 is ignored; the extra column counts pixels whose prediction is not one
  of the K classes (e.g. "background" on COCO-Stuff, which has no background class): they are
  misses for their ground-truth class and false positives for none. IoU_c = TP / (GT + Pred - TP);
  the mean is over classes with at least one ground-truth pixel (as the reference), background
  included when the dataset has it (VOC: 21 classes, COCO-Object: 81).
* **VOC difficult objects** (``voc2007``): counted as positives by default; ``negative`` or
  ``ignore`` (the image is left out of that class's AP and tag counts) on request.
* **COCO-Object maps** are rasterised from instance masks: background 0, category index + 1
  elsewhere; where instances overlap, the smaller instance (in pixels; ties: higher annotation id)
  is on top, since a small object overlapping a larger one is usually in front of it; crowd
  regions not covered by a non-crowd instance are ignored (255).
* **Image-level labels for COCO** come from every annotation, crowd ones included; the default
  COCO split is every image with at least one annotation (the reference lists: 40,137 images for
  val2014, 4,952 for val2017).
* **COCO-Stuff-27**: ground-truth PNGs hold the 182 fine ids (stuffthingmaps value = COCO-Stuff id
  - 1, 255 unlabeled), mapped to the 27 coarse classes. Segmentation predictions may use the 27
  coarse names or the (171 used) fine names, which are mapped to their coarse class. Tags are
  evaluated against the fine classes present in the map (171 classes), as the reference does.
"""


from tagclip_cli.evaluate.classes import (
    ALIAS_GROUPS,
    COCOSTUFF_COARSE_NAMES,
    COCOSTUFF_FINE_NAMES,
    COCOSTUFF_FINE_TO_COARSE,
    COCOSTUFF_UNUSED,
    VOC_CLASSES,
    ClassMatch,
    match_classes,
    name_key,
)
from tagclip_cli.evaluate.datasets import (
    DIFFICULT_MODES,
    GT_NAMES,
    REGISTRY,
    CocoInstances,
    Dataset,
    VocClassification,
    cocostuff27,
    folder_ground_truth,
    load_ground_truth,
    parse_voc_xml,
    rasterise_instances,
    voc2012_segmentation,
)
from tagclip_cli.evaluate.ground_truth import (
    RAW_IGNORE,
    GroundTruth,
    GtImage,
    ImageIndex,
    LabelMapDir,
    apply_split,
    read_label_png,
    read_split,
)
from tagclip_cli.evaluate.metrics import AP_VARIANTS, IGNORE, ConfusionMatrix, ap_per_class, average_precision, tag_prf
from tagclip_cli.evaluate.predictions import (
    CocoMaskPredictions,
    MaskPredictions,
    PngMaskPredictions,
    TagPredictions,
    open_mask_predictions,
    prediction_kind,
    read_tags_parquet,
)
from tagclip_cli.evaluate.report import (
    AP_DESCRIPTIONS,
    EvaluateConfig,
    Progress,
    evaluate,
    evaluate_masks,
    evaluate_tags,
    match_images,
    render_report,
    write_report,
)

__all__ = [
    "ALIAS_GROUPS", "AP_DESCRIPTIONS", "AP_VARIANTS", "COCOSTUFF_COARSE_NAMES", "COCOSTUFF_FINE_NAMES",
    "COCOSTUFF_FINE_TO_COARSE", "COCOSTUFF_UNUSED", "DIFFICULT_MODES", "GT_NAMES", "IGNORE", "RAW_IGNORE",
    "REGISTRY", "VOC_CLASSES", "ClassMatch", "CocoInstances", "CocoMaskPredictions", "ConfusionMatrix",
    "Dataset", "EvaluateConfig", "GroundTruth", "GtImage", "ImageIndex", "LabelMapDir", "MaskPredictions",
    "PngMaskPredictions", "Progress", "TagPredictions", "VocClassification", "ap_per_class", "apply_split",
    "average_precision", "cocostuff27", "evaluate", "evaluate_masks", "evaluate_tags",
    "folder_ground_truth", "load_ground_truth", "match_classes", "match_images", "name_key",
    "open_mask_predictions", "parse_voc_xml", "prediction_kind", "rasterise_instances", "read_label_png",
    "read_split", "read_tags_parquet", "render_report", "tag_prf", "voc2012_segmentation", "write_report",
]  # fmt: skip
