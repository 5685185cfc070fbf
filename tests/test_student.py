"""The seeded train/val split of `tagclip train-student` and the device names given to Ultralytics
(tagclip_cli/student.py)."""

from __future__ import annotations

import torch

from tagclip_cli.student import is_val, ultralytics_device


def test_split_is_a_pure_function_of_seed_and_id():
    ids = [f"photos/{i:05d}.jpg" for i in range(2000)]
    first = [is_val(i, 3, 0.2) for i in ids]
    assert [is_val(i, 3, 0.2) for i in reversed(ids)] == first[::-1]  # order of the others does not matter
    assert [is_val(i, 3, 0.2) for i in ids[:500]] == first[:500]  # nor does the size of the collection
    assert [is_val(i, 4, 0.2) for i in ids] != first  # the seed does


def test_split_holds_out_about_the_fraction_and_grows_monotonically():
    ids = [f"{i:06d}.png" for i in range(10_000)]
    for fraction in (0.05, 0.2, 0.5):
        held = sum(is_val(i, 0, fraction) for i in ids)
        assert abs(held / len(ids) - fraction) < 0.02
    # a larger fraction only adds images to val: none moves back to train
    assert all(is_val(i, 0, 0.3) for i in ids if is_val(i, 0, 0.2))
    assert not any(is_val(i, 0, 0.0) for i in ids)


def test_device_in_ultralytics_terms():
    assert [ultralytics_device(d) for d in ("cpu", "cuda", "cuda:1", "0", "0,1")] == ["cpu", "0", "1", "0", "0,1"]
    assert ultralytics_device("auto") == ("0" if torch.cuda.is_available() else "cpu")
