"""MasKD's configs by name, as ``detectron2.model_zoo`` gives detectron2's.

The configs are shipped inside the package (``maskd/model_zoo/configs``, built from the
repository's top-level ``configs/``), so an installed ``maskd`` reaches them without the
repository::

    from maskd import model_zoo
    path = model_zoo.get_config_file("COCO-Detection/maskd_faster_rcnn_R_101-faster_rcnn_R_50_FPN_2x_coco.yaml")
    cfg = model_zoo.get_config("COCO-Detection/maskd_faster_rcnn_R_101-faster_rcnn_R_50_FPN_2x_coco.yaml")
"""

import os
from typing import List, Sequence

from ..config import SHIPPED_CONFIG_ROOT, load_config, shipped_config_file

__all__ = ["get_config_file", "get_config", "list_configs", "CONFIG_ROOT"]

CONFIG_ROOT = SHIPPED_CONFIG_ROOT
_SUFFIXES = (".yaml", ".py")


def list_configs() -> List[str]:
    """The names of every shipped config (paths relative to the config folder), sorted."""
    names = []
    for folder, _, files in os.walk(CONFIG_ROOT, followlinks=True):
        for name in files:
            if name.endswith(_SUFFIXES):
                rel = os.path.relpath(os.path.join(folder, name), CONFIG_ROOT)
                names.append(rel.replace(os.sep, "/"))
    return sorted(names)


def get_config_file(name: str) -> str:
    """The path of a shipped config, by its name relative to the config folder (e.g.
    ``"COCO-Detection/maskd_faster_rcnn_R_101-faster_rcnn_R_50_FPN_2x_coco.yaml"``; a leading
    ``configs/`` is accepted).

    Raises:
        RuntimeError: naming the config, if MasKD ships no config of that name (as
            ``detectron2.model_zoo.get_config_file`` does).
    """
    return shipped_config_file(name)


def get_config(name: str, opts: Sequence[str] = ()):
    """A shipped config, loaded (yacs: a CfgNode with the MasKD keys; LazyConfig: its
    DictConfig), with overrides (yacs ``["KEY", "VALUE", ...]``, LazyConfig ``["k=v", ...]``).
    """
    return load_config(get_config_file(name), opts)
