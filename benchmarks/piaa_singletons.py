"""PIAA's quirk Q5 decided on the shipped shapes-demo model (docs/algorithm.md §10 Q5): is a
refinement group of one patch better kept (its class mean is that patch) or dropped (its class
falls back to its text embedding, as the authors' NaN std does)?

Natural groups of one do not occur on the demo model, so for each class in turn its kept group is
cut to its most confident patch and the discriminant refitted with that patch kept or dropped; the
class's own AP (and the mAP) over the scenes is printed for both.

    .venv/bin/python benchmarks/piaa_singletons.py                     # 200 scenes, seed 7000, K 64
    .venv/bin/python benchmarks/piaa_singletons.py --scenes 200 --seed 8000 --bank-size 64
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from tagclip_cli import piaa, synthetic
from tagclip_cli.backbone import load_backbone
from tagclip_cli.evaluate.metrics import ap_per_class
from tagclip_cli.vocab import load_vocabulary


def features(runner: piaa.Piaa, scenes, batch: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, P, D) patch features and (N, D) class tokens of the scenes' crops."""
    crops = torch.stack([runner.crop(s.image) for s in scenes])
    with torch.inference_mode():
        patches = torch.cat([runner.patch_features(crops[i:i + batch]).cpu() for i in range(0, len(crops), batch)])
        cls = torch.cat([runner.backbone.encode_image(crops[i:i + batch]).cpu() for i in range(0, len(crops), batch)])
    return patches, cls


def refit_with_one(f, q, keep, members, best, keep_it: bool, text):
    """The refit with class c's kept group cut to its best patch, kept or dropped."""
    k = keep.clone()
    k[members] = False
    if keep_it:
        k[best] = True
    qq = q[k]
    groups = qq.argmax(-1)
    return piaa.PiaaModel(*piaa.discriminant(f[k], groups, qq.gather(1, groups[:, None])[:, 0], text))


def run(setting: str, patches, cls, text, labels, bank_size: int) -> str:
    cfg = piaa.PiaaConfig.published(setting, bank_size=bank_size)
    n, p = patches.shape[:2]
    bank = piaa.PatchBank.empty(bank_size, patches.shape[-1])
    piaa.offer_patches(bank, patches, text, cfg, torch.arange(n)[:, None] * p + torch.arange(p))
    f = bank.features
    w, b = piaa.discriminant(f, bank.label, bank.weight, text)
    keep, q = piaa.refine(f, w, b, cfg.refine_temperature)
    groups = (f @ w + b).argmax(-1)
    natural = int((torch.bincount(groups, minlength=text.shape[0]) == 1).sum())
    own = {True: [], False: []}
    mean = {True: [], False: []}
    for c in range(text.shape[0]):
        members = torch.nonzero((groups == c) & keep)[:, 0]
        if len(members) == 0:
            continue
        best = members[q[members, c].argmax()]
        for keep_it in (True, False):
            model = refit_with_one(f, q, keep, members, best, keep_it, text)
            ap = ap_per_class(piaa.piaa_scores(cls, patches, text, model, cfg).numpy(), labels)
            own[keep_it].append(ap[c])
            mean[keep_it].append(np.nanmean(ap))
    kept, dropped = np.array(own[True]), np.array(own[False])
    return (f"{setting}: natural groups of one {natural}; class's own AP kept {100 * np.nanmean(kept):.1f}, dropped "
            f"{100 * np.nanmean(dropped):.1f} (kept better for {int((kept > dropped).sum())}/{len(kept)} classes); "
            f"mAP kept {100 * np.mean(mean[True]):.1f}, dropped {100 * np.mean(mean[False]):.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=200)
    parser.add_argument("--seed", type=int, default=7000)
    parser.add_argument("--bank-size", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)
    backbone = load_backbone(model="shapes-demo", device="cpu")
    vocab = load_vocabulary("shapes")
    runner = piaa.Piaa(backbone, vocab, piaa.PiaaConfig())
    scenes = [synthetic.generate_scene(i, seed=args.seed) for i in range(args.scenes)]
    patches, cls = features(runner, scenes)
    labels = np.array([[name in s.objects for name in vocab.classes] for s in scenes])
    for setting in ("voc", "coco"):
        print(f"{args.scenes} scenes, seed {args.seed}, K {args.bank_size}, "
              + run(setting, patches, cls, runner.text.cpu(), labels, args.bank_size), flush=True)


if __name__ == "__main__":
    main()
