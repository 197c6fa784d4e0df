"""MasKD stage 2 (LazyConfig): Faster R-CNN R50-FPN <- Faster R-CNN R101-FPN 3x (model zoo).

The same experiment as the .yaml of this name. Student, data, optimizer and train settings come
from detectron2's LazyConfig model zoo (its Mask R-CNN R50-FPN config without the mask head);
the schedule is 2x: 180k iterations at 16 images.
"""

from detectron2.config import LazyCall as L
from detectron2.model_zoo import get_config

from maskd import MasKD, RoIRegressionKD, build_teacher, tokens_from_file

_zoo = get_config("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.py")
dataloader = _zoo.dataloader
optimizer = _zoo.optimizer
train = _zoo.train
lr_multiplier = get_config("common/coco_schedule.py").lr_multiplier_2x

student = _zoo.model
student.roi_heads.update(mask_in_features=None, mask_pooler=None, mask_head=None)
dataloader.train.mapper.use_instance_mask = False

model = L(MasKD)(
    student=student,
    teacher=L(build_teacher)(
        config_file="COCO-Detection/faster_rcnn_R_101_FPN_3x.yaml",
        weights="detectron2://COCO-Detection/faster_rcnn_R_101_FPN_3x/137851257/model_final_f6e8b1.pkl",
    ),
    tokens=L(tokens_from_file)(
        weights="output/maskd_faster_rcnn_R_101-faster_rcnn_R_50_FPN_tokens_coco_lazy/model_final.pth"
    ),
    loss_weight=1.0,
    custom_mask_warmup=7330,
    head_kd=[L(RoIRegressionKD)(weight=1.0)],  # the paper's extras for this row, as in the .yaml
    inherit=True,
)

train.max_iter = 180000  # 2x at 16 images per batch
train.init_checkpoint = "detectron2://ImageNetPretrained/MSRA/R-50.pkl"  # the student's
train.output_dir = "output/maskd_faster_rcnn_R_101-faster_rcnn_R_50_FPN_2x_coco_lazy"
