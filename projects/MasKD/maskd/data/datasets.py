"""Datasets of a run: COCO-format registration whose loading checks the files, and the checks
that run before training or evaluation starts."""

import functools
import importlib.util
import json
import logging
import math
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, List, Sequence

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json
from detectron2.structures import BoxMode
from PIL import Image

__all__ = [
    "register_coco_datasets",
    "load_checked_coco_json",
    "check_datasets",
    "load_datasets",
    "check_evaluation_dependencies",
]

logger = logging.getLogger(__name__)


def register_coco_datasets(specs: Iterable[Sequence[str]]) -> List[str]:
    """Register COCO-format datasets: each spec is (name, annotation json, image root), as
    detectron2's ``register_coco_instances`` does, but loaded by :func:`load_checked_coco_json`.

    Registering the same name again with the same files is a no-op (launch workers);
    a different registration of an existing name is an error.
    """
    names = []
    for name, json_file, image_root in specs:
        if not os.path.isfile(json_file):
            raise FileNotFoundError(f"dataset '{name}': annotation file not found: '{json_file}'")
        if not os.path.isdir(image_root):
            raise FileNotFoundError(f"dataset '{name}': image folder not found: '{image_root}'")
        if name in DatasetCatalog.list():
            meta = MetadataCatalog.get(name)
            if getattr(meta, "json_file", None) == json_file:
                names.append(name)
                continue
            raise ValueError(f"dataset '{name}' is already registered with other files")
        DatasetCatalog.register(
            name, functools.partial(load_checked_coco_json, json_file, image_root, name)
        )
        # what detectron2's register_coco_instances sets
        MetadataCatalog.get(name).set(
            json_file=json_file, image_root=image_root, evaluator_type="coco"
        )
        names.append(name)
    return names


def check_datasets(names: Iterable[str]) -> None:
    """Fail early, with the known names, if a dataset name is not registered."""
    known = set(DatasetCatalog.list())
    missing = [n for n in names if n not in known]
    if missing:
        raise KeyError(
            f"dataset(s) {missing} are not registered. Register a COCO-format dataset with "
            "--register-coco NAME JSON IMAGE_ROOT, or use one of detectron2's builtin names "
            f"(e.g. coco_2017_train); registered: {sorted(known)[:8]}..."
        )


def check_evaluation_dependencies(dataset_names: Iterable[str]) -> None:
    """Fail before a run whose evaluation would fail: detectron2's CityscapesSemSegEvaluator
    (datasets of ``evaluator_type`` "cityscapes_sem_seg") imports the official Cityscapes scripts
    only when it evaluates, after training. An optional dependency of MasKD
    (``pip install "maskd-detectron2[cityscapes]"``)."""
    for name in dataset_names:
        kind = getattr(MetadataCatalog.get(name), "evaluator_type", None)
        if kind == "cityscapes_sem_seg" and importlib.util.find_spec("cityscapesscripts") is None:
            raise ImportError(
                f"dataset '{name}' is evaluated with detectron2's CityscapesSemSegEvaluator (the "
                "official Cityscapes scripts), which needs the 'cityscapesscripts' package: "
                "pip install cityscapesscripts"
            )


def load_checked_coco_json(json_file: str, image_root: str, name: str) -> List[dict]:
    """detectron2's ``load_coco_json``, then a check of what it read, so that a bad file fails
    when the dataset is loaded (before training or evaluation starts), naming the file: the
    annotation file must be JSON in COCO's layout with unique image ids; every image must exist
    and have a header that PIL reads, within PIL's decompression-bomb limit, of the size the
    file states; every box must be 4 finite numbers, of non-negative width and height, that
    overlap its image.

    The image check reads each image's header (not its pixels), in threads.

    Raises:
        ValueError: naming the dataset, the file and the first problems found.
    """
    where = f"dataset '{name}' ('{json_file}', images in '{image_root}')"
    _check_image_ids(json_file, name)
    try:
        dicts = load_coco_json(json_file, image_root, name)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise ValueError(
            f"dataset '{name}': '{json_file}' is not a COCO annotation file "
            f"({type(e).__name__}: {e}); expected 'images', 'annotations' and 'categories'"
        ) from None
    with ThreadPoolExecutor(max_workers=_IMAGE_THREADS) as pool:
        problems = [p for found in pool.map(_record_problems, dicts) for p in found]
    if problems:
        more = f" ... and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise ValueError(f"{where}: " + "; ".join(problems[:5]) + more)
    return dicts


_IMAGE_THREADS = 8


def _check_image_ids(json_file: str, name: str) -> None:
    """Fail where two images of the file have one id: pycocotools keeps the last, and the
    annotations of both land on it."""
    try:
        with open(json_file) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"dataset '{name}': '{json_file}' is not valid JSON: {e}") from None
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise ValueError(
            f"dataset '{name}': '{json_file}' is not a COCO annotation file: expected "
            "'images', 'annotations' and 'categories'"
        )
    seen, repeated = set(), []
    for image in images:
        image_id = image.get("id") if isinstance(image, dict) else None
        if image_id in seen:
            repeated.append(image_id)
        seen.add(image_id)
    if repeated:
        raise ValueError(
            f"dataset '{name}': '{json_file}' has images with the same id ({repeated[:5]}): "
            "their annotations would be merged onto one image; give every image its own id"
        )


def _record_problems(record: dict) -> List[str]:
    path = record["file_name"]
    problems = []
    if not os.path.isfile(path):
        return [f"image missing: '{path}'"]
    if os.path.getsize(path) == 0:
        return [f"image empty: '{path}'"]
    size = (record.get("width"), record.get("height"))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                actual = image.size
                if image.getexif().get(_EXIF_ORIENTATION) in (5, 6, 7, 8):
                    actual = actual[::-1]  # detectron2 reads it rotated
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        return [f"image '{path}' is over PIL's decompression-bomb limit ({e})"]
    except (OSError, SyntaxError, ValueError) as e:
        return [f"image '{path}' cannot be read ({type(e).__name__}: {e})"]
    if None not in size and tuple(size) != tuple(actual):
        problems.append(
            f"image '{path}' is {actual[0]}x{actual[1]}, the annotation file says "
            f"{size[0]}x{size[1]}"
        )
    width, height = actual
    for ann in record.get("annotations", []):
        box = ann.get("bbox")
        if box is None:
            continue
        if len(box) != 4 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in box):
            problems.append(f"box {box} of image '{path}' is not 4 finite numbers")
            continue
        mode = ann.get("bbox_mode")
        if mode == BoxMode.XYWH_ABS:
            if box[2] < 0 or box[3] < 0:
                problems.append(f"box {box} of image '{path}' has a negative width or height")
                continue
            x0, y0, x1, y1 = box[0], box[1], box[0] + box[2], box[1] + box[3]
        elif mode == BoxMode.XYXY_ABS:
            if box[2] < box[0] or box[3] < box[1]:
                problems.append(f"box {box} of image '{path}' ends before it starts")
                continue
            x0, y0, x1, y1 = box
        else:
            continue
        if x1 < 0 or y1 < 0 or x0 > width or y0 > height:
            problems.append(
                f"box {box} of image '{path}' lies outside the {width}x{height} image "
                "(detectron2 would drop it)"
            )
    return problems


_EXIF_ORIENTATION = 0x0112


def load_datasets(names: Iterable[str]) -> None:
    """Load each dataset once (``DatasetCatalog.get``), so that its files are checked and its
    metadata (``thing_classes``) is known before a run that would otherwise load it later (an
    evaluation)."""
    for name in names:
        DatasetCatalog.get(name)
