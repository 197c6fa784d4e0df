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

from .._compat import coco_api_of

__all__ = [
    "register_coco_datasets",
    "load_checked_coco_json",
    "check_coco_images_once",
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
    annotation file must be JSON in COCO's layout with unique image and annotation ids, every
    annotation of an image in the file, every polygon of three points or more; every box must be
    4 finite numbers, of non-negative width and height, that overlap its image; every image must
    exist and have a header that PIL reads, within PIL's decompression-bomb limit, of the size
    the file states.

    The file is parsed once. The image check reads each image's header (not its pixels), in
    threads, once per run: a process that checked a dataset's images (or was started by one:
    see :func:`check_coco_images_once`) does not read them again while the annotation file is
    unchanged.

    Raises:
        ValueError: naming the dataset, the file and the first problems found.
    """
    where = f"dataset '{name}' ('{json_file}', images in '{image_root}')"
    data = _read_annotation_file(json_file, name)
    _check_ids(data, json_file, name)
    try:
        with coco_api_of(data):  # the file is parsed once
            dicts = load_coco_json(json_file, image_root, name)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise ValueError(
            f"dataset '{name}': '{json_file}' is not a COCO annotation file "
            f"({type(e).__name__}: {e}); expected 'images', 'annotations' and 'categories'"
        ) from None
    problems = [p for record in dicts for p in _box_problems(record)]
    key = _images_key(json_file, image_root)
    images_checked = key in _checked_images()
    if not images_checked:
        problems += _image_problems(dicts)
    if problems:
        more = f" ... and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise ValueError(f"{where}: " + "; ".join(problems[:5]) + more)
    if not images_checked:
        _remember_checked(key)
    return dicts


def check_coco_images_once(specs: Iterable[Sequence[str]]) -> None:
    """Load and check each (name, annotation json, image root) of ``specs`` in this process, and
    mark their images checked for the processes it starts afterwards (the launching process of a
    multi-GPU run calls this before ``launch``: each worker then parses its annotation files but
    does not read every image header again).

    Raises:
        ValueError: as :func:`load_checked_coco_json`.
    """
    for name, json_file, image_root in specs:
        load_checked_coco_json(json_file, image_root, name)


# The image checks this process (or the one that started it) has made: the environment carries
# them to the workers a launch spawns.
CHECKED_IMAGES_ENV = "MASKD_CHECKED_IMAGES"
_IMAGE_THREADS = 2  # more threads contend for the GIL: 8 took 2.5x the time of 1 or 2 on 2 cores
_CHUNK = 512


def _images_key(json_file: str, image_root: str) -> str:
    """The annotation file and the image folder, with their sizes and modification times: an
    edited annotation file, or an image added to or removed from the folder, is checked again."""
    files = [os.stat(json_file), os.stat(image_root)]
    return json.dumps(
        [os.path.realpath(json_file), os.path.realpath(image_root)]
        + [[stat.st_size, stat.st_mtime_ns] for stat in files]
    )


def _checked_images() -> set:
    try:
        keys = json.loads(os.environ.get(CHECKED_IMAGES_ENV, "[]"))
    except json.JSONDecodeError:
        return set()
    return set(keys) if isinstance(keys, list) else set()


def _remember_checked(key: str) -> None:
    os.environ[CHECKED_IMAGES_ENV] = json.dumps(sorted(_checked_images() | {key}))


def _read_annotation_file(json_file: str, name: str) -> dict:
    """The parsed annotation file, its JSON errors named."""
    try:
        with open(json_file) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"dataset '{name}': '{json_file}' is not valid JSON: {e}") from None
    except RecursionError:
        raise ValueError(
            f"dataset '{name}': '{json_file}' nests its JSON deeper than Python's parser goes: "
            "not a COCO annotation file"
        ) from None
    return data


def _check_ids(data, json_file: str, name: str) -> None:
    """Fail where the raw file has what pycocotools and detectron2 would pass over without a
    word: two images of one id (pycocotools keeps the last, and the annotations of both land on
    it), ids that are not integers or strings, and the annotations :func:`_check_annotations`
    refuses."""
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise ValueError(
            f"dataset '{name}': '{json_file}' is not a COCO annotation file: expected "
            "'images', 'annotations' and 'categories'"
        )
    where = f"dataset '{name}': '{json_file}'"
    seen, repeated = set(), []
    for image in images:
        image_id = image.get("id") if isinstance(image, dict) else None
        if not _is_id(image_id):
            raise ValueError(
                f"{where}: an image's id is {image_id!r}; ids are integers (or strings)"
            )
        if image_id in seen:
            repeated.append(image_id)
        seen.add(image_id)
    if repeated:
        raise ValueError(
            f"{where} has images with the same id ({repeated[:5]}): "
            "their annotations would be merged onto one image; give every image its own id"
        )
    _check_annotations(data.get("annotations", []), seen, where)


_NUMBER_TYPES = {int, float}  # exact types: a bool is not a coordinate


def _is_id(value) -> bool:
    return isinstance(value, (int, str)) and not isinstance(value, bool)


def _check_annotations(annotations, image_ids: set, where: str) -> None:
    """Fail, naming the annotation, where detectron2 would drop an object without a word: an
    annotation whose image is not in the file, two annotations of one id (pycocotools keeps
    one), a polygon that is not a list of at least three (x, y) points (detectron2 drops the
    whole object, box included, for a polygon it cannot use)."""
    if not isinstance(annotations, list):
        raise ValueError(f"{where}: 'annotations' is a {type(annotations).__name__}, not a list")
    ids, orphans, repeated, polygons = set(), [], [], []
    for ann in annotations:
        if not isinstance(ann, dict):
            raise ValueError(f"{where}: an annotation is a {type(ann).__name__}, not an object")
        ann_id = ann.get("id")
        if "id" in ann and not _is_id(ann_id):
            raise ValueError(f"{where}: an annotation's id is {ann_id!r}, not an integer")
        if ann_id in ids:
            repeated.append(ann_id)
        ids.add(ann_id)
        image_id = ann.get("image_id")
        if not _is_id(image_id) or image_id not in image_ids:
            orphans.append(f"annotation {ann_id!r} (image id {image_id!r})")
        segm = ann.get("segmentation")
        if isinstance(segm, list) and not all(
            isinstance(poly, list)
            and len(poly) >= 6
            and len(poly) % 2 == 0
            and set(map(type, poly)) <= _NUMBER_TYPES
            for poly in segm
        ):
            polygons.append(f"annotation {ann_id!r} of image {image_id!r}")
    if orphans:
        raise ValueError(
            f"{where}: annotations of images the file does not have (detectron2 would drop "
            f"them): {', '.join(orphans[:5])}{' ...' if len(orphans) > 5 else ''}"
        )
    if repeated:
        raise ValueError(
            f"{where}: annotations with the same id ({repeated[:5]}): pycocotools keeps one of "
            "them; give every annotation its own id"
        )
    if polygons:
        raise ValueError(
            f"{where}: polygons that are not lists of at least three (x, y) points in "
            f"{', '.join(polygons[:5])}{' ...' if len(polygons) > 5 else ''} (detectron2 would "
            "drop the whole object, its box too)"
        )


def _image_problems(dicts: List[dict]) -> List[str]:
    """The problems of every record's image file, read in threads, a chunk of records each."""
    chunks = [dicts[i : i + _CHUNK] for i in range(0, len(dicts), _CHUNK)]
    with ThreadPoolExecutor(max_workers=_IMAGE_THREADS) as pool:
        found = pool.map(lambda chunk: [p for r in chunk for p in _header_problems(r)], chunks)
        return [p for problems in found for p in problems]


def _header_problems(record: dict) -> List[str]:
    """The image exists, PIL reads its header within the decompression-bomb limit, and its size
    (after EXIF rotation, as detectron2 reads it) is the one the annotation file states."""
    path = record["file_name"]
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
                if _orientation(image) in (5, 6, 7, 8):
                    actual = actual[::-1]  # detectron2 reads it rotated
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        return [f"image '{path}' is over PIL's decompression-bomb limit ({e})"]
    except (OSError, SyntaxError, ValueError) as e:
        return [f"image '{path}' cannot be read ({type(e).__name__}: {e})"]
    if tuple(size) != tuple(actual):
        return [
            f"image '{path}' is {actual[0]}x{actual[1]}, the annotation file says "
            f"{size[0]}x{size[1]}"
        ]
    return []


def _box_problems(record: dict) -> List[str]:
    """Every box is 4 finite numbers that overlap the image, of the size the annotation file
    states (:func:`_header_problems` checks that size against the image)."""
    path, width, height = record["file_name"], record.get("width"), record.get("height")
    if not all(type(v) in _NUMBER_TYPES for v in (width, height)):
        return [f"image '{path}' has a width and height of {width!r} x {height!r}, not numbers"]
    problems = []
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


def _orientation(image: Image.Image):
    """The EXIF orientation of an opened image, from its header. (For a PNG, PIL's ``getexif``
    decodes every pixel to look for an eXIf chunk after them; the header's chunk, where PIL
    writes it, is read instead: an image rotated by a later chunk still fails, later, in
    detectron2's own size check.)"""
    if image.format != "PNG":
        return image.getexif().get(_EXIF_ORIENTATION)
    raw = image.info.get("exif")
    if not raw:
        return None
    exif = Image.Exif()
    exif.load(raw)
    return exif.get(_EXIF_ORIENTATION)


def load_datasets(names: Iterable[str]) -> None:
    """Load each dataset once (``DatasetCatalog.get``), so that its files are checked and its
    metadata (``thing_classes``) is known before a run that would otherwise load it later (an
    evaluation)."""
    for name in names:
        DatasetCatalog.get(name)
