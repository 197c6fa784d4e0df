"""The shapes data's semantic label maps as detectron2 semantic-segmentation datasets, for the
segmentation demo's training runs (``--import demo/seg_data.py``).

``demo/seg_demo.py`` generates the data and names it in the environment variable
:data:`ENV`, a JSON object ``{"classes": [...], "ignore_label": 255, "splits": {dataset name:
split folder}}``; importing this module registers every split with detectron2's ``load_sem_seg``
(``<folder>/images/*.png`` and their label maps ``<folder>/sem_seg/*.png``) and the metadata
its ``SemSegEvaluator`` reads. Every process of a run imports it, before its config is read.
"""

import json
import logging
import os

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_sem_seg

logger = logging.getLogger("maskd.demo.seg_data")

ENV = "MASKD_SHAPES_SEG"


def register(name: str, folder: str, classes, ignore_label: int) -> None:
    """Register one split's images and label maps as the semantic dataset ``name``."""
    images, labels = os.path.join(folder, "images"), os.path.join(folder, "sem_seg")
    for path in (images, labels):
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{ENV}: dataset '{name}': no folder {path}")
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, lambda: load_sem_seg(labels, images, "png", "png"))
    MetadataCatalog.get(name).set(
        stuff_classes=list(classes),
        ignore_label=ignore_label,
        evaluator_type="sem_seg",
        image_root=images,
        sem_seg_root=labels,
    )


def register_from_environment() -> list:
    """Register the splits :data:`ENV` names; their dataset names."""
    text = os.environ.get(ENV)
    if not text:
        raise RuntimeError(
            f"{ENV} is not set: demo/seg_demo.py names the generated splits there "
            '({"classes": [...], "ignore_label": 255, "splits": {name: folder}})'
        )
    spec = json.loads(text)
    for name, folder in spec["splits"].items():
        register(name, folder, spec["classes"], int(spec["ignore_label"]))
    logger.info("registered %s", sorted(spec["splits"]))
    return sorted(spec["splits"])


register_from_environment()
