"""train_net.py end to end on a tiny COCO-format dataset the test writes: stage 1, stage 2 and
--eval-only, with yacs and LazyConfig configs; then the model-zoo style export round trip."""

import json
import math
import os
import textwrap

import pytest
import torch
from detectron2.config import instantiate
from PIL import Image
from tiny import (
    ROOT,
    STUDENT_DEPTH,
    STUDENT_FPN,
    TEACHER_DEPTH,
    TEACHER_FPN,
    TRAIN_NET,
    calibrate_bn,
    maskd_cfg,
    run,
    tiny_fcos,
    tiny_training,
    write_teacher,
)

from maskd.checkpoint.export import export_student, export_tokens
from maskd.modeling.diagnostics import STAT_NAMES

# the names that the datasets fixture (conftest.py) gives this module's datasets
DATASETS = ("train_net_train", "train_net_val")


@pytest.fixture(scope="module")
def workspace(datasets):
    return datasets.tmp, datasets.register


@pytest.mark.slow
def test_yacs_both_stages_eval_and_export(workspace):
    tmp, register = workspace
    teacher_config, teacher_weights, _ = write_teacher(tmp, "rcnn")

    stage1 = tiny_training(
        maskd_cfg("MasKDTokenLearner", "rcnn", teacher_config, teacher_weights),
        tmp / "s1",
        DATASETS,
    )
    stage1.SOLVER.OPTIMIZER = "ADAM"
    stage1.SOLVER.LR_SCHEDULER_NAME = "WarmupCosineLR"
    stage1.SOLVER.BASE_LR_END = 1e-6
    (tmp / "stage1.yaml").write_text(stage1.dump())
    out = run([TRAIN_NET, "--config-file", "stage1.yaml", *register], tmp)
    assert os.path.isfile(tmp / "s1" / "model_final.pth")
    log = out.stdout + out.stderr
    assert log.count("copypaste: Task: bbox") == 2  # the masked teacher, then the plain one
    # The retention of stage 1, from the two evaluations, ends the run's log and metrics.json.
    final = [ln for ln in log.splitlines() if "MasKD stage 1 finished" in ln]
    assert final and "retention (masked teacher / teacher) bbox/AP = " in final[-1]
    records = [json.loads(ln) for ln in open(tmp / "s1" / "metrics.json")]
    evals = [r for r in records if "retention/bbox/AP" in r]
    assert len(evals) == 1 and {"bbox/AP", "teacher/bbox/AP"} <= set(evals[0])
    masked, plain = evals[0]["bbox/AP"], evals[0]["teacher/bbox/AP"]
    if plain and math.isfinite(plain) and math.isfinite(masked):
        assert evals[0]["retention/bbox/AP"] == pytest.approx(masked / plain)
    assert os.path.isdir(tmp / "s1" / "inference" / "teacher_without_masks")
    trained = [r for r in records if "[metric]tokens/p2/constant" in r]
    assert trained and all(0.0 <= r["[metric]tokens/p2/constant"] <= 1.0 for r in trained)

    # The receptive masks of the learned tokens, one grid per image: rows = the 5 levels,
    # columns = the image and its 4 tokens (2 inches each at 80 dpi).
    run(
        [os.path.join(ROOT, "tools", "visualize_masks.py"), "--config-file", "stage1.yaml"]
        + ["--checkpoint", str(tmp / "s1" / "model_final.pth"), "--dataset", DATASETS[1]]
        + [*register, "--output", "vis"],
        tmp,
    )
    pngs = sorted(f for f in os.listdir(tmp / "vis") if f.endswith(".png"))
    assert pngs == ["0000_masks.png", "0001_masks.png"]
    with open(tmp / "vis" / "token_statistics.json") as f:
        stats = json.load(f)
    assert sorted(stats["mean"]) == ["p2", "p3", "p4", "p5", "p6"] and len(stats["images"]) == 2
    for lv, values in stats["mean"].items():
        # --dataset images bring their boxes: the share of the loss weight on them too
        assert set(values) == set(STAT_NAMES)
        for stat in ("coverage", "gt_share"):
            per_image = [s[lv][stat] for s in stats["images"].values()]
            assert values[stat] == pytest.approx(sum(per_image) / 2)
    with Image.open(tmp / "vis" / pngs[0]) as im:
        assert im.size == (2 * 5 * 80, 2 * 5 * 80)

    stage2 = tiny_training(
        maskd_cfg(
            "MasKD", "rcnn", teacher_config, teacher_weights, str(tmp / "s1" / "model_final.pth")
        ),
        tmp / "s2",
        DATASETS,
    )
    stage2.MODEL.MASKD.CUSTOM_MASK_WARMUP = 1
    stage2.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0  # predictions to compare after the export
    (tmp / "stage2.yaml").write_text(stage2.dump())
    out = run([TRAIN_NET, "--config-file", "stage2.yaml", *register], tmp)
    final = tmp / "s2" / "model_final.pth"
    assert os.path.isfile(final)
    log = out.stdout + out.stderr
    assert "loss_maskd" in log and "copypaste: Task: bbox" in log

    # --eval-only reads only MODEL.WEIGHTS: with the teacher's and the tokens' files moved away,
    # the stage-2 checkpoint evaluates its student (as its training's last evaluation did), and
    # the stage-1 checkpoint its masked teacher.
    hidden = tmp / "hidden"
    hidden.mkdir()
    moved = {
        teacher_weights: hidden / "teacher.pth",
        str(tmp / "s1" / "model_final.pth"): hidden / "s1.pth",
    }
    for src, dst in moved.items():
        os.rename(src, dst)
    try:
        out = run(
            [TRAIN_NET, "--config-file", "stage2.yaml", "--eval-only", *register]
            + ["MODEL.WEIGHTS", str(final), "OUTPUT_DIR", "eval2"],
            tmp,
        )
        assert "copypaste: Task: bbox" in out.stdout + out.stderr
        evaluated = json.loads((tmp / "eval2" / "results.json").read_text())["bbox"]
        trained = [json.loads(ln) for ln in open(tmp / "s2" / "metrics.json")]
        trained = [r for r in trained if "bbox/AP" in r][-1]
        assert evaluated["AP"] == pytest.approx(trained["bbox/AP"], abs=1e-9)
        out = run(
            [TRAIN_NET, "--config-file", "stage1.yaml", "--eval-only", *register]
            + ["MODEL.WEIGHTS", str(hidden / "s1.pth"), "OUTPUT_DIR", "eval1"],
            tmp,
        )
        assert "Stage 1 retention (masked teacher / teacher)" in out.stdout + out.stderr
        # A checkpoint that lacks weights of the model is an error, not a partly random model.
        bad = run(
            [TRAIN_NET, "--config-file", "stage2.yaml", "--eval-only", *register]
            + ["MODEL.WEIGHTS", str(hidden / "teacher.pth"), "OUTPUT_DIR", "eval3"],
            tmp,
            check=False,
        )
        assert bad.returncode != 0
        assert "MODEL.WEIGHTS" in bad.stderr and "missing keys" in bad.stderr
    finally:
        for src, dst in moved.items():
            os.rename(dst, src)

    # Tokens export: accepted by TOKENS_WEIGHTS; refuses to overwrite.
    tokens = export_tokens(str(tmp / "s1" / "model_final.pth"), str(tmp / "tokens.pth"))
    # the tokens, and the fingerprints of the teacher they were learned for (maskd.checkpoint.provenance)
    prints = {"teacher_fingerprint", "teacher_config_fingerprint"}
    assert prints <= set(tokens)
    assert all(k.startswith("tokens.p") for k in tokens if k not in prints)
    with pytest.raises(FileExistsError):
        export_tokens(str(tmp / "s1" / "model_final.pth"), str(tmp / "tokens.pth"))

    # Student export, evaluated by vanilla detectron2 (no maskd import) in another process.
    out = run(
        [os.path.join(ROOT, "tools", "export.py"), "student", "--config-file", "stage2.yaml"]
        + ["--checkpoint", str(final), "--output", "release/student.pth"]
        + ["MODEL.MASKD.TOKENS_WEIGHTS", str(tmp / "tokens.pth")],
        tmp,
    )
    assert os.path.isfile(tmp / "release" / "student.pth")
    assert os.path.isfile(tmp / "release" / "student.yaml")
    again = run(
        [os.path.join(ROOT, "tools", "export.py"), "student", "--checkpoint", str(final)]
        + ["--output", "release/student.pth"],
        tmp,
        check=False,
    )
    assert again.returncode != 0 and "exists" in again.stderr

    vanilla = textwrap.dedent("""
        import sys, torch
        from detectron2.config import get_cfg
        from detectron2.checkpoint import DetectionCheckpointer
        from detectron2.modeling import build_model
        from tiny import tiny_batch
        cfg = get_cfg()
        cfg.merge_from_file("release/student.yaml")
        model = build_model(cfg).eval()
        DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
        with torch.no_grad():
            out = model(tiny_batch(2, 64, seed=11))
        assert "maskd" not in sys.modules
        torch.save([o["instances"].get_fields() for o in out], "vanilla_outputs.pt")
        """)
    run(["-c", vanilla], tmp)

    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model
    from tiny import tiny_batch

    stage2.MODEL.MASKD.TOKENS_WEIGHTS = str(tmp / "tokens.pth")
    model = build_model(stage2).eval()
    DetectionCheckpointer(model).load(str(final))
    with torch.no_grad():
        ours = model(tiny_batch(2, 64, seed=11))
    theirs = torch.load(tmp / "vanilla_outputs.pt", weights_only=False)
    assert len(ours) == len(theirs) == 2
    for a, b in zip(ours, theirs):
        assert len(a["instances"]) > 0
        fields = a["instances"].get_fields()
        assert fields.keys() == b.keys()
        for k in fields:
            va, vb = fields[k], b[k]
            va, vb = getattr(va, "tensor", va), getattr(vb, "tensor", vb)
            assert torch.equal(va, vb), k


LAZY = """
import detectron2.data.transforms as T
from detectron2.config import LazyCall as L
from detectron2.model_zoo import get_config
from fvcore.common.param_scheduler import CosineParamScheduler
from maskd import {cls}, build_teacher, tokens_from_file
from tiny import tiny_fcos

dataloader = get_config("common/data/coco.py").dataloader
dataloader.train.dataset.names = "{train}"
dataloader.train.mapper.augmentations = [L(T.ResizeShortestEdge)(short_edge_length=64, max_size=128)]
dataloader.train.total_batch_size = 2
dataloader.train.num_workers = 0
dataloader.test.dataset.names = "{val}"
dataloader.test.mapper.augmentations = [L(T.ResizeShortestEdge)(short_edge_length=64, max_size=128)]
dataloader.test.num_workers = 0
optimizer = get_config("common/optim.py").SGD
optimizer.lr = 0.005
lr_multiplier = L(CosineParamScheduler)(start_value=1.0, end_value=1.0)
train = get_config("common/train.py").train
train.device = "cpu"
train.max_iter = 3
train.eval_period = 0
train.checkpointer.period = 1000
train.output_dir = "{out}"
model = L({cls})(teacher=L(build_teacher)(config_file="{teacher_cfg}", weights="{weights}"){extra})
"""


@pytest.mark.slow
def test_lazy_both_stages_and_eval(workspace):
    tmp, register = workspace
    torch.manual_seed(0)
    teacher = instantiate(tiny_fcos(TEACHER_DEPTH, TEACHER_FPN, "BN"))
    calibrate_bn(teacher)
    weights = tmp / "fcos_teacher.pth"
    torch.save({"model": teacher.state_dict()}, weights)
    (tmp / "fcos_teacher.py").write_text(
        f"from tiny import tiny_fcos\nmodel = tiny_fcos({TEACHER_DEPTH}, {TEACHER_FPN}, 'BN')\n"
    )
    fmt = dict(
        weights=weights, teacher_cfg=tmp / "fcos_teacher.py", train=DATASETS[0], val=DATASETS[1]
    )

    (tmp / "lazy1.py").write_text(
        LAZY.format(cls="MasKDTokenLearner", out=tmp / "l1", extra=", num_tokens=3", **fmt)
    )
    out = run([TRAIN_NET, "--config-file", "lazy1.py", *register], tmp)
    stage1_final = tmp / "l1" / "model_final.pth"
    assert os.path.isfile(stage1_final)
    log = out.stdout + out.stderr
    assert log.count("copypaste: Task: bbox") == 2  # masked teacher and plain teacher
    assert "Stage 1 retention (masked teacher / teacher): bbox/AP" in log
    assert "MasKD stage 1 finished: retention (masked teacher / teacher) bbox/AP = " in log

    stage2 = LAZY.format(cls="MasKD", out=tmp / "l2", extra="", **fmt)
    stage2 += (
        f'model.student = tiny_fcos({STUDENT_DEPTH}, {STUDENT_FPN}, "GN")\n'
        f'model.tokens = L(tokens_from_file)(weights="{stage1_final}")\n'
    )
    (tmp / "lazy2.py").write_text(stage2)
    # a non-finite learning rate is refused by name before anything is built (1e999 is inf)
    out = run([TRAIN_NET, "--config-file", "lazy2.py", *register, "optimizer.lr=1e999"], tmp, False)
    assert out.returncode != 0 and "optimizer.lr must be a finite positive number" in out.stderr
    out = run([TRAIN_NET, "--config-file", "lazy2.py", *register, "model.loss_weight=10"], tmp)
    final = tmp / "l2" / "model_final.pth"
    assert os.path.isfile(final)
    assert "loss_maskd" in out.stdout + out.stderr

    out = run(
        [TRAIN_NET, "--config-file", "lazy2.py", "--eval-only", *register]
        + [f"train.init_checkpoint={final}"],
        tmp,
    )
    assert "copypaste: Task: bbox" in out.stdout + out.stderr

    # Student export from a LazyConfig: weights plus the student's LazyConfig.
    from detectron2.config import LazyConfig

    cfg = LazyConfig.load(str(tmp / "lazy2.py"))
    export_student(str(final), str(tmp / "lazy_student.pth"), cfg)
    student_cfg = LazyConfig.load(str(tmp / "lazy_student.yaml"))
    assert student_cfg.train.init_checkpoint.endswith("lazy_student.pth")
    student = instantiate(student_cfg.model)
    state = torch.load(tmp / "lazy_student.pth", weights_only=False)["model"]
    student.load_state_dict(state)  # strict: exactly the student's keys
