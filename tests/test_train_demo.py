"""The demo-model training script's bf16 mixed precision and the patch-alignment diagnostic's geometry."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))  # patch_alignment imports bench_synthetic
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY = {
    "embed_dim": 16,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
}


def _trainable_tiny(seed: int):
    """(open_clip CLIP of TINY's config seeded with seed, the tool's Backbone around it), gradients
    on (as training does: Backbone freezes its model)."""
    import open_clip

    from tagclip_cli.backbone import Backbone

    torch.manual_seed(seed)
    model = open_clip.CLIP(**TINY)
    bb = Backbone(model=model, tokenizer=None, name="tiny", weights="test", device=torch.device("cpu"), cache_dir=None)
    model.requires_grad_(True)
    return model, bb


def test_bf16_shadow_gives_fp32_master_grads_close_to_fp32() -> None:
    import open_clip

    train = _load("train_demo_clip")
    torch.manual_seed(0)
    master = open_clip.CLIP(**TINY)
    images, tokens = torch.randn(4, 3, 32, 32), torch.randint(1, 63, (4, 8))

    def loss_of(model, x):
        a = torch.nn.functional.normalize(model.encode_image(x).float(), dim=-1)
        b = torch.nn.functional.normalize(model.encode_text(tokens).float(), dim=-1)
        return open_clip.loss.ClipLoss()(a, b, model.logit_scale.float().exp())

    loss_of(master, images).backward()
    reference = {n: p.grad.clone() for n, p in master.named_parameters()}
    master.zero_grad(set_to_none=True)

    shadow = train.BF16Shadow(master)
    with torch.no_grad():  # the master moves on; sync_weights must carry that into the bf16 copy
        master.visual.proj.add_(0.01)
    shadow.sync_weights()
    assert shadow.model.visual.proj.dtype == torch.bfloat16
    assert torch.equal(shadow.model.visual.proj, master.visual.proj.to(torch.bfloat16))
    with torch.no_grad():
        master.visual.proj.sub_(0.01)
    shadow.sync_weights()
    loss_of(shadow.model, images.to(torch.bfloat16)).backward()
    shadow.grads_to_master()
    for name, p in master.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32, name
        ref = reference[name]
        if ref.abs().max() > 1e-6:  # bf16 has ~3 significant digits
            cos = torch.nn.functional.cosine_similarity(p.grad.flatten(), ref.flatten(), dim=0)
            assert cos > 0.95, (name, float(cos))
    assert all(p.grad is None for p in shadow.model.parameters())


def test_patch_coverage_shares() -> None:
    align = _load("patch_alignment")
    labels = np.zeros((32, 48), np.uint8)
    labels[:16, :8] = 2  # half of patch 0
    labels[16:, 32:] = 1  # all of patch 5
    cov = align.coverage(labels, 16, 3)
    assert cov.shape == (6, 4)
    assert cov.sum(axis=1) == pytest.approx(np.ones(6))
    assert cov[0, 2] == pytest.approx(0.5) and cov[5, 1] == pytest.approx(1.0) and cov[3, 0] == pytest.approx(1.0)


def test_patch_targets_are_pixel_shares_of_objects_then_stuff() -> None:
    from tagclip_cli.synthetic import OBJECT_CLASSES, STUFF_CLASSES, generate_scene

    train = _load("train_demo_clip")
    assert train.TARGET_CLASSES == OBJECT_CLASSES + STUFF_CLASSES
    from tagclip_cli.vocab import load_vocabulary

    assert load_vocabulary("shapes").all_names == train.TARGET_CLASSES  # the columns TagCLIP scores
    scene = generate_scene(3, seed=11)
    targets = train.patch_targets(scene, 16)
    assert targets.shape == (196, len(train.TARGET_CLASSES))
    assert targets.sum(axis=1) == pytest.approx(np.ones(196))
    nf = len(OBJECT_CLASSES)
    for name, area in zip(scene.objects, scene.areas, strict=True):  # object pixels, in patch units
        assert targets[:, OBJECT_CLASSES.index(name)].sum() * 256 == pytest.approx(area)
    background = (scene.label_map == 0).sum()
    assert targets[:, nf:].sum() * 256 == pytest.approx(background)
    assert set(np.nonzero(targets[:, nf:].sum(axis=0))[0]) <= {STUFF_CLASSES.index(s) for s in scene.stuff}


def test_patch_loss_reads_the_value_path_tokens_the_tagger_scores() -> None:
    train = _load("train_demo_clip")
    model, bb = _trainable_tiny(0)
    images = torch.randn(2, 3, 32, 32)
    patches, cls, attn = train.value_path_and_class_token(bb, images)
    with torch.no_grad():
        dense = bb.dense_forward(images)
        assert torch.allclose(patches, dense.tokens[:, 1:], atol=1e-5)
        assert torch.allclose(attn, dense.attn, atol=1e-6)
        assert torch.allclose(cls, model.encode_image(images), atol=1e-5)  # the ordinary class token
    text = torch.nn.functional.normalize(torch.randn(5, 16), dim=-1)
    targets = torch.softmax(torch.randn(2, 4, 5), dim=-1)
    loss = train.patch_loss(patches, text, targets, torch.tensor(10.0), object_weight=3.0)
    loss.backward()
    assert model.visual.transformer.resblocks[-1].attn.in_proj_weight.grad is not None  # v of block L
    assert model.visual.conv1.weight.grad.abs().sum() > 0
    # A perfect prediction of a one-hot target costs (almost) nothing.
    hot = torch.zeros(1, 1, 5)
    hot[0, 0, 2] = 1
    assert train.patch_loss(text[2].reshape(1, 1, 16), text, hot, torch.tensor(100.0), 3.0) < 1e-3


def test_attention_loss_rewards_attention_within_a_label() -> None:
    train = _load("train_demo_clip")
    # Two patches of class 0, two of class 1 (one-hot shares), one layer.
    targets = torch.tensor([[[1.0, 0], [1, 0], [0, 1], [0, 1]]])
    within = torch.zeros(1, 1, 5, 5)
    within[0, 0, 1:, 1:] = torch.tensor([[0.5, 0.5, 0, 0], [0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5], [0, 0, 0.5, 0.5]])
    across = torch.zeros(1, 1, 5, 5)
    across[0, 0, 1:, 1:] = torch.tensor([[0, 0, 0.5, 0.5], [0, 0, 0.5, 0.5], [0.5, 0.5, 0, 0], [0.5, 0.5, 0, 0]])
    uniform = torch.full((1, 1, 5, 5), 0.2)
    good = train.attention_loss(within, targets, slice(0, 1), 3.0)
    assert float(good) == pytest.approx(0.0, abs=1e-6)
    spread = train.attention_loss(uniform, targets, slice(0, 1), 3.0)
    assert spread > good
    assert train.attention_loss(across, targets, slice(0, 1), 3.0) > spread


def test_training_forward_pools_the_projected_patch_tokens_open_clip_gives() -> None:
    """The pooled loss trains the image feature CLS-SEG's Grad-CAM scores: the mean of the ordinary
    last block's projected patch tokens (the tokens open_clip's VisionTransformer returns, projected)."""
    train = _load("train_demo_clip")
    model, bb = _trainable_tiny(1)
    images = torch.randn(3, 3, 32, 32)
    out = train.training_forward(bb, images)
    model.visual.output_tokens = True
    with torch.no_grad():
        pooled, tokens = model.visual(images)
        assert torch.allclose(out.cls, pooled, atol=1e-5)
        # open_clip returns the patch tokens after ln_post, before the projection.
        assert torch.allclose(out.pooled, (tokens @ model.visual.proj).mean(dim=1), atol=1e-5)


def test_caption_classes_name_only_what_the_caption_says() -> None:
    from tagclip_cli.synthetic import OBJECT_CLASSES, generate_scene

    train = _load("train_demo_clip")
    names = train.TARGET_CLASSES
    two = train.caption_classes("a ring next to a star.")
    assert two[names.index("ring")] == pytest.approx(0.5) and two[names.index("star")] == pytest.approx(0.5)
    assert two.sum() == pytest.approx(1.0)
    stuff = train.caption_classes("a photo of the sky.")
    assert stuff[names.index("sky")] == 1.0 and stuff.sum() == 1.0
    assert train.caption_classes("a picture").sum() == 0
    for i in range(40):
        scene = generate_scene(i, seed=7)
        named = train.caption_classes(scene.caption)
        objects = [names[c] for c in np.nonzero(named[: len(OBJECT_CLASSES)])[0]]
        assert set(objects) <= set(scene.objects[:2]), scene.caption
        assert named.sum() == pytest.approx(1.0), scene.caption


def test_image_shares_lift_small_objects_and_sum_to_one() -> None:
    train = _load("train_demo_clip")
    targets = torch.zeros(1, 100, 4)
    targets[0, :1, 0] = 1  # 1% of the image
    targets[0, 1:25, 1] = 1  # 24%
    targets[0, 25:, 2] = 1  # 75%; class 3 absent
    shares = train.image_shares(targets)[0]
    assert float(shares.sum()) == pytest.approx(1.0)
    assert float(shares[3]) == 0.0
    assert 0 < shares[0] < shares[1] < shares[2]
    assert float(shares[0] / shares[2]) == pytest.approx((0.01 / 0.75) ** 0.5)


def test_soft_cross_entropy_skips_rows_without_a_target() -> None:
    train = _load("train_demo_clip")
    text = torch.nn.functional.normalize(torch.randn(5, 16), dim=-1)
    target = torch.zeros(2, 5)
    target[0, 3] = 1
    right = train.soft_cross_entropy(text[3:4].repeat(2, 1), text, target, torch.tensor(100.0))
    wrong = train.soft_cross_entropy(text[1:2].repeat(2, 1), text, target, torch.tensor(100.0))
    assert float(right) < 1e-3 < float(wrong)
    assert float(train.soft_cross_entropy(text[:2], text, torch.zeros(2, 5), torch.tensor(1.0))) == 0.0


def test_init_loads_a_saved_checkpoint(tmp_path, monkeypatch) -> None:
    import open_clip

    train = _load("train_demo_clip")
    monkeypatch.setattr(train, "MODEL_CONFIG", TINY)
    torch.manual_seed(2)
    saved = open_clip.CLIP(**TINY)
    train.save_checkpoint(saved, tmp_path, 3)
    fresh = open_clip.CLIP(**TINY)
    digest = train.load_init(fresh, tmp_path / "shapes-demo.safetensors")
    assert len(digest) == 64
    for (name, a), b in zip(saved.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a.half().float(), b), name
    other = open_clip.CLIP(**{**TINY, "vision_cfg": {**TINY["vision_cfg"], "layers": 1}})
    train.save_checkpoint(other, tmp_path / "other", 1)
    with pytest.raises(SystemExit, match="not a shapes-demo checkpoint"):
        train.load_init(fresh, tmp_path / "other" / "shapes-demo.safetensors")


@pytest.mark.parametrize("choice", ["dmar", "caa"])
def test_attention_loss_layers_follow_dmar_or_clsseg_caa_range(monkeypatch, choice) -> None:
    """--attention-layers caa trains the layers CLS-SEG's CAA averages (1-based L-7..L-1, clamped)."""
    train = _load("train_demo_clip")
    monkeypatch.setattr(train, "MODEL_CONFIG", {**TINY, "vision_cfg": {**TINY["vision_cfg"], "layers": 8}})
    args = train.parse_args(["--attention-layers", choice, "--precision", "fp32"])
    trainer = train.Trainer(args, tokenizer=None)
    from tagclip_cli.methods.clses import ClsSegConfig

    lo, hi = ClsSegConfig().layers_for(8)
    expected = slice(lo - 1, hi) if choice == "caa" else slice(4, 7)
    assert trainer.attention_layers == expected
    assert len(range(8)[trainer.attention_layers]) == (7 if choice == "caa" else 3)


def test_object_priority_counts_object_pixels_more_and_keeps_distributions() -> None:
    train = _load("train_demo_clip")
    from tagclip_cli.synthetic import OBJECT_CLASSES

    n_obj = len(OBJECT_CLASSES)
    shares = torch.zeros(1, 3, 18)
    shares[0, 0, 3], shares[0, 0, n_obj] = 0.25, 0.75  # a quarter of an object on stuff
    shares[0, 1, n_obj + 1] = 1.0  # stuff only
    shares[0, 2, 0], shares[0, 2, 5] = 0.5, 0.5  # two objects
    assert train.object_priority(shares, 1.0) is shares
    weighted = train.object_priority(shares, 4.0)
    assert float(weighted[0, 0, 3]) == pytest.approx(4 / 7)
    assert torch.equal(weighted[0, 1], shares[0, 1])
    assert torch.allclose(weighted[0, 2], shares[0, 2])
    assert torch.allclose(weighted.sum(dim=-1), torch.ones(1, 3))


def test_cam_loss_trains_the_grad_cams_clsseg_reads() -> None:
    """The Grad-CAM loss sees exactly CLS-SEG's Grad-CAM of each object (methods.clses.grad_cams:
    softmax over the image's objects and the background classes), and trains the last block through
    the cams' channel weights (double backward)."""
    from tagclip_cli.methods.clses import grad_cams
    from tagclip_cli.synthetic import OBJECT_CLASSES

    train = _load("train_demo_clip")
    model, bb = _trainable_tiny(2)
    images = torch.randn(2, 3, 32, 32)
    n_obj = len(OBJECT_CLASSES)
    shares = torch.zeros(2, 4, 18)  # 2 images, 2x2 patches
    shares[0, :, 2] = torch.tensor([0.5, 0, 0, 0.25])
    shares[0, :, 5] = torch.tensor([0, 0.5, 0, 0])
    shares[1, :, 7] = torch.tensor([0, 0, 1, 0.5])
    shares[:, :, n_obj] = 1 - shares.sum(dim=-1)
    text = torch.nn.functional.normalize(torch.randn(18, 16), dim=-1)
    scale = model.logit_scale.exp().detach()
    out = train.training_forward(bb, images)
    slots = train.slot_cams(out, text, shares, scale)
    assert len(slots) == 2 and slots[1][2].tolist() == [True, False]
    with torch.no_grad():
        dense = bb.dense_forward(images, keep_pre_last=True)
    for b, classes in ((0, [2, 5]), (1, [7])):
        rows = classes + list(range(n_obj, 18))
        ref = grad_cams(bb, dense.pre_last[b], text[rows], len(classes))
        low, high = ref.amin(dim=1, keepdim=True), ref.amax(dim=1, keepdim=True)
        ref = (ref - low) / (high - low + 1e-5)
        for k, cls in enumerate(classes):
            cam, target, has = slots[k]
            assert bool(has[b])
            assert torch.allclose(cam[b].detach(), ref[k], atol=1e-5), (b, k, cam[b], ref[k])
            assert torch.equal(target[b], shares[b, :, cls])
    train.cam_loss(out, text, shares, scale).backward()
    # The last block's attention reaches the cams only through their channel weights (the gradient).
    assert model.visual.transformer.resblocks[-1].attn.in_proj_weight.grad.abs().sum() > 0


def test_local_score_loss_scores_what_dmar_would_without_its_masks() -> None:
    """The local-score loss reads TagCLIP's own first refinement (docs/algorithm.md §3: the mean of
    the maps of layers L-3..L-1 times P_coarse; k = 0 turns the vote mask off) and its maximum over
    patches per object class (§4), and scores it against which objects the scene holds."""
    from tagclip_cli.synthetic import OBJECT_CLASSES
    from tagclip_cli.tagclip import coarse_scores, layer_range, refined_attention

    train = _load("train_demo_clip")
    model, bb = _trainable_tiny(3)
    images = torch.randn(2, 3, 32, 32)
    n_obj = len(OBJECT_CLASSES)
    shares = torch.zeros(2, 4, 18)
    shares[0, :, 4] = torch.tensor([0.5, 0, 0, 0])
    shares[1, :, 9] = torch.tensor([0, 1.0, 0.25, 0])
    shares[:, :, n_obj + 2] = 1 - shares.sum(dim=-1)
    text = torch.nn.functional.normalize(torch.randn(18, 16), dim=-1)
    scale = model.logit_scale.exp().detach()
    out = train.training_forward(bb, images)
    layers = layer_range((-3, -1), bb.num_layers)
    locals_ = []
    for b in range(2):
        attn = out.attn[b, :, 1:, 1:].detach().float()
        first = refined_attention(attn, layers, 0) @ coarse_scores(out.patches[b].detach(), text, float(scale))
        locals_.append(first[:, :n_obj].amax(dim=0))
    expected = torch.nn.functional.binary_cross_entropy(
        torch.stack(locals_).clamp(1e-6, 1 - 1e-6), (shares[..., :n_obj].sum(dim=1) > 0).float())
    trainer_layers = slice(max(0, bb.num_layers - 4), bb.num_layers - 1)
    loss = train.local_score_loss(out, text, shares, scale, trainer_layers)
    assert torch.allclose(loss.detach(), expected, atol=1e-6), (loss, expected)
    # Another scene content gives another loss: the presence targets are read.
    other = shares.clone()
    other[0, :, 4], other[0, :, 5] = 0, shares[0, :, 4]
    assert not torch.allclose(train.local_score_loss(out, text, other, scale, trainer_layers).detach(), expected)
    loss.backward()
    assert model.visual.transformer.resblocks[0].attn.in_proj_weight.grad.abs().sum() > 0


def test_crop_loss_classifies_cwr_crops_of_the_scene_objects() -> None:
    """The crop loss cuts, per scene, one present object's CWR crop (the box around the patches whose
    normalised share of it is above CWR's 0.5, docs/algorithm.md §5) and scores the class token of
    Backbone.masked_cls_forward on it against that object (P_global's softmax)."""
    from tagclip_cli.synthetic import OBJECT_CLASSES

    train = _load("train_demo_clip")
    model, bb = _trainable_tiny(4)
    images = torch.randn(3, 3, 32, 32)
    n_obj = len(OBJECT_CLASSES)
    shares = torch.zeros(3, 4, 18)  # 2x2 patches
    shares[0, :, 6] = torch.tensor([0, 0.8, 0, 0.5])  # right column
    shares[1, :, 2] = torch.tensor([0.1, 0, 0, 0])  # a small object in one patch: the box is that patch
    shares[:, :, n_obj + 1] = 1 - shares.sum(dim=-1)  # scene 2: stuff only, no crop
    crops, masks, classes = train.cwr_crops(bb, images, shares, np.random.default_rng(0))
    assert classes.tolist() == [6, 2]
    # Scene 0's box is the right column (both patches above half the max share): its pixels, resized.
    expected = torch.nn.functional.interpolate(images[0:1, :, :, 16:], size=(32, 32), mode="bilinear",
                                               align_corners=False)[0]
    assert torch.allclose(crops[0], expected, atol=1e-6)
    assert masks[0].all() and masks[1].all()
    assert torch.allclose(crops[1], torch.nn.functional.interpolate(
        images[1:2, :, :16, :16], size=(32, 32), mode="bilinear", align_corners=False)[0], atol=1e-6)
    text = torch.nn.functional.normalize(torch.randn(18, 16), dim=-1)
    scale = model.logit_scale.exp().detach()
    loss = train.crop_loss(bb, images, shares, text, scale, np.random.default_rng(0))
    with torch.no_grad():
        logits = scale * torch.nn.functional.normalize(bb.masked_cls_forward(crops, masks), dim=-1) @ text.T
    assert torch.allclose(loss.detach(), torch.nn.functional.cross_entropy(logits, classes), atol=1e-5)
    loss.backward()
    assert model.visual.class_embedding.grad.abs().sum() > 0
