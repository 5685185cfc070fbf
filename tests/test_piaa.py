"""PIAA's steps (tagclip_cli/piaa.py) against head-by-head naive versions on small tensors."""

from __future__ import annotations

import math
import random
import statistics

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tagclip_cli import piaa
from tagclip_cli.errors import UsageError

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def unit(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=dtype), dim=-1)


@pytest.mark.parametrize("size", [(300, 451), (451, 300), (224, 224), (100, 150), (225, 1000)])
def test_crop_pixels_equals_clip_transform(size):
    from torchvision import transforms

    rng = np.random.default_rng(size[0])
    rgb = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    ref = transforms.Compose([
        transforms.Resize(224, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(224), transforms.ToTensor(), transforms.Normalize(MEAN, STD),
    ])
    from PIL import Image

    assert torch.equal(piaa.crop_pixels(rgb, 224, MEAN, STD), ref(Image.fromarray(rgb)))


def test_patch_confidence_per_patch():
    f, t = unit(7, 5, seed=1), unit(4, 5, seed=2)
    probs, entropy, label = piaa.patch_confidence(f, t, 60.0)
    for n in range(7):
        logits = [sum(float(f[n, d]) * float(t[c, d]) for d in range(5)) for c in range(4)]
        top = max(logits)
        e = [math.exp(60 * (x - top)) for x in logits]
        p = [x / sum(e) for x in e]
        assert probs[n].tolist() == pytest.approx(p, abs=1e-6)
        assert float(entropy[n]) == pytest.approx(-sum(x * math.log(max(x, 1e-10)) for x in p), abs=1e-5)
        assert int(label[n]) == logits.index(top)


def test_entropy_floor_keeps_zero_probabilities_finite():
    probs, entropy, _ = piaa.patch_confidence(torch.tensor([[1.0, 0.0]]), torch.eye(2), 1e4)
    assert probs[0, 1] == 0 and torch.isfinite(entropy).all() and float(entropy[0]) == pytest.approx(0, abs=1e-6)


def naive_bank(patches, size):
    """patches: [(entropy, key, label, ...)] -> {label: [key, ...]} the size lowest (entropy, key)."""
    by_class = {}
    for e, key, label in patches:
        by_class.setdefault(label, []).append((e, key))
    return {c: [k for _, k in sorted(v)[:size]] for c, v in by_class.items()}


def random_patches(n, classes, seed, dim=3):
    g = torch.Generator().manual_seed(seed)
    entropy = torch.randint(0, 6, (n,), generator=g).float() / 4  # many ties
    label = torch.randint(0, classes, (n,), generator=g)
    key = torch.randperm(10 * n, generator=g)[:n]
    features = torch.randn(n, dim, generator=g)
    return features, entropy, torch.rand(n, generator=g), label, key


def bank_content(bank):
    return {c: bank.key[bank.label == c].tolist() for c in bank.label.unique().tolist()}


@pytest.mark.parametrize("seed", range(4))
def test_bank_is_exact_topk_of_the_union_whatever_the_chunks(seed):
    features, entropy, weight, label, key = random_patches(200, 5, seed)
    expected = naive_bank(list(zip(entropy.tolist(), key.tolist(), label.tolist(), strict=True)), 7)
    rng = random.Random(seed)
    order = list(range(200))
    rng.shuffle(order)
    banks = []
    for _ in range(3):  # three parts of a split collection, each streamed in uneven chunks
        bank = piaa.PatchBank.empty(7, 3)
        banks.append(bank)
    for i, start in enumerate(range(0, 200, 23)):
        idx = torch.tensor(order[start:start + 23])
        banks[i % 3].add(features[idx], entropy[idx], weight[idx], label[idx], key[idx])
    single = piaa.PatchBank.empty(7, 3)
    single.add(features, entropy, weight, label, key)
    merged = banks[0]
    merged.merge(banks[2])
    merged.merge(banks[1])
    assert bank_content(single) == expected
    for name in ("features", "entropy", "weight", "label", "key"):
        assert torch.equal(getattr(merged, name), getattr(single, name))
    # rows follow their patch: the feature of each kept key is that key's feature
    pos = {int(k): i for i, k in enumerate(key)}
    assert torch.equal(single.features, features[[pos[int(k)] for k in single.key]])


def test_bank_state_round_trip():
    features, entropy, weight, label, key = random_patches(50, 3, 9)
    bank = piaa.PatchBank.empty(4, 3)
    bank.add(features, entropy, weight, label, key)
    again = piaa.PatchBank.from_state(bank.state())
    assert again.size == 4 and torch.equal(again.key, bank.key) and torch.equal(again.features, bank.features)


def naive_means(x, groups, w, text):
    out = text.double().clone()
    for c in range(text.shape[0]):
        rows = [n for n in range(len(groups)) if groups[n] == c]
        if rows:
            total = sum(float(w[n]) for n in rows)
            out[c] = sum(float(w[n]) * x[n].double() for n in rows) / total
    return out


def naive_precision(centred):
    a = centred.double().numpy()
    n, d = a.shape
    dev = a - a.mean(axis=0)
    scatter = dev.T @ dev
    return d * np.linalg.pinv(scatter + np.trace(scatter) / (n - 1) * np.eye(d))


def test_discriminant_equals_the_formulas():
    x, text = unit(30, 6, seed=3, dtype=torch.float64), unit(4, 6, seed=4, dtype=torch.float64)
    groups = torch.tensor([0, 1, 3] * 10)  # class 2 has no patch: its text embedding
    w = torch.rand(30, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    means = piaa.class_means(x, groups, w, text)
    assert torch.allclose(means, naive_means(x, groups, w, text), atol=1e-12)
    assert torch.equal(means[2], text[2])
    precision = naive_precision(x - means[groups])
    assert np.allclose(piaa.shared_precision(x - means[groups]).numpy(), precision, atol=1e-9)
    weight, bias = piaa.discriminant(x, groups, w, text)
    mu = means.numpy()
    for c in range(4):
        assert np.allclose(weight[:, c].numpy(), precision @ mu[c], atol=1e-9)  # P symmetric
        assert float(bias[c]) == pytest.approx(math.log(1 / 4) - mu[c] @ precision @ mu[c] / 2, abs=1e-8)


def test_discriminant_separates_gaussian_classes():
    g = torch.Generator().manual_seed(6)
    centres = 3 * torch.randn(3, 8, generator=g, dtype=torch.float64)
    groups = torch.arange(3).repeat_interleave(40)
    x = centres[groups] + torch.randn(120, 8, generator=g, dtype=torch.float64)
    ones, no_text = torch.ones(120, dtype=torch.float64), torch.zeros(3, 8, dtype=torch.float64)
    weight, bias = piaa.discriminant(x, groups, ones, no_text)
    held = centres[groups] + torch.randn(120, 8, generator=g, dtype=torch.float64)
    assert ((held @ weight + bias).argmax(dim=1) == groups).float().mean() > 0.95


def test_precision_needs_two_patches():
    with pytest.raises(UsageError, match="at least 2"):
        piaa.shared_precision(torch.zeros(1, 3))


def naive_refine(x, weight, bias, temperature, drop_singletons):
    logits = (x.double() @ weight.double() + bias.double()).tolist()
    keep, qs = [], []
    for row in logits:
        top = max(row)
        e = [math.exp(temperature * (v - top)) for v in row]
        qs.append([v / sum(e) for v in e])
    groups = [row.index(max(row)) for row in logits]
    for n, c in enumerate(groups):
        values = [qs[m][c] for m in range(len(groups)) if groups[m] == c]
        if len(values) == 1:
            keep.append(not drop_singletons)
        else:
            keep.append(qs[n][c] >= statistics.mean(values) + statistics.stdev(values) - 1e-6)
    return keep, qs


@pytest.mark.parametrize("drop", [False, True])
def test_refine_per_group(drop):
    x = unit(40, 5, seed=7)
    weight, bias = 3 * torch.eye(5)[:, :4], torch.tensor([0.0, 0.1, -0.2, -2.5])
    x[:, 3] = 0  # no patch but the last leans to class 3 ...
    x = F.normalize(x, dim=-1)
    x[-1] = torch.eye(5)[3]  # ... so the last is the only one whose argmax is class 3: a group of one
    keep, q = piaa.refine(x, weight, bias, 2.0, drop_singletons=drop)
    expected, qs = naive_refine(x, weight, bias, 2.0, drop)
    assert torch.allclose(q.double(), torch.tensor(qs, dtype=torch.float64), atol=1e-6)
    groups = (x @ weight + bias).argmax(1)
    assert (groups == int(groups[-1])).sum() == 1
    assert keep.tolist() == expected
    assert bool(keep[-1]) is (not drop)


def filled_bank(features, text, cfg, chunks):
    bank = piaa.PatchBank.empty(cfg.bank_size, features.shape[-1])
    keys = torch.arange(features.shape[0] * features.shape[1]).reshape(features.shape[:2])
    for idx in chunks:
        piaa.offer_patches(bank, features[idx], text, cfg, keys[idx])
    return bank


def test_fit_on_a_stream_equals_the_fit_on_all_at_once():
    g = torch.Generator().manual_seed(10)
    text = unit(5, 16, seed=11)
    features = text[torch.randint(0, 5, (12, 9), generator=g)] + 0.6 * torch.randn(12, 9, 16, generator=g)
    cfg = piaa.PiaaConfig(bank_size=6, refine_temperature=5.0)
    once = piaa.fit(filled_bank(features, text, cfg, [torch.arange(12)]), text, cfg)
    chunks = [torch.tensor([11, 3]), torch.tensor([0, 1, 2]), torch.tensor([4, 5, 6, 7, 8, 9, 10])]
    stream = piaa.fit(filled_bank(features, text, cfg, chunks), text, cfg)
    assert torch.equal(once.weight, stream.weight) and torch.equal(once.bias, stream.bias)
    assert once.weight.shape == (16, 5) and torch.isfinite(once.weight).all()


def test_fit_refits_on_the_kept_patches():
    g = torch.Generator().manual_seed(12)
    text = unit(3, 8, seed=13)
    features = text[torch.randint(0, 3, (6, 10), generator=g)] + 0.5 * torch.randn(6, 10, 8, generator=g)
    cfg = piaa.PiaaConfig(bank_size=20, refine_temperature=0.01)
    bank = filled_bank(features, text, cfg, [torch.arange(6)])
    model = piaa.fit(bank, text, cfg)
    w1, b1 = piaa.discriminant(bank.features, bank.label, bank.weight, text)
    keep, q = piaa.refine(bank.features, w1, b1, 0.01)
    assert 0 < keep.sum() < len(bank)
    groups = q[keep].argmax(1)
    w2, b2 = piaa.discriminant(bank.features[keep], groups, q[keep].gather(1, groups[:, None])[:, 0], text)
    assert torch.equal(model.weight, w2) and torch.equal(model.bias, b2)


def test_scores_per_image():
    cfg = piaa.PiaaConfig.published("coco")
    cls, patches, text = torch.randn(2, 6), torch.randn(2, 5, 6), unit(3, 6, seed=14)
    model = piaa.PiaaModel(torch.randn(6, 3) * 50, torch.randn(3) * 10)
    scores = piaa.piaa_scores(cls, patches, text, model, cfg)

    def softmax(v):
        e = [math.exp(x - max(v)) for x in v]
        return [x / sum(e) for x in e]

    for i in range(2):
        c = F.normalize(cls[i].double(), dim=0)
        image = softmax([80 * float(c @ text[k].double()) for k in range(3)])
        best = [0.0] * 3
        for p in range(5):
            f = F.normalize(patches[i, p].double(), dim=0)
            probs = softmax([float(f @ model.weight[:, k].double() + model.bias[k]) / 500 for k in range(3)])
            best = [max(a, b) for a, b in zip(best, probs, strict=True)]
        patch = softmax([400 * v for v in best])
        expected = [0.1 * a + 0.9 * b for a, b in zip(image, patch, strict=True)]
        assert scores[i].tolist() == pytest.approx(expected, abs=1e-5)


def test_published_settings_and_names():
    assert piaa.PiaaConfig.published("voc").refine_temperature == 100
    coco = piaa.PiaaConfig.published("coco")
    assert (coco.refine_temperature, coco.patch_scale, coco.image_scale) == (0.01, 400, 80)
    nus = piaa.PiaaConfig.published("nus")
    assert (nus.refine_temperature, nus.patch_scale, nus.image_scale) == (500, 400, 10)
    with pytest.raises(UsageError, match="no published setting"):
        piaa.PiaaConfig.published("cocostuff")
    assert piaa.prompt_names(("cat", "diningtable"), "voc") == ("cat", "dining table")
    assert piaa.prompt_names(("sofa", "tvmonitor"), "coco") == ("couch", "tv")
    assert piaa.prompt_names(("sofa",), None) == ("sofa",)


def test_fit_keeps_the_first_discriminant_when_the_refinement_keeps_under_two_patches(caplog):
    text = unit(2, 4, seed=15)
    bank = piaa.PatchBank.empty(8, 4)  # two patches of class 0: mean + std of two values exceeds both
    bank.add(text[:1] + 0.1 * unit(2, 4, seed=16), torch.zeros(2), torch.tensor([1.0, 0.5]), torch.tensor([0, 0]),
             torch.arange(2))
    w1, b1 = piaa.discriminant(bank.features, bank.label, bank.weight, text)
    keep, _ = piaa.refine(bank.features, w1, b1, 0.01)
    assert (bank.features @ w1 + b1).argmax(1).tolist() == [0, 0] and not keep.any()
    model = piaa.fit(bank, text, piaa.PiaaConfig(refine_temperature=0.01))
    assert torch.equal(model.weight, w1) and torch.equal(model.bias, b1) and "unrefined" in caplog.text


# ---- the runner on the shipped demo model -----------------------------------------------------------

@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from tagclip_cli import synthetic
    from tagclip_cli.backbone import load_backbone
    from tagclip_cli.vocab import load_vocabulary

    torch.set_num_threads(1)
    bb = load_backbone(model="shapes-demo", device="cpu", cache_dir=tmp_path_factory.mktemp("cache"))
    vocab = load_vocabulary("shapes")
    scenes = [synthetic.generate_scene(i, seed=3000) for i in range(40)]
    runner = piaa.Piaa(bb, vocab, piaa.PiaaConfig(bank_size=64))
    crops = torch.stack([runner.crop(s.image) for s in scenes])
    return runner, scenes, crops


def test_banks_of_parts_merge_into_the_single_fit(demo):
    runner, _, crops = demo
    batches = [torch.arange(i, i + 4) for i in range(0, 12, 4)]
    single = runner.new_bank()
    parts = [runner.new_bank(), runner.new_bank()]
    for n, idx in enumerate(batches):
        runner.offer(single, crops[idx], idx)
        runner.offer(parts[n % 2], crops[idx], idx)
    parts[1].merge(parts[0])
    for name in ("features", "entropy", "weight", "label", "key"):
        assert torch.equal(getattr(parts[1], name), getattr(single, name))
    a, b = runner.fit(single), runner.fit(parts[1])
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    again = piaa.PiaaModel.from_state(a.state())
    assert torch.equal(again.weight, a.weight)


def test_runner_refuses_a_non_dense_variant(demo):
    runner, _, _ = demo
    with pytest.raises(UsageError, match="dense variant"):
        piaa.Piaa(runner.backbone, runner.vocab, piaa.PiaaConfig(dense="maskclip"))


def test_piaa_tags_the_demo_scenes(demo):
    from tagclip_cli.evaluate.metrics import ap_per_class

    runner, scenes, crops = demo
    bank = runner.new_bank()
    for i in range(0, len(scenes), 8):
        runner.offer(bank, crops[i:i + 8], torch.arange(i, min(i + 8, len(scenes))))
    model = runner.fit(bank)
    scores = torch.cat([runner.score(crops[i:i + 8], model) for i in range(0, len(scenes), 8)])
    classes = runner.vocab.classes
    labels = np.array([[name in s.objects for name in classes] for s in scenes])
    assert scores.shape == (len(scenes), len(classes))
    assert torch.allclose(scores.sum(dim=1), torch.ones(len(scenes)), atol=1e-5)
    present = labels.any(axis=0)
    mean_ap = float(np.nanmean(ap_per_class(scores.numpy()[:, present], labels[:, present])))
    chance = float(labels[:, present].mean())
    assert mean_ap > 0.5 > chance + 0.2, (mean_ap, chance)
    tags = runner.tags(scores)
    assert all(len(t) >= 1 for t in tags)
    hits = sum(scenes[i].objects[0] in [classes[c] for c in tags[i]] for i in range(len(scenes)))
    assert hits >= len(scenes) // 2
