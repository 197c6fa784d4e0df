import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
# tests/tiny.py and friends are helpers, importable by the test modules; and the tests always
# exercise this checkout's package, whichever clone the shared environment was installed from.
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, "projects", "MasKD"))
# The demo (demo/shapes.py, demo/report.py) lives outside the package, as detectron2 keeps its
# demo/ and tools/ outside detectron2/; train_net.py and distill_net.py are thin scripts at the
# root over maskd.cli.
sys.path.insert(0, os.path.join(ROOT, "demo"))
sys.path.insert(0, ROOT)


import dataclasses  # noqa: E402
from typing import List, Tuple  # noqa: E402

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

# The property tests of the guards (tests/test_guards.py): a bounded number of examples, the same
# ones in every run (a failure reproduces), no example database written into the checkout, and
# no deadline (the machine's load is not the code's).
settings.register_profile("maskd", max_examples=150, derandomize=True, database=None, deadline=None)
settings.load_profile("maskd")


@dataclasses.dataclass
class Datasets:
    """A test module's tiny COCO-format datasets on disk (see :func:`datasets`)."""

    tmp: object  # the module's folder (pathlib.Path)
    names: Tuple[str, str]  # (train, val), registered in this process
    train: Tuple[str, str]  # (annotation json, image folder)
    val: Tuple[str, str]
    register: List[str]  # the --register-coco arguments of a command


@pytest.fixture(scope="module")
def datasets(request, tmp_path_factory):
    """The workspace every CLI test starts from: a folder of the test module's own with a train
    (4 images) and a val (2 images) COCO-format dataset of tiny images, registered in this
    process under the module's own names (``<module>_train``, ``<module>_val``: no two modules
    share a name), and the ``--register-coco`` arguments that register them in a command."""
    from tiny import write_coco_dataset

    from maskd.engine import register_coco_datasets

    module = request.module.__name__.rsplit(".", 1)[-1]
    module = module[len("test_") :] if module.startswith("test_") else module
    tmp = tmp_path_factory.mktemp(module)
    train = write_coco_dataset(str(tmp / "train"), n_images=4, seed=0)
    val = write_coco_dataset(str(tmp / "val"), n_images=2, seed=1)
    names = (f"{module}_train", f"{module}_val")
    register_coco_datasets([(names[0], *train), (names[1], *val)])
    register = ["--register-coco", names[0], *train, "--register-coco", names[1], *val]
    return Datasets(tmp, names, train, val, register)


@dataclasses.dataclass
class Teachers:
    """Two tiny R-CNN teachers on disk and tokens learned for the first (see :func:`teachers`)."""

    teacher: Tuple[str, str]  # (config file, weights file) of teacher A
    other: Tuple[str, str]  # teacher B: the same architecture, other weights
    tokens: str  # a stage-1 checkpoint (untrained tokens) of teacher A: tokens_a.pth


@pytest.fixture(scope="module")
def teachers(datasets):
    """The files the trust, bad-input and reliability tests distil from, in the module's
    folder: teacher A (``teacher_a``, seed 0), teacher B (``teacher_b``, seed 1) and a stage-1
    checkpoint of teacher A (``tokens_a.pth``, tokens of seed 0)."""
    import torch
    from detectron2.modeling import build_model
    from tiny import maskd_cfg, write_teacher

    from maskd.checkpoint import MasKDCheckpointer

    tmp = datasets.tmp
    teacher = write_teacher(tmp, "rcnn", seed=0, name="teacher_a")[:2]
    other = write_teacher(tmp, "rcnn", seed=1, name="teacher_b")[:2]
    torch.manual_seed(0)
    stage1 = build_model(maskd_cfg("MasKDTokenLearner", "rcnn", *teacher))
    MasKDCheckpointer(stage1, save_dir=str(tmp)).save("tokens_a")
    return Teachers(teacher, other, str(tmp / "tokens_a.pth"))
