"""A procedural COCO-format detection dataset, for the demo and for tests (nothing downloaded).

Scenes of shapes of several classes (disc, square, triangle, cross, ring) with random size,
colour, stripe texture and rotation, on cluttered backgrounds (gradients, noise, distractor
strokes), overlapping each other (instance masks are what stays visible). Each image comes
with boxes, instance masks (RLE) and a semantic label map. Deterministic by seed, cached on
disk (a finished split is never regenerated), written with a progress bar.

Three variants of the scenes (:data:`VARIANTS`): ``default`` (few, large objects), ``small``
(many objects, all small) and ``detection``, built to look like a detection dataset in the
respects that decide where a feature loss should look: about seven objects per image, object
areas spread as COCO's are (small / medium / large by COCO's area thresholds scaled to the
image), background clutter that includes object-like distractors of no class, and occlusion.
"""

import json
import logging
import math
import os
from typing import Dict, Tuple

import cv2
import numpy as np
from pycocotools import mask as mask_util

__all__ = [
    "CLASSES",
    "VARIANTS",
    "generate_split",
    "register_shapes",
    "shapes_dataset",
    "foreground_statistics",
    "statistics_table",
    "coco_size_thresholds",
]

logger = logging.getLogger("maskd.demo.shapes")

CLASSES = ["disc", "square", "triangle", "cross", "ring"]
SEM_IGNORE = 255
_VERSION = 2  # bump when the generator changes, so caches are rebuilt
# The scenes of each data variant: object radius as a share of the image side, the most
# objects per image, the fewest visible pixels an object keeps. "small": many small objects and
# background the majority of the cells at every level, closer to what detection datasets have.
VARIANTS = {
    "default": dict(radius=(0.06, 0.22), max_objects=6, min_pixels=20),
    "small": dict(radius=(0.025, 0.08), max_objects=12, min_pixels=8),
    # "detection": drawn areas are sampled per COCO size class (size_shares of small, medium,
    # large by COCO's thresholds scaled to the image, coco_size_thresholds) and log-uniformly
    # within it, up to largest_area of the image; each class has its own band of hues (at 4 px
    # a shape alone does not tell the class); 2-6 distractors of no class; an object stays
    # annotated while at least min_visible of its drawn area (and min_pixels) is visible.
    "detection": dict(
        objects=(3, 13),
        size_shares=(0.46, 0.28, 0.26),
        largest_area=0.3,
        min_pixels=6,
        min_visible=0.25,
        distractors=(2, 6),
    ),
}
# COCO's published figures (cocodataset.org, detection evaluation): about 41% of objects small
# (area < 32^2 px), 34% medium (< 96^2), 24% large, in images of typically 640x480 px;
# train2017 has 860,001 instances in 118,287 images (7.3 per image). The thresholds are scaled
# to an image as if a COCO image were resized to its short side (480 px) and cropped square.
COCO_AREA_THRESHOLDS = (32**2, 96**2)
COCO_REFERENCE_AREA = 480 * 480
COCO_PUBLISHED = {"objects per image": 7.3, "small": 0.41, "medium": 0.34, "large": 0.24}
# Shape area as a multiple of r^2 for a shape of "radius" r (_shape_mask), per class.
_AREA_PER_R2 = {"disc": 2.75, "square": 4.0, "triangle": 1.3, "cross": 2.31, "ring": 2.19}


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size, 3) uint8 cluttered background."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    a, b = rng.uniform(-1, 1, 2)
    base = rng.uniform(40, 200, 3)
    grad = (a * x + b * y)[..., None] * rng.uniform(20, 80, 3)
    img = base + grad + rng.normal(0, rng.uniform(5, 25), (size, size, 3))
    img = np.clip(img, 0, 255).astype(np.uint8)
    for _ in range(rng.integers(3, 9)):  # distractor strokes and blobs
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        p0 = tuple(int(v) for v in rng.integers(0, size, 2))
        if rng.random() < 0.6:
            p1 = tuple(int(v) for v in rng.integers(0, size, 2))
            cv2.line(img, p0, p1, color, int(rng.integers(1, 4)))
        else:
            cv2.ellipse(img, p0, tuple(int(v) for v in rng.integers(2, 7, 2)), 0, 0, 360, color, -1)
    return img


def _shape_mask(rng: np.random.Generator, cls: int, size: int, r: float, cx: float, cy: float):
    """A (size, size) bool mask of one shape of class ``cls``, radius r, centre (cx, cy)."""
    m = np.zeros((size, size), np.uint8)
    angle = rng.uniform(0, 2 * math.pi)

    def poly(points):
        pts = np.array(
            [
                (
                    cx + px * math.cos(angle) - py * math.sin(angle),
                    cy + px * math.sin(angle) + py * math.cos(angle),
                )
                for px, py in points
            ],
            np.int32,
        )
        cv2.fillPoly(m, [pts], 1)

    name = CLASSES[cls]
    if name == "disc":
        cv2.ellipse(
            m,
            (int(cx), int(cy)),
            (int(r), int(r * rng.uniform(0.75, 1.0))),
            math.degrees(angle),
            0,
            360,
            1,
            -1,
        )
    elif name == "square":
        poly([(-r, -r), (r, -r), (r, r), (-r, r)])
    elif name == "triangle":
        poly([(r * math.cos(t), r * math.sin(t)) for t in (0, 2 * math.pi / 3, 4 * math.pi / 3)])
    elif name == "cross":
        w = r * 0.35
        poly([(-r, -w), (r, -w), (r, w), (-r, w)])
        poly([(-w, -r), (w, -r), (w, r), (-w, r)])
    elif name == "ring":
        cv2.circle(m, (int(cx), int(cy)), int(r), 1, -1)
        cv2.circle(m, (int(cx), int(cy)), max(int(r * 0.55), 1), 0, -1)
    return m.astype(bool)


def _render(rng: np.random.Generator, size: int, max_objects: int, radius, min_pixels: int):
    img = _background(rng, size)
    sem = np.full((size, size), len(CLASSES), np.uint8)  # the last label is background
    masks, classes = [], []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        cls = int(rng.integers(0, len(CLASSES)))
        r = rng.uniform(size * radius[0], size * radius[1])
        cx, cy = rng.uniform(r * 0.5, size - r * 0.5, 2)
        m = _shape_mask(rng, cls, size, r, cx, cy)
        if m.sum() < min_pixels:
            continue
        color = rng.integers(0, 256, 3).astype(np.float32)
        if rng.random() < 0.5:  # stripe texture
            yy, xx = np.mgrid[0:size, 0:size]
            theta, period = rng.uniform(0, math.pi), rng.uniform(1.5, 4)
            stripes = (np.sin((xx * math.cos(theta) + yy * math.sin(theta)) / period) > 0)[
                ..., None
            ]
            color = np.where(stripes, color, 255 - color)
        img[m] = np.broadcast_to(color, img.shape)[m].astype(np.uint8)
        for prev in masks:  # occlusion: later shapes cover earlier ones
            prev &= ~m
        masks.append(m)
        classes.append(cls)
    keep = [i for i, m in enumerate(masks) if m.sum() >= min_pixels]  # drop hidden shapes
    for i in keep:
        sem[masks[i]] = classes[i]
    return img, sem, [masks[i] for i in keep], [classes[i] for i in keep]


def coco_size_thresholds(image_area: float) -> Tuple[float, float]:
    """COCO's small / medium and medium / large area thresholds (32^2, 96^2 px) scaled to an
    image of ``image_area`` px, as if a COCO image (typically 640x480) were resized to the
    image's short side and cropped square: scaled by ``image_area / 480^2``."""
    scale = image_area / COCO_REFERENCE_AREA
    return COCO_AREA_THRESHOLDS[0] * scale, COCO_AREA_THRESHOLDS[1] * scale


def _distractors(rng: np.random.Generator, img: np.ndarray, count: int) -> None:
    """Draw ``count`` distractors of no class on ``img`` (in place), of the objects' sizes:
    ellipses at least 2.5 times as long as they are wide, and rotated patches of checker
    texture."""
    size = img.shape[0]
    for _ in range(count):
        color = rng.integers(0, 256, 3).astype(np.float32)
        m = np.zeros((size, size), np.uint8)
        cx, cy = rng.uniform(0, size, 2)
        r = math.exp(rng.uniform(math.log(2.5), math.log(size * 0.2)))
        if rng.integers(0, 2) == 0:  # an elongated ellipse
            axes = (max(int(r), 1), max(int(r / rng.uniform(2.5, 5.0)), 1))
            cv2.ellipse(m, (int(cx), int(cy)), axes, rng.uniform(0, 180), 0, 360, 1, -1)
        else:  # a rotated patch of checker texture
            w, h = r * rng.uniform(0.6, 1.4), r * rng.uniform(0.6, 1.4)
            box = cv2.boxPoints(((cx, cy), (w * 2, h * 2), rng.uniform(0, 90)))
            cv2.fillPoly(m, [box.astype(np.int32)], 1)
            yy, xx = np.mgrid[0:size, 0:size]
            period = rng.uniform(2, 5)
            checker = ((xx // period + yy // period) % 2 == 0)[..., None]
            color = np.where(checker, color, 255 - color)
        mask = m.astype(bool)
        img[mask] = np.broadcast_to(color, img.shape)[mask].astype(np.uint8)


def _hue_color(rng: np.random.Generator, cls: int) -> np.ndarray:
    """A BGR colour (3,) float32 of class ``cls``'s hue band (1/len(CLASSES) of the hue circle,
    its middle 60%), with random saturation and value."""
    band = 180.0 / len(CLASSES)  # OpenCV hues run over [0, 180)
    hue = (cls + rng.uniform(0.2, 0.8)) * band
    hsv = np.array([[[hue, rng.uniform(150, 255), rng.uniform(120, 255)]]], np.float32)
    return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2BGR)[0, 0].astype(np.float32)


def _render_detection(rng: np.random.Generator, size: int, scene: dict):
    """One scene of the ``detection`` variant: (image, semantic map, visible masks, classes,
    visible share of each object's drawn area)."""
    img = _background(rng, size)
    _distractors(rng, img, int(rng.integers(scene["distractors"][0], scene["distractors"][1] + 1)))
    small, medium = coco_size_thresholds(size * size)
    bounds = [(16.0, small), (small, medium), (medium, scene["largest_area"] * size * size)]
    sem = np.full((size, size), len(CLASSES), np.uint8)
    masks, classes, drawn = [], [], []
    for _ in range(int(rng.integers(scene["objects"][0], scene["objects"][1] + 1))):
        cls = int(rng.integers(0, len(CLASSES)))
        lo, hi = bounds[int(rng.choice(3, p=scene["size_shares"]))]
        area = math.exp(rng.uniform(math.log(lo), math.log(hi)))
        r = math.sqrt(area / _AREA_PER_R2[CLASSES[cls]])
        cx, cy = rng.uniform(0, size, 2)
        m = _shape_mask(rng, cls, size, r, cx, cy)
        if m.sum() < scene["min_pixels"]:
            continue
        color = _hue_color(rng, cls)  # the class's own hue, random saturation and value
        if rng.random() < 0.5:  # stripe texture, in a darker tone of the same hue
            yy, xx = np.mgrid[0:size, 0:size]
            theta, period = rng.uniform(0, math.pi), rng.uniform(1.5, 4)
            stripes = (np.sin((xx * math.cos(theta) + yy * math.sin(theta)) / period) > 0)[
                ..., None
            ]
            color = np.where(stripes, color, 0.5 * color)
        img[m] = np.broadcast_to(color, img.shape)[m].astype(np.uint8)
        for prev in masks:  # occlusion: later shapes cover earlier ones
            prev &= ~m
        masks.append(m)
        classes.append(cls)
        drawn.append(int(m.sum()))
    keep = [
        i
        for i, m in enumerate(masks)
        if m.sum() >= max(scene["min_pixels"], scene["min_visible"] * drawn[i])
    ]
    for i in keep:
        sem[masks[i]] = classes[i]
    visible = [float(masks[i].sum() / drawn[i]) for i in keep]
    return img, sem, [masks[i] for i in keep], [classes[i] for i in keep], visible


def generate_split(
    root: str, split: str, num_images: int, seed: int, size: int = 128, variant: str = "default"
) -> Tuple[str, str]:
    """Write one split (images, semantic maps, COCO json) under ``root``, unless cached.

    Args:
        variant: the scenes (:data:`VARIANTS`).

    Returns:
        (annotation json path, image folder).
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown data variant '{variant}' (known: {sorted(VARIANTS)})")
    scene = VARIANTS[variant]
    tag = "" if variant == "default" else f"_{variant}"
    folder = os.path.join(root, f"{split}_v{_VERSION}{tag}_n{num_images}_s{seed}_px{size}")
    json_file = os.path.join(folder, "annotations.json")
    image_dir = os.path.join(folder, "images")
    if os.path.isfile(json_file):
        return json_file, image_dir
    from tqdm import tqdm

    os.makedirs(image_dir, exist_ok=True)
    os.makedirs(os.path.join(folder, "sem_seg"), exist_ok=True)
    rng = np.random.default_rng(seed)
    images, annotations = [], []
    for i in tqdm(range(num_images), desc=f"generating {split} ({num_images} images)"):
        if variant == "detection":
            img, sem, masks, classes, visible = _render_detection(rng, size, scene)
        else:
            img, sem, masks, classes = _render(
                rng, size, scene["max_objects"], scene["radius"], scene["min_pixels"]
            )
            visible = None
        name = f"{i:06d}.png"
        cv2.imwrite(os.path.join(image_dir, name), img)
        cv2.imwrite(os.path.join(folder, "sem_seg", name), sem)
        images.append({"id": i + 1, "file_name": name, "width": size, "height": size})
        for k, (m, c) in enumerate(zip(masks, classes)):
            rle = mask_util.encode(np.asfortranarray(m.astype(np.uint8)))
            x, y, w, h = (float(v) for v in mask_util.toBbox(rle))
            rle["counts"] = rle["counts"].decode("ascii")
            ann = {
                "id": len(annotations) + 1,
                "image_id": i + 1,
                "category_id": c + 1,
                "bbox": [x, y, w, h],
                "area": float(m.sum()),
                "iscrowd": 0,
                "segmentation": rle,
            }
            if visible is not None:  # the share of the drawn shape left visible (occlusion)
                ann["visible"] = round(visible[k], 4)
            annotations.append(ann)
    categories = [{"id": i + 1, "name": n} for i, n in enumerate(CLASSES)]
    tmp = json_file + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    os.replace(tmp, json_file)  # the json marks a finished split
    logger.info("Wrote %d images, %d objects to %s", len(images), len(annotations), folder)
    return json_file, image_dir


def shapes_dataset(
    root: str,
    num_train: int,
    num_val: int,
    seed: int = 0,
    size: int = 128,
    num_test: int = 0,
    variant: str = "default",
):
    """Generate (or reuse) the train and val splits, and a test split if ``num_test`` > 0.

    The three splits come from disjoint seeds (``seed``, ``seed + 10000``, ``seed + 20000``):
    choices (recipes, loss weights, mask sources) are made on val, reported numbers come from
    test. Returns {split: (json, image folder)}.
    """
    splits = {
        "train": generate_split(root, "train", num_train, seed, size, variant),
        "val": generate_split(root, "val", num_val, seed + 10_000, size, variant),
    }
    if num_test > 0:
        splits["test"] = generate_split(root, "test", num_test, seed + 20_000, size, variant)
    return splits


def foreground_statistics(json_file: str, strides=(4, 8, 16, 32, 64)) -> Dict[str, float]:
    """What share of a split is object, as the oracle mask sources see it.

    Returns:
        {"objects per image", "median box side" (pixels), "small boxes" (the share of boxes
        under 32x32 pixels), "box area / image area" (mean per box), "small", "medium",
        "large" (the shares of objects by their mask area under COCO's thresholds scaled to
        each image, :func:`coco_size_thresholds`), "occluded" (the share of objects with less
        than 90% of their drawn area visible, where the split records it; else absent), and
        "cells in boxes, p<k>" for each stride 2^k: the mean share of a level's cells that the
        boxes overlap (as maskd.modeling.mask_sources.box_cells marks them)}.
    """
    import torch

    from maskd.modeling.mask_sources import box_cells

    with open(json_file) as f:
        data = json.load(f)
    boxes = {im["id"]: [] for im in data["images"]}
    for a in data["annotations"]:
        x, y, w, h = a["bbox"]
        boxes[a["image_id"]].append([x, y, x + w, y + h])
    areas = [a["bbox"][2] * a["bbox"][3] for a in data["annotations"]]
    sides = sorted(math.sqrt(a) for a in areas)
    out = {
        "objects per image": len(areas) / max(1, len(boxes)),
        "median box side": sides[len(sides) // 2] if sides else math.nan,
        "small boxes": sum(a < 32 * 32 for a in areas) / max(1, len(areas)),
        "box area / image area": float(
            np.mean([a / (im["width"] * im["height"]) for a, im in _with_images(data)])
        ),
    }
    images = {im["id"]: im for im in data["images"]}
    classes = [0, 0, 0]
    for a in data["annotations"]:
        im = images[a["image_id"]]
        small, medium = coco_size_thresholds(im["width"] * im["height"])
        area = a.get("area", a["bbox"][2] * a["bbox"][3])  # COCO's: the mask's area
        classes[(area >= small) + (area >= medium)] += 1
    for name, count in zip(("small", "medium", "large"), classes):
        out[name] = count / max(1, len(areas))
    if areas and all("visible" in a for a in data["annotations"]):
        out["occluded"] = sum(a["visible"] < 0.9 for a in data["annotations"]) / len(areas)
    for stride in strides:
        shares = []
        for im in data["images"]:
            h, w = math.ceil(im["height"] / stride), math.ceil(im["width"] / stride)
            cells = box_cells(torch.tensor(boxes[im["id"]]).reshape(-1, 4), stride, h, w)
            shares.append(cells.mean().item())
        out[f"cells in boxes, p{int(math.log2(stride))}"] = float(np.mean(shares))
    return out


def statistics_table(named_files: Dict[str, str]) -> str:
    """A markdown table of :func:`foreground_statistics` for each (name -> annotation json),
    with COCO's published figures beside them."""
    stats = {name: foreground_statistics(path) for name, path in named_files.items()}
    rows = [
        ("objects per image", "objects per image", "{:.1f}"),
        ("small (COCO's thresholds scaled to the image)", "small", "{:.0%}"),
        ("medium", "medium", "{:.0%}"),
        ("large", "large", "{:.0%}"),
        ("occluded (< 90% of the drawn area visible)", "occluded", "{:.0%}"),
        ("median box side (px)", "median box side", "{:.0f}"),
        ("box area / image area (mean)", "box area / image area", "{:.1%}"),
    ]
    rows += [
        (f"cells inside boxes, {k.split(', ')[1]}", k, "{:.2f}")
        for k in stats[next(iter(stats))]
        if k.startswith("cells in boxes")
    ]
    lines = [
        "| | " + " | ".join(stats) + " | COCO (published) |",
        "|---" * (len(stats) + 2) + "|",
    ]
    for label, key, fmt in rows:
        cells = [fmt.format(st[key]) if key in st else "-" for st in stats.values()]
        coco = COCO_PUBLISHED.get(key)
        coco_cell = "-" if coco is None else fmt.format(coco)
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {coco_cell} |")
    return "\n".join(lines)


def _with_images(data):
    images = {im["id"]: im for im in data["images"]}
    return [(a["bbox"][2] * a["bbox"][3], images[a["image_id"]]) for a in data["annotations"]]


def register_shapes(
    splits: Dict[str, Tuple[str, str]], prefix: str = "maskd_shapes"
) -> Dict[str, str]:
    """Register the splits in detectron2's DatasetCatalog as ``<prefix>_<split>``."""
    from maskd.engine import register_coco_datasets

    names = {split: f"{prefix}_{split}" for split in splits}
    register_coco_datasets([(names[s], *splits[s]) for s in splits])
    return names


def without_class(json_file: str, name: str, output: str) -> int:
    """Write a copy of a split's COCO json without the annotations of class ``name`` (the
    images and categories stay): the class's shapes become unlabelled objects. Returns how many
    annotations were dropped."""
    with open(json_file) as f:
        data = json.load(f)
    ids = [c["id"] for c in data["categories"] if c["name"] == name]
    if not ids:
        raise ValueError(f"{json_file} has no class '{name}'")
    kept = [a for a in data["annotations"] if a["category_id"] != ids[0]]
    dropped = len(data["annotations"]) - len(kept)
    data["annotations"] = kept
    with open(output, "w") as f:
        json.dump(data, f)
    return dropped


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(
        description="the demo's data: generate the splits (--generate ROOT), or write a split "
        "without one class (JSON_FILE OUTPUT --without-class NAME)"
    )
    parser.add_argument("json_file", nargs="?")
    parser.add_argument("output", nargs="?")
    parser.add_argument("--without-class", choices=CLASSES)
    parser.add_argument("--generate", metavar="ROOT", help="generate the splits under ROOT")
    parser.add_argument("--num-train", type=int, default=800)
    parser.add_argument("--num-val", type=int, default=200)
    parser.add_argument("--num-test", type=int, default=0)
    parser.add_argument("--variant", default="default", choices=sorted(VARIANTS))
    parser.add_argument(
        "--statistics", action="store_true", help="print the foreground statistics of JSON_FILE"
    )
    parser.add_argument(
        "--compare",
        nargs="+",
        metavar="NAME=JSON",
        help="print the statistics of these splits beside COCO's published ones",
    )
    args = parser.parse_args()
    if args.generate:
        splits = shapes_dataset(
            args.generate,
            args.num_train,
            args.num_val,
            num_test=args.num_test,
            variant=args.variant,
        )
        print(json.dumps(splits))  # the last line: {split: [json, image folder]}
    elif args.compare:
        pairs = [item.split("=", 1) for item in args.compare]
        if any(len(p) != 2 for p in pairs):
            parser.error("--compare takes NAME=JSON pairs")
        print(statistics_table(dict(pairs)))
    elif args.statistics and args.json_file:
        for key, value in foreground_statistics(args.json_file).items():
            print(f"{key}: {value:.3f}")
    elif args.json_file and args.output and args.without_class:
        print(without_class(args.json_file, args.without_class, args.output), "annotations dropped")
    else:
        parser.error(
            "give --generate ROOT, JSON_FILE --statistics, or JSON_FILE OUTPUT --without-class NAME"
        )
