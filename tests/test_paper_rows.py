"""The paper's segmentation pair (DeepLabV3 on Cityscapes) and its stronger-teacher row (Cascade
Mask R-CNN), from the shipped configs, made tiny and trained a few steps of each stage on CPU.

The configs are loaded as shipped; only the sizes change (depth, widths, classes, crop) and,
where this CPU setup cannot run the real layers, their kind: BatchNorm for SyncBN (a single
process has no group to synchronise with) and plain for deformable convolutions (the
sal-detectron2 wheel has no compiled ops).
"""

import os

import numpy as np
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import transforms as T
from detectron2.data.datasets import load_sem_seg
from detectron2.model_zoo import get_config_file
from detectron2.modeling import build_model
from detectron2.projects.deeplab import add_deeplab_config
from PIL import Image
from tiny import (
    calibrate_bn,
    finite_loss_records,
    read_metrics,
    shrink_cfg,
    tiny_training,
    write_coco_dataset,
)

import maskd.engine.trainer
from maskd.checkpoint.export import export_student
from maskd.config import get_maskd_cfg, load_config
from maskd.engine import MasKDTrainer, build_evaluator, register_coco_datasets
from maskd.modeling.teacher import build_teacher
from maskd.projects.deeplab import (
    build_deeplab_train_loader,
    is_deeplab,
    semantic_train_augmentations,
)

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")
DEEPLAB = os.path.join(
    CONFIGS, "Cityscapes-SemanticSegmentation", "maskd_deeplab_v3_R_103-deeplab_v3_R_50_"
)
DEEPLAB_RES5 = os.path.join(
    CONFIGS, "Cityscapes-SemanticSegmentation", "maskd-res5_deeplab_v3_R_103-deeplab_v3_R_50_"
)
CASCADE = os.path.join(
    CONFIGS, "COCO-Detection", "maskd_cascade_mask_rcnn_X_152-faster_rcnn_R_50_FPN_"
)
SEM_CLASSES = 4  # 3 shapes + background
# DeepLabV3's image pooling uses a kernel of crop / 16 in evaluation too (as on Cityscapes, where
# 1024 x 2048 images are a multiple of the 512 x 1024 crop): 128 x 192 images, 64 x 96 crops.
CROP = (64, 96)


def write_sem_seg_dataset(folder, n_images=4, size=(128, 192), seed=0):
    """Images and label PNGs (values 0-3, 255 = ignore), as Cityscapes' labelTrainIds files."""
    rng = np.random.default_rng(seed)
    images, labels = os.path.join(folder, "images"), os.path.join(folder, "labels")
    os.makedirs(images, exist_ok=True)
    os.makedirs(labels, exist_ok=True)
    h, w = size
    for i in range(n_images):
        pixels = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
        label = np.zeros((h, w), dtype=np.uint8)
        for c in range(1, SEM_CLASSES):
            y0, x0 = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
            pixels[y0 : y0 + h // 3, x0 : x0 + w // 3] = (60 * c, 250 - 60 * c, 120)
            label[y0 : y0 + h // 3, x0 : x0 + w // 3] = c
        label[:2] = 255  # an ignored border, as Cityscapes has
        Image.fromarray(pixels).save(os.path.join(images, f"{i:04d}.png"))
        Image.fromarray(label).save(os.path.join(labels, f"{i:04d}.png"))
    return labels, images


def register_sem_seg(name, folder, seed):
    if name in DatasetCatalog.list():
        return
    labels, images = write_sem_seg_dataset(folder, seed=seed)
    DatasetCatalog.register(name, lambda: load_sem_seg(labels, images, "png", "png"))
    MetadataCatalog.get(name).set(
        stuff_classes=[f"c{i}" for i in range(SEM_CLASSES)],
        ignore_label=255,
        evaluator_type="sem_seg",
    )


# The DeepLab R103/R50 of the configs, small: fewer, thinner blocks; BN for SyncBN; 4 classes.
DEEPLAB_SMALL = [
    "MODEL.RESNETS.WIDTH_PER_GROUP",
    "8",
    "MODEL.RESNETS.RES2_OUT_CHANNELS",
    "32",
    "MODEL.RESNETS.NORM",
    "BN",
    "MODEL.SEM_SEG_HEAD.NORM",
    "BN",
    "MODEL.SEM_SEG_HEAD.NUM_CLASSES",
    str(SEM_CLASSES),
    "MODEL.SEM_SEG_HEAD.ASPP_CHANNELS",
    "16",
    "MODEL.SEM_SEG_HEAD.CONVS_DIM",
    "16",
    "INPUT.CROP.SIZE",
    str(CROP),
    "INPUT.MIN_SIZE_TRAIN",
    "(128,)",
    "INPUT.MAX_SIZE_TRAIN",
    "192",
    "INPUT.MIN_SIZE_TEST",
    "128",
    "INPUT.MAX_SIZE_TEST",
    "192",
    "DATALOADER.NUM_WORKERS",
    "0",
]


def _small_training(cfg, output_dir, train, test):
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (train,), (test,)
    cfg.SOLVER.IMS_PER_BATCH = 2
    # random tiny models: the shipped learning rates (Adam 0.01 for the tokens, 0.01 for a BN
    # student on batches of 2) saturate the masks or diverge within 3 steps
    cfg.SOLVER.BASE_LR = 1e-4
    cfg.SOLVER.MAX_ITER = 3
    cfg.SOLVER.WARMUP_ITERS = 0
    cfg.SOLVER.CHECKPOINT_PERIOD = 1000
    cfg.TEST.EVAL_PERIOD = 3  # evaluate at the end
    cfg.MODEL.DEVICE = "cpu"
    cfg.OUTPUT_DIR = str(output_dir)
    return cfg


def _train(cfg):
    trainer = MasKDTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    finite_loss_records(cfg.OUTPUT_DIR)
    return trainer, read_metrics(cfg.OUTPUT_DIR)


def _assert_same(a, b):
    for k, v in a.items():
        assert torch.equal(v, b[k]), k


def test_deeplab_cityscapes_pair_is_the_papers_segmentation_recipe():
    """The shipped pair distils what the paper distils: the output logits, 8 tokens without a
    weight head, no customised masks, no align conv, 0.5 x the loss; SGD lr 0.02, poly 0.9, 40k
    iterations of 16 crops of 512 x 1024. The res5 alternative keeps the teacher's schedule."""
    stage2 = load_config(DEEPLAB + "40k_cityscapes.yaml")
    m = stage2.MODEL.MASKD
    assert list(m.IN_FEATURES) == ["logits"] and not m.ALIGN
    assert (m.NUM_TOKENS, m.WEIGHTED, m.CUSTOM_MASK_WARMUP, m.LOSS_WEIGHT) == (8, False, -1, 0.5)
    solver = stage2.SOLVER
    assert (solver.OPTIMIZER, solver.BASE_LR, solver.MAX_ITER) == ("SGD", 0.02, 40000)
    assert (solver.LR_SCHEDULER_NAME, solver.POLY_LR_POWER) == ("WarmupPolyLR", 0.9)
    assert solver.IMS_PER_BATCH == 16 and tuple(stage2.INPUT.CROP.SIZE) == (512, 1024)
    stage1 = load_config(DEEPLAB + "tokens_cityscapes.yaml")
    assert list(stage1.MODEL.MASKD.IN_FEATURES) == ["logits"]
    assert stage2.MODEL.MASKD.TOKENS_WEIGHTS == os.path.join(stage1.OUTPUT_DIR, "model_final.pth")
    res5 = load_config(DEEPLAB_RES5 + "90k_cityscapes.yaml")
    assert list(res5.MODEL.MASKD.IN_FEATURES) == ["res5"] and res5.MODEL.MASKD.ALIGN
    assert res5.SOLVER.MAX_ITER == 90000


@pytest.mark.parametrize("pair", ["logits", "res5"])
def test_deeplab_cityscapes_pair_trains_both_stages(tmp_path, monkeypatch, pair):
    register_sem_seg("tiny_sem_train", str(tmp_path / "train"), 0)
    register_sem_seg("tiny_sem_val", str(tmp_path / "val"), 1)
    prefix, schedule = (DEEPLAB, "40k") if pair == "logits" else (DEEPLAB_RES5, "90k")

    # The teacher, as a user has it: the shipped teacher config (DeepLab's own keys), small.
    stage2 = get_maskd_cfg()
    stage2.merge_from_file(prefix + f"{schedule}_cityscapes.yaml")
    teacher_file = os.path.join(CONFIGS, "..", stage2.MODEL.MASKD.TEACHER.CONFIG_FILE)
    teacher_cfg = load_config(teacher_file, DEEPLAB_SMALL)
    assert teacher_cfg.MODEL.SEM_SEG_HEAD.LOSS_TYPE == "hard_pixel_mining"  # DeepLab's key
    torch.manual_seed(0)
    teacher = build_teacher(teacher_file, DEEPLAB_SMALL, load=False)
    assert type(teacher.backbone).__name__ == "ResNet"
    assert type(teacher.backbone.stem).__name__ == "DeepLabStem"  # the teacher's R103 stem
    weights = tmp_path / "deeplab_teacher.pth"
    torch.save({"model": teacher.state_dict()}, weights)

    def configure(cfg, name):
        cfg.merge_from_list(DEEPLAB_SMALL)
        cfg.MODEL.WEIGHTS = ""
        cfg.MODEL.MASKD.TEACHER.CONFIG_FILE = teacher_file
        cfg.MODEL.MASKD.TEACHER.OPTS = DEEPLAB_SMALL
        cfg.MODEL.MASKD.TEACHER.WEIGHTS = str(weights)
        return _small_training(cfg, tmp_path / name, "tiny_sem_train", "tiny_sem_val")

    stage1 = configure(load_config(prefix + "tokens_cityscapes.yaml"), "s1")
    assert is_deeplab(stage1)
    augs = semantic_train_augmentations(stage1)  # the DeepLab project's order
    assert [type(a) for a in augs] == [
        T.ResizeShortestEdge,
        T.RandomCrop_CategoryAreaConstraint,
        T.RandomFlip,
    ]
    loaders = []  # MasKDTrainer builds DeepLab's loader for DeepLab models

    def spy(cfg):
        loaders.append(cfg.MODEL.SEM_SEG_HEAD.NAME)
        return build_deeplab_train_loader(cfg)

    monkeypatch.setattr(maskd.engine.trainer, "build_deeplab_train_loader", spy)
    trainer, records = _train(stage1)
    assert loaders == ["DeepLabV3Head"]
    model = trainer.model
    level = "logits" if pair == "logits" else "res5"
    assert model.in_features == [level]
    assert model.tokens[level].num_tokens == 8 and not model.tokens[level].weighted
    if pair == "logits":  # the tokens see the teacher's class scores
        assert model.tokens[level].channels == SEM_CLASSES
    assert "loss_dice" in records[0] and "loss_sem_seg" in records[0]
    assert any("retention/sem_seg/mIoU" in r for r in records)  # the plain teacher beside it
    _assert_same(torch.load(weights, weights_only=True)["model"], _teacher_state(model))

    stage2 = configure(stage2, "s2")
    stage2.MODEL.MASKD.TOKENS_WEIGHTS = str(tmp_path / "s1" / "model_final.pth")
    trainer, records = _train(stage2)
    model = trainer.model
    assert type(model.student.backbone.inner).__name__ == "ResNet"
    assert type(model.student.sem_seg_head).__name__ == "DeepLabV3Head"
    assert model.student.backbone.inner.stem.conv1.out_channels == 64  # the student's basic stem
    assert type(trainer.scheduler).__name__ == "WarmupPolyLR"
    assert all(r["loss_maskd"] > 0 for r in records if "loss_maskd" in r)
    align = model.align[level]
    assert isinstance(align, torch.nn.Identity if pair == "logits" else torch.nn.Conv2d)
    assert any("sem_seg/mIoU" in r for r in records)  # evaluated by detectron2's evaluator
    _assert_same(torch.load(weights, weights_only=True)["model"], _teacher_state(model))

    # The released student's config loads as the DeepLab project's own configs do.
    release = tmp_path / "release" / "student.pth"
    export_student(str(tmp_path / "s2" / "model_final.pth"), str(release), stage2)
    plain = get_cfg()
    add_deeplab_config(plain)
    plain.merge_from_file(str(release.with_suffix(".yaml")))
    assert plain.MODEL.META_ARCHITECTURE == "SemanticSegmentor" and "MASKD" not in plain.MODEL
    student = build_model(plain)
    DetectionCheckpointer(student).load(plain.MODEL.WEIGHTS)
    student_state = model.student.state_dict()
    for k, v in student.state_dict().items():
        assert torch.equal(v, student_state[k]), k


def _teacher_state(model):
    from maskd.modeling.backbone import unwrap_backbone

    state = dict(model.teacher.state_dict())
    inner = unwrap_backbone(model.teacher.backbone)
    if inner is not model.teacher.backbone:  # stage 1: the tokens wrap the backbone
        state = {k: v for k, v in state.items() if not k.startswith("backbone.tokens.")}
    return state


def test_cityscapes_evaluation_needs_cityscapesscripts_and_says_so():
    name = "tiny_cityscapes_like"
    if name not in DatasetCatalog.list():
        DatasetCatalog.register(name, lambda: [])
        MetadataCatalog.get(name).set(evaluator_type="cityscapes_sem_seg", ignore_label=255)
    cfg = get_maskd_cfg()
    try:
        import cityscapesscripts  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install cityscapesscripts"):
            build_evaluator(cfg, name)
        # and a training run that would evaluate on it stops before it starts
        cfg.DATASETS.TEST = (name,)
        with pytest.raises(ImportError, match=f"dataset '{name}' is evaluated with"):
            MasKDTrainer(cfg)
    else:
        assert type(build_evaluator(cfg, name)).__name__ == "CityscapesSemSegEvaluator"
    # the shipped pair evaluates on detectron2's own Cityscapes registration
    assert MetadataCatalog.get("cityscapes_fine_sem_seg_val").evaluator_type == "cityscapes_sem_seg"


def test_cascade_stronger_teacher_row_trains_both_stages(tmp_path):
    train = write_coco_dataset(str(tmp_path / "train"), n_images=4, seed=0)
    val = write_coco_dataset(str(tmp_path / "val"), n_images=2, seed=1)
    if "rows_train" not in DatasetCatalog.list():
        register_coco_datasets([("rows_train", *train), ("rows_val", *val)])

    stage2 = get_maskd_cfg()
    stage2.merge_from_file(CASCADE + "2x_coco.yaml")
    zoo = stage2.MODEL.MASKD.TEACHER.CONFIG_FILE
    # The teacher: the zoo's Cascade Mask R-CNN X152 config (GN, ResNeXt, deformable conv) at a
    # small size, written as a user's teacher config with its weights.
    teacher_cfg = get_maskd_cfg()
    teacher_cfg.merge_from_file(get_config_file(zoo))
    assert teacher_cfg.MODEL.ROI_HEADS.NAME == "CascadeROIHeads"
    assert teacher_cfg.MODEL.RESNETS.DEPTH == 152 and any(
        teacher_cfg.MODEL.RESNETS.DEFORM_ON_PER_STAGE
    )
    shrink_cfg(teacher_cfg, depth=50, fpn_channels=32)
    teacher_cfg.merge_from_list(
        [
            "MODEL.RESNETS.NUM_GROUPS", "1",
            "MODEL.RESNETS.WIDTH_PER_GROUP", "32",
            "MODEL.RESNETS.DEFORM_ON_PER_STAGE", "[False, False, False, False]",
            "MODEL.ROI_BOX_HEAD.CONV_DIM", "32",
            "MODEL.ROI_MASK_HEAD.CONV_DIM", "32",
            # FrozenBN of random weights would give features of scale 1000+: BN, calibrated
            "MODEL.RESNETS.NORM", "BN",
        ]
    )  # fmt: skip
    teacher_file = tmp_path / "cascade_teacher.yaml"
    teacher_file.write_text(teacher_cfg.dump())
    torch.manual_seed(0)
    teacher = build_teacher(str(teacher_file), load=False)
    calibrate_bn(teacher)
    weights = tmp_path / "cascade_teacher.pth"
    torch.save({"model": teacher.state_dict()}, weights)

    def configure(cfg, name):
        shrink_cfg(cfg, depth=18, fpn_channels=16)
        cfg.MODEL.RESNETS.NORM = "GN"
        cfg.MODEL.MASKD.TEACHER.CONFIG_FILE = str(teacher_file)
        cfg.MODEL.MASKD.TEACHER.WEIGHTS = str(weights)
        cfg = tiny_training(cfg, tmp_path / name)
        cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = ("rows_train",), ("rows_val",)
        return cfg

    stage1 = configure(load_config(CASCADE + "tokens_coco.yaml"), "s1")
    stage1.SOLVER.BASE_LR = 1e-4  # as in _small_training
    trainer, records = _train(stage1)
    assert "loss_mask" in records[0] and "loss_dice" in records[0]  # the teacher's mask loss too
    _assert_same(torch.load(weights, weights_only=True)["model"], _teacher_state(trainer.model))

    stage2 = configure(stage2, "s2")
    stage2.MODEL.MASKD.TOKENS_WEIGHTS = str(tmp_path / "s1" / "model_final.pth")
    assert (stage2.MODEL.MASKD.LOSS_WEIGHT, stage2.MODEL.MASKD.CUSTOM_MASK_WARMUP) == (1.0, 5000)
    trainer, records = _train(stage2)
    assert type(trainer.model.teacher.roi_heads).__name__ == "CascadeROIHeads"
    assert all(
        r["loss_roi_reg_kd"] >= 0 and r["loss_maskd"] > 0 for r in records if "loss_maskd" in r
    )
    _assert_same(torch.load(weights, weights_only=True)["model"], _teacher_state(trainer.model))
