"""A procedural COCO-format detection dataset, for the demo and for tests (nothing downloaded).

Scenes of shapes of several classes (disc, square, triangle, cross, ring) with random size,
colour, stripe texture and rotation, on cluttered backgrounds (gradients, noise, distractor
strokes), overlapping each other (instance masks are what stays visible). Each image comes
with boxes, instance masks (RLE) and a semantic label map. Deterministic by seed, cached on
disk (a finished split is never regenerated), written with a progress bar.
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
}


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
        img, sem, masks, classes = _render(
            rng, size, scene["max_objects"], scene["radius"], scene["min_pixels"]
        )
        name = f"{i:06d}.png"
        cv2.imwrite(os.path.join(image_dir, name), img)
        cv2.imwrite(os.path.join(folder, "sem_seg", name), sem)
        images.append({"id": i + 1, "file_name": name, "width": size, "height": size})
        for m, c in zip(masks, classes):
            rle = mask_util.encode(np.asfortranarray(m.astype(np.uint8)))
            x, y, w, h = (float(v) for v in mask_util.toBbox(rle))
            rle["counts"] = rle["counts"].decode("ascii")
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": c + 1,
                    "bbox": [x, y, w, h],
                    "area": float(m.sum()),
                    "iscrowd": 0,
                    "segmentation": rle,
                }
            )
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
        under 32x32 pixels, COCO's "small"), "box area / image area" (mean per box), and
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
    for stride in strides:
        shares = []
        for im in data["images"]:
            h, w = math.ceil(im["height"] / stride), math.ceil(im["width"] / stride)
            cells = box_cells(torch.tensor(boxes[im["id"]]).reshape(-1, 4), stride, h, w)
            shares.append(cells.mean().item())
        out[f"cells in boxes, p{int(math.log2(stride))}"] = float(np.mean(shares))
    return out


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
    elif args.statistics and args.json_file:
        for key, value in foreground_statistics(args.json_file).items():
            print(f"{key}: {value:.3f}")
    elif args.json_file and args.output and args.without_class:
        print(without_class(args.json_file, args.without_class, args.output), "annotations dropped")
    else:
        parser.error(
            "give --generate ROOT, JSON_FILE --statistics, or JSON_FILE OUTPUT --without-class NAME"
        )
