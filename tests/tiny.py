"""Tiny detectron2 models and inputs for CPU tests (small ResNet + FPN, 64-128 px images)."""

import os
import subprocess
import sys

import torch
from detectron2.config import get_cfg
from detectron2.model_zoo import get_config_file
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

NUM_CLASSES = 3
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_NET = os.path.join(ROOT, "train_net.py")
TEACHER_DEPTH, TEACHER_FPN = 34, 32
STUDENT_DEPTH, STUDENT_FPN = 18, 16


ZOO_CONFIGS = {
    "rcnn": "COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml",
    "mask_rcnn": "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml",
    "cascade": "Misc/cascade_mask_rcnn_R_50_FPN_1x.yaml",
    "retinanet": "COCO-Detection/retinanet_R_50_FPN_1x.yaml",
    "panoptic": "COCO-PanopticSegmentation/panoptic_fpn_R_50_1x.yaml",
    "semantic": "Misc/semantic_R_50_FPN_1x.yaml",
}
# What each kind's batches need besides boxes.
NEEDS = {
    "rcnn": {},
    "mask_rcnn": {"with_masks": True},
    "cascade": {"with_masks": True},
    "retinanet": {},
    "panoptic": {"with_masks": True, "with_sem_seg": True},
    "semantic": {"with_sem_seg": True},
    "fcos": {},
}


def tiny_cfg(kind="rcnn", depth=18, fpn_channels=32):
    """A yacs config of a tiny detectron2 model of the given kind on CPU (no weights)."""
    cfg = get_cfg()
    cfg.merge_from_file(get_config_file(ZOO_CONFIGS[kind]))
    shrink_cfg(cfg, depth=depth, fpn_channels=fpn_channels)
    return cfg


def tiny_rcnn_cfg(depth=18, fpn_channels=32):
    """A yacs config of a tiny Faster R-CNN R-FPN on CPU (no weights)."""
    return tiny_cfg("rcnn", depth, fpn_channels)


def tiny_fcos(depth=18, fpn_channels=32, norm="FrozenBN"):
    """A LazyConfig model node of a tiny FCOS R-FPN (detectron2's FCOS is LazyConfig only)."""
    from detectron2.layers import ShapeSpec
    from detectron2.model_zoo import get_config

    model = get_config("COCO-Detection/fcos_R_50_FPN_1x.py").model
    model.backbone.bottom_up.stages.depth = depth
    del model.backbone.bottom_up.stages.stride_in_1x1  # BasicBlock has no such option
    model.backbone.bottom_up.stages.norm = norm
    model.backbone.bottom_up.stem.norm = norm
    model.backbone.out_channels = fpn_channels
    model.backbone.top_block.in_channels = fpn_channels
    model.head.input_shape = [ShapeSpec(channels=fpn_channels)] * 5
    model.head.conv_dims = [fpn_channels] * 2
    model.head.norm = ""  # GroupNorm(32) cannot normalise the 1x1 P7 of a 64 px image
    model.num_classes = NUM_CLASSES
    return model


def tiny_vitdet(square_pad=128, channels=32):
    """A LazyConfig model node of a tiny ViTDet Faster R-CNN: plain ViT (patch 16, 2 blocks, one
    with window attention, relative positions) + SimpleFeaturePyramid, as detectron2's
    ``common/models/mask_rcnn_vitdet.py`` builds it, without the mask head.

    Its differences from the tiny R-FPN students of these tests: RGB input with ImageNet
    mean/std, a ``square_pad`` square, and levels p3-p6 only (scale factors 2, 1, 1/2 of the
    stride-16 ViT map, plus max-pool P6).
    """
    from detectron2.layers import ShapeSpec
    from detectron2.model_zoo import get_config

    model = get_config("common/models/mask_rcnn_vitdet.py").model
    net = model.backbone.net
    net.update(
        img_size=128,
        embed_dim=channels,
        depth=2,
        num_heads=2,
        drop_path_rate=0.0,
        window_size=4,
        window_block_indexes=[0],
    )
    model.backbone.update(out_channels=channels, scale_factors=(2.0, 1.0, 0.5))
    model.backbone.square_pad = square_pad
    levels = ["p3", "p4", "p5", "p6"]
    rpn = model.proposal_generator
    rpn.in_features = levels
    rpn.head.in_channels = channels
    rpn.anchor_generator.update(sizes=[[16], [32], [64], [128]], strides=[8, 16, 32, 64])
    rpn.batch_size_per_image = 32
    rpn.post_nms_topk = (64, 32)
    roi = model.roi_heads
    roi.update(mask_in_features=None, mask_pooler=None, mask_head=None)
    roi.num_classes = NUM_CLASSES
    roi.batch_size_per_image = 16
    roi.box_in_features = levels[:3]
    roi.box_pooler.scales = (1.0 / 8, 1.0 / 16, 1.0 / 32)
    roi.box_head.update(
        input_shape=ShapeSpec(channels=channels, height=7, width=7), conv_dims=[16], fc_dims=[32]
    )
    roi.box_predictor.input_shape = ShapeSpec(channels=32)
    return model


def shrink_cfg(cfg, depth=18, fpn_channels=32):
    """Make a detectron2 FPN config tiny, in place: small ResNet, thin FPN, few samples."""
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.RESNETS.DEPTH = depth
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.RESNETS.STEM_OUT_CHANNELS = 32 if depth >= 50 else 64
    cfg.MODEL.RESNETS.WIDTH_PER_GROUP = 8 if depth >= 50 else 64
    cfg.MODEL.FPN.OUT_CHANNELS = fpn_channels
    cfg.MODEL.RPN.BATCH_SIZE_PER_IMAGE = 32
    cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = 64
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 32
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 16
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = NUM_CLASSES
    cfg.MODEL.ROI_BOX_HEAD.FC_DIM = 32
    cfg.MODEL.ROI_MASK_HEAD.CONV_DIM = 16
    cfg.MODEL.ROI_MASK_HEAD.NUM_CONV = 1
    cfg.MODEL.RETINANET.NUM_CLASSES = NUM_CLASSES
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = NUM_CLASSES + 1
    cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM = 32
    cfg.INPUT.MIN_SIZE_TEST = 64
    cfg.INPUT.MAX_SIZE_TEST = 128
    return cfg


def tiny_batch(n=2, size=64, seed=0, with_masks=False, with_sem_seg=False, empty=()):
    """Batched inputs as detectron2's DatasetMapper produces them.

    Args:
        empty: indices of images that get no annotation at all.
    """
    g = torch.Generator().manual_seed(seed)
    batch = []
    for i in range(n):
        image = torch.randint(0, 256, (3, size, size), generator=g, dtype=torch.uint8)
        inst = Instances((size, size))
        k = 0 if i in empty else 2
        xy = torch.rand(k, 2, generator=g) * size * 0.5
        wh = 8 + torch.rand(k, 2, generator=g) * size * 0.4
        boxes = torch.cat([xy, (xy + wh).clamp(max=size - 1)], dim=1)
        inst.gt_boxes = Boxes(boxes)
        inst.gt_classes = torch.randint(0, NUM_CLASSES, (k,), generator=g)
        if with_masks:
            from detectron2.structures import BitMasks

            masks = torch.zeros(k, size, size, dtype=torch.bool)
            for j, (x0, y0, x1, y1) in enumerate(boxes.round().long().tolist()):
                masks[j, y0:y1, x0:x1] = True
            inst.gt_masks = BitMasks(masks)
        item = {"image": image, "instances": inst, "height": size, "width": size}
        if with_sem_seg:
            sem = torch.full((size, size), NUM_CLASSES, dtype=torch.long)
            for (x0, y0, x1, y1), c in zip(boxes.round().long().tolist(), inst.gt_classes):
                sem[y0:y1, x0:x1] = c
            item["sem_seg"] = sem
        batch.append(item)
    return batch


def write_coco_dataset(folder, n_images=4, size=64, seed=0):
    """A COCO-format dataset on disk: PNG images of coloured rectangles, boxes and polygons.

    Returns:
        (annotation json path, image folder).
    """
    import json
    import os

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    image_dir = os.path.join(folder, "images")
    os.makedirs(image_dir, exist_ok=True)
    images, annotations = [], []
    for i in range(n_images):
        pixels = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
        for _ in range(2):
            c = int(rng.integers(0, NUM_CLASSES))
            x0, y0 = (int(v) for v in rng.integers(0, size // 2, 2))
            w, h = (int(v) for v in rng.integers(size // 6, size // 2, 2))
            pixels[y0 : y0 + h, x0 : x0 + w] = [(80, 200, 80), (200, 80, 80), (80, 80, 200)][c]
            poly = [x0, y0, x0 + w, y0, x0 + w, y0 + h, x0, y0 + h]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": c + 1,
                    "bbox": [x0, y0, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                    "segmentation": [poly],
                }
            )
        name = f"{i:04d}.png"
        Image.fromarray(pixels).save(os.path.join(image_dir, name))
        images.append({"id": i + 1, "file_name": name, "width": size, "height": size})
    categories = [{"id": c + 1, "name": f"class{c}"} for c in range(NUM_CLASSES)]
    json_file = os.path.join(folder, "annotations.json")
    with open(json_file, "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    return json_file, image_dir


def calibrate_bn(model):
    """Give BatchNorm layers real running statistics (cumulative averages over a few batches),
    so the untrained test teacher's features have a sane scale in eval mode."""
    from maskd.modeling.teacher import preprocess_images

    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    model.train()
    with torch.no_grad():
        for i in range(4):
            model.backbone(preprocess_images(model, tiny_batch(4, 64, seed=100 + i)).tensor)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = 0.1
    model.eval()


def write_teacher(tmp_path, kind, seed=0, depth=TEACHER_DEPTH, opts=(), name=None):
    """A teacher config file and a checkpoint of it, as a user would have them.

    The teacher's ResNet uses BatchNorm (with calibrated statistics) so that the tests check
    that its statistics never change; its FPN uses GroupNorm."""
    cfg = tiny_cfg(kind, depth=depth, fpn_channels=TEACHER_FPN)
    cfg.MODEL.RESNETS.NORM = "BN"
    cfg.MODEL.FPN.NORM = "GN"  # features of unit scale, as a trained teacher's roughly are
    cfg.merge_from_list(list(opts))
    name = name or f"teacher_{kind}_{depth}"
    config_file = tmp_path / f"{name}.yaml"
    config_file.write_text(cfg.dump())
    torch.manual_seed(seed)
    teacher = build_model(cfg)
    calibrate_bn(teacher)
    weights = tmp_path / f"{name}.pth"
    torch.save({"model": teacher.state_dict()}, weights)
    return str(config_file), str(weights), teacher


def maskd_cfg(stage, student_kind, teacher_config, teacher_weights, tokens_weights=""):
    """A tiny MasKD config: GN R18-FPN student (16 channels), the given teacher files."""
    from maskd.config import add_maskd_config  # here: tiny.py also serves vanilla detectron2

    cfg = tiny_cfg(student_kind, depth=STUDENT_DEPTH, fpn_channels=STUDENT_FPN)
    cfg.MODEL.RESNETS.NORM = "GN"  # untrained FrozenBN students have features of scale 100+
    add_maskd_config(cfg)
    cfg.MODEL.MASKD.STUDENT_META_ARCHITECTURE = cfg.MODEL.META_ARCHITECTURE
    cfg.MODEL.META_ARCHITECTURE = stage
    cfg.MODEL.MASKD.TEACHER.CONFIG_FILE = teacher_config
    cfg.MODEL.MASKD.TEACHER.WEIGHTS = teacher_weights
    cfg.MODEL.MASKD.TOKENS_WEIGHTS = tokens_weights
    cfg.MODEL.MASKD.NUM_TOKENS = 4
    cfg.SOLVER.BASE_LR = 0.005
    cfg.SOLVER.IMS_PER_BATCH = 2
    return cfg


def run(args, tmp, check=True, timeout=900):
    """Run ``python ARGS`` in ``tmp`` with this checkout on the path; assert success. The
    command gets this process's thread count, so that its numbers equal those computed here."""
    import torch

    path = os.pathsep.join([os.path.join(ROOT, "tests"), os.path.join(ROOT, "projects", "MasKD")])
    env = dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS=str(torch.get_num_threads()))
    proc = subprocess.run(
        [sys.executable, *args], cwd=tmp, env=env, capture_output=True, text=True, timeout=timeout
    )
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def read_metrics(folder):
    """The records of a training run's ``metrics.json`` (one JSON object per line)."""
    import json

    with open(os.path.join(folder, "metrics.json")) as f:
        return [json.loads(line) for line in f]


def finite_loss_records(folder):
    """The records of a run's ``metrics.json`` that hold losses, after asserting that there are
    some and that every ``loss_*`` and ``total_loss`` in them is finite."""
    import math

    records = [r for r in read_metrics(folder) if "total_loss" in r]
    assert records, f"no loss records in {folder}/metrics.json"
    for r in records:
        losses = {k: v for k, v in r.items() if k.startswith("loss_") or k == "total_loss"}
        assert all(math.isfinite(v) for v in losses.values()), losses
    return records


def tiny_training(cfg, output_dir, datasets=("tiny_train", "tiny_val")):
    """Make a config train 3 iterations on the tiny datasets (names of (train, val); a test
    module that registers its own files in-process gives them names of its own)."""
    cfg.DATASETS.TRAIN = (datasets[0],)
    cfg.DATASETS.TEST = (datasets[1],)
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.INPUT.MIN_SIZE_TRAIN = (64,)
    cfg.INPUT.MAX_SIZE_TRAIN = 128
    cfg.INPUT.MASK_FORMAT = "polygon"
    cfg.SOLVER.MAX_ITER = 3
    cfg.SOLVER.STEPS = ()
    cfg.SOLVER.WARMUP_ITERS = 0
    cfg.SOLVER.CHECKPOINT_PERIOD = 1000
    cfg.TEST.EVAL_PERIOD = 0
    cfg.OUTPUT_DIR = str(output_dir)
    return cfg
