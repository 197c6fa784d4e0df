"""The procedural shapes dataset: deterministic, cached, consistent annotations."""

import json
import os

import cv2
import numpy as np
import pytest
from detectron2.data import DatasetCatalog
from pycocotools import mask as mask_util
from shapes import CLASSES, generate_split, register_shapes, shapes_dataset


def test_deterministic_and_cached(tmp_path):
    a = generate_split(str(tmp_path / "a"), "train", 6, seed=3)
    b = generate_split(str(tmp_path / "b"), "train", 6, seed=3)
    with open(a[0]) as fa, open(b[0]) as fb:
        assert json.load(fa) == json.load(fb)
    for name in sorted(os.listdir(a[1])):
        with open(os.path.join(a[1], name), "rb") as fa, open(os.path.join(b[1], name), "rb") as fb:
            assert fa.read() == fb.read()
    mtime = os.path.getmtime(a[0])
    assert generate_split(str(tmp_path / "a"), "train", 6, seed=3) == a
    assert os.path.getmtime(a[0]) == mtime  # reused, not regenerated
    c = generate_split(str(tmp_path / "a"), "train", 6, seed=4)
    with open(c[0]) as fc, open(a[0]) as fa:
        assert json.load(fc) != json.load(fa)


def test_annotations_are_consistent(tmp_path):
    json_file, image_dir = generate_split(str(tmp_path), "val", 8, seed=0, size=96)
    with open(json_file) as f:
        data = json.load(f)
    assert [c["name"] for c in data["categories"]] == CLASSES
    assert data["annotations"], "scenes have objects"
    by_image = {}
    for ann in data["annotations"]:
        m = mask_util.decode(ann["segmentation"]).astype(bool)
        assert m.shape == (96, 96) and m.sum() == ann["area"] >= 20
        x, y, w, h = ann["bbox"]
        ys, xs = np.nonzero(m)
        assert (x, y, x + w, y + h) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        by_image.setdefault(ann["image_id"], []).append((m, ann["category_id"] - 1))
    folder = os.path.dirname(json_file)
    for img in data["images"]:
        sem = cv2.imread(os.path.join(folder, "sem_seg", img["file_name"]), cv2.IMREAD_UNCHANGED)
        covered = np.zeros((96, 96), bool)
        for m, c in by_image.get(img["id"], []):
            assert not (covered & m).any(), "visible instance masks never overlap"
            covered |= m
            assert (sem[m] == c).all()
        assert (sem[~covered] == len(CLASSES)).all(), "background everywhere else"
        assert image_dir and os.path.isfile(os.path.join(image_dir, img["file_name"]))


def test_registered_splits_load_in_detectron2(tmp_path):
    names = register_shapes(shapes_dataset(str(tmp_path), 4, 2, seed=0, size=64), "shapes_test")
    assert names == {"train": "shapes_test_train", "val": "shapes_test_val"}
    dicts = DatasetCatalog.get("shapes_test_train")
    assert len(dicts) == 4 and all(d["height"] == 64 for d in dicts)
    assert any(d["annotations"] for d in dicts)


def test_the_test_split_is_disjoint_and_leaves_train_and_val_as_they_were(tmp_path):
    two = shapes_dataset(str(tmp_path / "a"), 4, 3, seed=0, size=64)
    three = shapes_dataset(str(tmp_path / "b"), 4, 3, seed=0, size=64, num_test=3)
    assert set(two) == {"train", "val"} and set(three) == {"train", "val", "test"}

    def pixels(split):
        json_file, image_dir = split
        with open(json_file) as f:
            names = [im["file_name"] for im in json.load(f)["images"]]
        return [cv2.imread(os.path.join(image_dir, n)).tobytes() for n in names]

    for name in ("train", "val"):  # adding a test split changes nothing else
        assert pixels(two[name]) == pixels(three[name])
    test = set(pixels(three["test"]))
    assert (
        len(test) == 3
        and not test & set(pixels(three["val"]))
        and not test & set(pixels(three["train"]))
    )


def test_a_split_without_one_class(tmp_path):
    from shapes import without_class

    json_file, _ = generate_split(str(tmp_path), "val", 6, seed=0, size=64)
    out = str(tmp_path / "no_ring.json")
    with open(json_file) as f:
        before = json.load(f)
    ring = CLASSES.index("ring") + 1
    n_ring = sum(a["category_id"] == ring for a in before["annotations"])
    assert without_class(json_file, "ring", out) == n_ring
    with open(out) as f:
        after = json.load(f)
    assert after["images"] == before["images"] and after["categories"] == before["categories"]
    assert after["annotations"] == [a for a in before["annotations"] if a["category_id"] != ring]
    with pytest.raises(ValueError, match="no class 'hexagon'"):
        without_class(json_file, "hexagon", out)


def test_the_small_variant_has_many_small_objects_and_the_default_is_unchanged(tmp_path):
    from shapes import foreground_statistics

    default, _ = generate_split(str(tmp_path), "val", 24, seed=0)
    small, _ = generate_split(str(tmp_path), "val", 24, seed=0, variant="small")
    assert "_small_" in os.path.basename(os.path.dirname(small))
    assert "_small_" not in os.path.basename(os.path.dirname(default))
    a, b = foreground_statistics(default), foreground_statistics(small)
    assert b["median box side"] < a["median box side"] / 2
    assert b["objects per image"] > a["objects per image"]
    for level in ("p2", "p3", "p4"):  # background is the majority of the cells
        assert b[f"cells in boxes, {level}"] < 0.35 < a[f"cells in boxes, {level}"] + 0.2
    with pytest.raises(ValueError, match="unknown data variant 'huge'"):
        generate_split(str(tmp_path), "val", 2, seed=0, variant="huge")


def test_foreground_statistics_of_a_written_split(tmp_path):
    from shapes import foreground_statistics

    # image 1 (64x64): a 16x16 box at (0, 0) and a 40x30 box at (24, 40); image 2: no box
    data = {
        "images": [{"id": 1, "width": 64, "height": 64}, {"id": 2, "width": 64, "height": 64}],
        "annotations": [
            {"id": 1, "image_id": 1, "bbox": [0, 0, 16, 16]},
            {"id": 2, "image_id": 1, "bbox": [24, 40, 40, 30]},
        ],
    }
    path = tmp_path / "a.json"
    path.write_text(json.dumps(data))
    stats = foreground_statistics(str(path), strides=(8, 32))
    assert stats["objects per image"] == 1.0
    assert stats["small boxes"] == 0.5  # 16x16 is under COCO's 32x32, 40x30 is not
    assert stats["median box side"] == pytest.approx(1200**0.5)
    # stride 8 (8x8 cells): box 1 covers 2x2 cells, box 2 5 columns x 3 rows (cut at the
    # border): 19 of 64
    assert stats["cells in boxes, p3"] == pytest.approx((19 / 64 + 0) / 2)
    # stride 32 (2x2 cells): box 1 the top-left cell, box 2 the two bottom cells: 3 of 4
    assert stats["cells in boxes, p5"] == pytest.approx((3 / 4 + 0) / 2)
    assert stats["box area / image area"] == pytest.approx((256 + 1200) / 2 / 4096)
    # COCO's classes scaled to a 64x64 image: small under 32^2 * 64^2 / 480^2 = 18.2 px^2,
    # medium under 163.8; the masks' areas decide where given
    assert "occluded" not in stats  # the split does not record it
    for area, want in ((18.0, "small"), (18.3, "medium"), (163.0, "medium"), (164.0, "large")):
        data["annotations"][0]["area"] = area
        data["annotations"][1]["area"] = 1000.0
        path.write_text(json.dumps(data))
        stats = foreground_statistics(str(path), strides=(8,))
        expected = {"small": 0.0, "medium": 0.0, "large": 0.5}  # box 2: 1000 px^2, large
        expected[want] += 0.5
        assert {k: stats[k] for k in expected} == expected, area


def test_the_detection_variant_is_like_coco(tmp_path):
    """About seven objects per image, COCO's spread of object sizes (its thresholds scaled to
    the image), occlusion, distractors of no class, each class in its own band of hues."""
    from shapes import COCO_PUBLISHED, VARIANTS, foreground_statistics, statistics_table

    json_file, image_dir = generate_split(str(tmp_path), "val", 60, seed=0, variant="detection")
    assert "_detection_" in os.path.basename(os.path.dirname(json_file))
    stats = foreground_statistics(json_file)
    assert 6.0 <= stats["objects per image"] <= 9.0
    for size in ("small", "medium", "large"):
        assert abs(stats[size] - COCO_PUBLISHED[size]) < 0.08, (size, stats[size])
    assert 0.05 < stats["occluded"] < 0.5
    with open(json_file) as f:
        data = json.load(f)
    assert all(0.25 <= a["visible"] <= 1.0 for a in data["annotations"])
    hues = {c: [] for c in range(len(CLASSES))}
    for a in data["annotations"]:
        image = cv2.imread(os.path.join(image_dir, f"{a['image_id'] - 1:06d}.png"))
        m = mask_util.decode(a["segmentation"]).astype(bool)
        hsv = cv2.cvtColor(image, cv2.COLOR_BGR2HSV)
        hues[a["category_id"] - 1].append(float(np.median(hsv[..., 0][m])))
    band = 180 / len(CLASSES)
    for c, values in hues.items():  # the visible pixels of every object lie in its class's band
        assert values and all(c * band - 2 <= h <= (c + 1) * band + 2 for h in values), (c, values)
    # the background is not flat: more than the objects differ from the image's median colour
    image = cv2.imread(os.path.join(image_dir, "000000.png")).astype(np.float32)
    objects = np.zeros(image.shape[:2], bool)
    for a in data["annotations"]:
        if a["image_id"] == 1:
            objects |= mask_util.decode(a["segmentation"]).astype(bool)
    background = image[~objects]
    assert background.std(axis=0).mean() > 10
    table = statistics_table({"detection": json_file})
    assert "| small (COCO's thresholds scaled to the image) | " in table
    assert table.splitlines()[0] == "| | detection | COCO (published) |"
    assert "| objects per image | " in table and "| 7.3 |" in table
    assert set(VARIANTS) == {"default", "small", "detection"}
