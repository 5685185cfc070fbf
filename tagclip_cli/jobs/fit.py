"""The fit pass of a method that learns from a collection before it scores one (PIAA: `annotate
--method piaa`): every part of the work (a torchrun rank, a `--shard`) folds the images it owns
into a state, saved beside the output and resumed after a kill; the parts' states merge; the
fitted model is written once, atomically, and reused: a finished fit is never redone.

Files (safetensors: named tensors plus one JSON metadata object, key "tagclip"):
- the work directory (`FitSpec.work`, e.g. OUT.piaa.parts/) holds `state-<rank>-of-<world>.safetensors`,
  one per part: its state, the fit's identity, `done` (how many of the part's images, in index
  order, are folded in: always whole windows) and `finished`;
- the model file (`FitSpec.model`, e.g. OUT.piaa.safetensors) holds the model's tensors and the
  identity; written byte-identically for the same fit, so its sha256 names the fit.

The identity (JSON) is what determines the fit: the caller's (model, vocabulary, settings) plus
the input list's digest (`inputs`). A part or a model of another identity is refused (--overwrite
starts over). Images are dealt by window as for the results (`Placement.owns`) and batched by
`bucket_batches`, so a part's state depends only on its images; the method's merge must make the
union exact (PIAA: the top-K of the union), so any split fits the same model.

Protocol (docs/scaleout.md): a run folds its part in, then waits for the other ranks of its
process group; when every part of its split is finished, its leader merges them, writes the model
and removes the work directory. A `--shard` whose fellow shards have not finished stops there with a
note: the shards' second run (the same command) finds the model and scores.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from torch import Tensor

from tagclip_cli.data import DecodedImage, bucket_batches
from tagclip_cli.errors import ConfigMismatchError, FormatError
from tagclip_cli.faults import deferred_signals
from tagclip_cli.fileio import atomic_path
from tagclip_cli.jobs.session import Session
from tagclip_cli.record import differing_keys
from tagclip_cli.sources import ImageItem

log = logging.getLogger(__name__)

MODEL_FORMAT = "tagclip-fit"
META_KEY = "tagclip"  # the one metadata key of the safetensors files (a JSON object)
STATE_NAME = re.compile(r"state-(\d+)-of-(\d+)\.safetensors$")


class Fitter(Protocol):
    """What a method gives the fit pass: fold a batch in, its state as named tensors (to save, to
    restore, to merge another part's), and the fitted model's tensors."""

    def offer(self, images: list[DecodedImage]) -> None: ...

    def state(self) -> dict[str, Tensor]: ...

    def restore(self, state: dict[str, Tensor]) -> None: ...

    def merge(self, state: dict[str, Tensor]) -> None: ...

    def fit(self) -> dict[str, Tensor]: ...


@dataclass(frozen=True)
class FitSpec:
    """One fit: its images, where its parts and model live, its identity (JSON, see the module
    docstring; `inputs` is added here), the batching (window: images per window, as the results'),
    how many images a part folds in between two saves, and --overwrite."""

    items: Sequence[ImageItem]
    work: Path
    model: Path
    identity: dict
    batch_size: int
    window: int
    checkpoint: int = 256
    overwrite: bool = False

    @property
    def full_identity(self) -> dict:
        return {**self.identity, "inputs": inputs_identity(self.items)}


def inputs_identity(items: Sequence[ImageItem]) -> dict:
    """{"images": n, "sha256": digest of every item's index, id and path}."""
    digest = hashlib.sha256()
    for it in items:
        digest.update(f"{it.index}\t{it.image_id}\t{it.path}\n".encode("utf-8", "surrogatepass"))
    return {"images": len(items), "sha256": digest.hexdigest()}


# ---- the files ------------------------------------------------------------------------------------

def _save(path: Path, tensors: dict[str, Tensor], metadata: dict) -> None:
    """Tensors and metadata, atomically. The metadata goes in as one JSON string with sorted keys:
    safetensors writes several metadata keys in no fixed order, and the model file must be the
    same bytes for the same fit."""
    from safetensors.torch import save_file

    header = {META_KEY: json.dumps(metadata, sort_keys=True)}
    with deferred_signals(), atomic_path(path) as tmp:  # a Ctrl-C lets the file finish first
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=header)


def _load(path: Path, tensors: bool = True) -> tuple[dict[str, Tensor], dict]:
    """(tensors, metadata) of a safetensors file (tensors False: the metadata only); FormatError
    (one line) when it is not one."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            header = (fh.metadata() or {}).get(META_KEY)
            return {k: fh.get_tensor(k) for k in fh.keys()} if tensors else {}, json.loads(header) if header else {}
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise FormatError(f"{path}: not a fitted model or fit state file ({exc})") from None


def write_model(path: Path, tensors: dict[str, Tensor], identity: dict) -> None:
    """The model file, atomically (same tensors and identity: the same bytes)."""
    _save(path, tensors, {"format": MODEL_FORMAT, "version": 1, "identity": identity})


def read_model(path: Path) -> tuple[dict[str, Tensor], dict]:
    """(tensors, identity) of a model file; FormatError naming the file when it is not one."""
    tensors, meta = _load(path)
    if meta.get("format") != MODEL_FORMAT or "identity" not in meta:
        raise FormatError(f"{path}: not a fitted model file of tagclip (no '{MODEL_FORMAT}' metadata)")
    return tensors, meta["identity"]


def finished_model(spec: FitSpec) -> dict[str, Tensor] | None:
    """The model's tensors when spec.model holds this very fit; None when there is no model file.
    A model of another fit is refused (ConfigMismatchError)."""
    if not spec.model.exists():
        return None
    tensors, identity = read_model(spec.model)
    wanted = spec.full_identity
    if identity != wanted:
        raise ConfigMismatchError(f"{spec.model}: a model fitted with a different configuration is there (differs "
                                  f"in: {', '.join(differing_keys(identity, wanted))}); rerun with the same options, "
                                  "or pass --overwrite to fit again")
    return tensors


# ---- the pass -------------------------------------------------------------------------------------

@dataclass
class FitOutcome:
    """The fitted model's tensors, or None with a note (a --shard waiting for its fellow shards);
    folded: images this run folded in (not counting resumed ones), share: the images of its part."""

    model: dict[str, Tensor] | None
    note: str | None = None
    folded: int = 0
    share: int = 0


def run_fit(spec: FitSpec, sess: Session, records: Callable[[Sequence[ImageItem]], Iterable[DecodedImage]],
            fitter: Fitter, progress: Callable[[int], object] | None = None) -> FitOutcome:
    """The fit pass of this process (see the module docstring). records(items) yields the decoded
    images of items in order; progress(n) is told of images folded in (resumed ones first)."""
    placement = sess.placement
    if spec.overwrite:
        sess.leader_first(lambda: _remove(spec), lambda: None)
    model = finished_model(spec)
    if model is not None:
        return FitOutcome(model)
    spec.work.mkdir(exist_ok=True)
    mine = placement.share(spec.items, spec.window)  # positions over the list's columns
    part = spec.work / f"state-{placement.rank:05d}-of-{placement.world:05d}.safetensors"
    done, finished = _resume(part, spec, fitter)
    if progress:
        progress(done)
    folded = 0 if finished else _fold(spec, mine, done, records, fitter, part, progress)
    sess.gather(None)  # every rank of the group has saved its finished part
    model = sess.leader_first(lambda: _merge(spec, fitter, part, placement.world),
                              lambda: finished_model(spec))
    if model is None:
        note = (f"{placement.describe()} fitted its part of the PIAA fit ({spec.work}); the other shards have "
                "not finished theirs. When every shard has fitted, run each shard's command again: it scores")
        return FitOutcome(None, note, folded, len(mine))
    return FitOutcome(model, None, folded, len(mine))  # type: ignore[arg-type]


def _remove(spec: FitSpec) -> None:
    spec.model.unlink(missing_ok=True)
    shutil.rmtree(spec.work, ignore_errors=True)


def _resume(part: Path, spec: FitSpec, fitter: Fitter) -> tuple[int, bool]:
    """(images already folded in, finished) of this part, its state restored into fitter."""
    if not part.exists():
        return 0, False
    state, meta = _load(part)
    identity = meta.get("identity", {})
    if identity != spec.full_identity:
        raise ConfigMismatchError(f"{part}: an unfinished fit with a different configuration is there (differs in: "
                                  f"{', '.join(differing_keys(identity, spec.full_identity))}); rerun with the same "
                                  "options, or pass --overwrite")
    fitter.restore(state)
    done, finished = int(meta["done"]), bool(meta["finished"])
    log.info("resuming the fit from %s: %d images already folded in", part.name, done)
    return done, finished


def _fold(spec: FitSpec, mine: Sequence[ImageItem], done: int,
          records: Callable[[Sequence[ImageItem]], Iterable[DecodedImage]], fitter: Fitter, part: Path,
          progress: Callable[[int], object] | None) -> int:
    """Fold mine[done:] into fitter, saving the part every spec.checkpoint images (at a window's
    end, where the state holds whole windows) and once finished. Returns the images folded."""
    saved = seen = 0
    for batch, end in bucket_batches(records(mine[done:]), spec.batch_size, spec.window):
        good = [im for im in batch if im.error is None]
        if good:
            fitter.offer(good)
        seen += len(batch)
        if progress and batch:
            progress(len(batch))
        if end and seen - saved >= spec.checkpoint and done + seen < len(mine):
            _save_part(part, fitter, spec, done + seen, False)
            saved = seen
    _save_part(part, fitter, spec, done + seen, True)
    return seen


def _save_part(part: Path, fitter: Fitter, spec: FitSpec, done: int, finished: bool) -> None:
    _save(part, fitter.state(), {"identity": spec.full_identity, "done": done, "finished": finished})


def _merge(spec: FitSpec, fitter: Fitter, part: Path, world: int) -> dict[str, Tensor] | None:
    """On a group's leader: when every part of this split is finished, merge them into fitter,
    fit, write the model and remove the work directory; else None (other shards still fit)."""
    model = finished_model(spec)  # a fellow shard may have finished the fit meanwhile
    if model is not None:
        return model
    parts = {}
    for path in spec.work.glob("state-*.safetensors"):
        match = STATE_NAME.fullmatch(path.name)
        if match and int(match[2]) == world:
            parts[int(match[1])] = path
        elif match:
            log.warning("%s: the part of a fit split %s ways is left out (this run is split %d ways)", path,
                        match[2], world)
    try:
        if not all(_load(parts[r], tensors=False)[1].get("finished") is True for r in range(world) if r in parts) \
                or len(parts) < world:
            return None
        for rank in range(world):
            if parts[rank] != part:
                fitter.merge(_load(parts[rank])[0])
    except FileNotFoundError:  # a fellow shard finished the fit and removed the parts meanwhile
        return finished_model(spec)
    tensors = fitter.fit()
    write_model(spec.model, tensors, spec.full_identity)
    shutil.rmtree(spec.work, ignore_errors=True)
    log.info("fitted %s on %d images", spec.model, len(spec.items))
    return tensors
