"""MasKD stage 2 (LazyConfig): FCOS R50-FPN student <- RetinaNet R101-FPN 3x teacher.

detectron2's model zoo has no trained FCOS (its FCOS exists only as a LazyConfig, without
weights), so the teacher is the strongest one-stage FPN detector the zoo releases: RetinaNet
R101-FPN 3x (40.4 box AP). Both produce P3-P7 at strides 8-128 with 256 channels, which is all
masked distillation needs; stage 1 learns the tokens from RetinaNet's own losses. Loss weight 10
and warm-up 5000 follow the paper's FCOS row (whose teacher was an FCOS R101). Student as in
detectron2's fcos_R_50_FPN_1x.py, on a 2x schedule (180k iterations at 16 images).
"""

from detectron2.config import LazyCall as L
from detectron2.model_zoo import get_config

from maskd import MasKD, build_teacher, tokens_from_file

_zoo = get_config("COCO-Detection/fcos_R_50_FPN_1x.py")
dataloader = _zoo.dataloader
optimizer = _zoo.optimizer
train = _zoo.train
lr_multiplier = get_config("common/coco_schedule.py").lr_multiplier_2x

model = L(MasKD)(
    student=_zoo.model,
    teacher=L(build_teacher)(
        config_file="COCO-Detection/retinanet_R_101_FPN_3x.yaml",
        weights="detectron2://COCO-Detection/retinanet_R_101_FPN_3x/190397697/model_final_971ab9.pkl",
    ),
    tokens=L(tokens_from_file)(
        weights="output/maskd_retinanet_R_101-fcos_R_50_FPN_tokens_coco/model_final.pth"
    ),
    loss_weight=10.0,
    custom_mask_warmup=5000,
    input_format="${dataloader.train.mapper.image_format}",  # FCOS does not declare one
)

train.max_iter = 180000
train.output_dir = "output/maskd_retinanet_R_101-fcos_R_50_FPN_2x_coco"
