"""distill_net.py end to end through its command line on generated data: stage 1, stage 2,
export and evaluation of the released student; a killed stage resumes from its checkpoint,
finished stages are kept, a changed command is refused; a stage-2 checkpoint evaluates
without the teacher's or the tokens' files."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from tiny import ROOT, maskd_cfg, run, tiny_training, write_teacher

DISTILL_NET = os.path.join(ROOT, "distill_net.py")
# the names that the datasets fixture (conftest.py) gives this module's datasets
DATASETS = ("pipeline_train", "pipeline_val")


@pytest.fixture(scope="module")
def setup(datasets):
    """Data, teacher and the two stage configs of a tiny R-CNN pair, as files."""
    tmp, register = datasets.tmp, datasets.register
    teacher_config, teacher_weights, _ = write_teacher(tmp, "rcnn")
    # The stage configs name no teacher: the pipeline's --teacher-config/--teacher-weights do.
    s1 = tiny_training(maskd_cfg("MasKDTokenLearner", "rcnn", "", ""), tmp / "unused", DATASETS)
    s1.SOLVER.CHECKPOINT_PERIOD = 2
    (tmp / "tokens.yaml").write_text(s1.dump())
    s2 = tiny_training(maskd_cfg("MasKD", "rcnn", "", ""), tmp / "unused", DATASETS)
    s2.MODEL.MASKD.ROI_REG_KD.WEIGHT = 1.0
    s2.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    (tmp / "student.yaml").write_text(s2.dump())
    args = ["--tokens-config", "tokens.yaml", "--student-config", "student.yaml"]
    args += ["--teacher-config", teacher_config, "--teacher-weights", teacher_weights, *register]
    return tmp, args


def _summary(out):
    with open(os.path.join(out, "pipeline.json")) as f:
        return json.load(f)


@pytest.mark.slow
def test_pipeline_runs_every_stage_and_keeps_finished_ones(setup):
    tmp, args = setup
    # with a head-level KD term of the user's own, from a module outside the package
    (tmp / "user_ext").mkdir(exist_ok=True)
    module = tmp / "user_ext" / "box_weight_kd.py"
    module.write_text(USER_TERM)
    args = args + ["--import", str(module)]
    args += ["--student-opts", "MODEL.MASKD.BOX_WEIGHT_KD.WEIGHT 0.5"]
    tail = ["--", "SOLVER.BASE_LR", "0.004"]  # overrides of both stages, after --
    out = tmp / "run"
    proc = run([DISTILL_NET, *args, "--output", str(out), *tail], tmp)
    log = proc.stdout + proc.stderr
    assert "of both stages: SOLVER.BASE_LR 0.004" in log
    assert "of stage 2 only: MODEL.MASKD.BOX_WEIGHT_KD.WEIGHT 0.5" in log
    records = [json.loads(ln) for ln in open(out / "student" / "metrics.json")]
    assert any(r.get("loss_box_weight_kd", 0) > 0 for r in records)
    assert "BASE_LR: 0.004" in (out / "tokens" / "config.yaml").read_text()  # both stages
    assert "BASE_LR: 0.004" in (out / "student" / "config.yaml").read_text()
    summary = _summary(out)
    assert list(summary["stages"]) == ["tokens", "student", "export", "evaluate"]
    stages = summary["stages"]
    assert os.path.isfile(stages["tokens"]["checkpoint"])
    assert set(stages["tokens"]["retention"]) == {"bbox/AP"}
    assert os.path.isfile(stages["student"]["checkpoint"])
    for key in ("student", "student_config", "tokens"):
        assert os.path.isfile(stages["export"][key]), key
    # every artifact is printed
    for path in (stages["tokens"]["checkpoint"], stages["student"]["checkpoint"]):
        assert f"[pipeline] " in log and path in log
    assert f"[pipeline] export: {stages['export']['student']}" in log
    # stage 2 read the tokens of stage 1, and the teacher given on the command line
    s2_config = (out / "student" / "config.yaml").read_text()
    assert f"TOKENS_WEIGHTS: {stages['tokens']['checkpoint']}" in s2_config
    assert "teacher_rcnn_34.pth" in s2_config
    # the released student, evaluated by plain detectron2, scores what stage 2's final
    # evaluation scored
    released = stages["evaluate"]["results"]["bbox"]
    trained = stages["student"]["results"]
    assert released["AP"] == pytest.approx(trained["bbox/AP"], abs=1e-9)
    assert released["AP50"] == pytest.approx(trained["bbox/AP50"], abs=1e-9)
    student_yaml = (out / "export" / "student.yaml").read_text()
    assert "MASKD" not in student_yaml and "GeneralizedRCNN" in student_yaml

    # Run again: every stage is kept, nothing retrains.
    mtime = os.path.getmtime(stages["student"]["checkpoint"])
    again = run([DISTILL_NET, *args, "--output", str(out), *tail], tmp)
    assert (again.stdout + again.stderr).count("finished before, kept") == 4
    assert os.path.getmtime(stages["student"]["checkpoint"]) == mtime
    # A changed command for a finished stage is refused, naming the stage; --restart reruns.
    changed = run(
        [DISTILL_NET, "--student-opts", "MODEL.MASKD.LOSS_WEIGHT 2.0", *args, "--output", str(out)]
        + tail,
        tmp,
        check=False,
    )
    assert changed.returncode != 0
    assert "stage 'student'" in changed.stderr and "--restart student" in changed.stderr
    assert os.path.getmtime(stages["student"]["checkpoint"]) == mtime
    # --restart student: stage 2 trains again from scratch (not resumed from its final
    # checkpoint) with the new command; the export and evaluation follow; stage 1 is kept
    restarted = run(
        [DISTILL_NET, "--student-opts", "MODEL.MASKD.LOSS_WEIGHT 2.0", "--restart", "student"]
        + [*args, "--output", str(out), *tail],
        tmp,
    )
    log = restarted.stdout + restarted.stderr
    assert "tokens: finished before, kept" in log and "--resume" not in log
    assert os.path.getmtime(stages["student"]["checkpoint"]) > mtime
    assert "LOSS_WEIGHT: 2.0" in (out / "student" / "config.yaml").read_text()
    records = [json.loads(ln) for ln in open(out / "student" / "metrics.json")]
    trained_to_the_end = [r for r in records if "total_loss" in r and r["iteration"] == 2]
    assert len(trained_to_the_end) == 2  # the first run and the rerun trained all 3 iterations
    assert _summary(out)["stages"]["evaluate"]["results"]["bbox"]
    # without --import the term's key does not exist, and the error says how to make it exist
    bad = run(
        [DISTILL_NET, *setup[1], "--output", str(tmp / "no_import"), "--stages", "student"]
        + ["--tokens-weights", stages["tokens"]["checkpoint"]]
        + ["--student-opts", "MODEL.MASKD.BOX_WEIGHT_KD.WEIGHT 0.5"],
        tmp,
        check=False,
    )
    assert bad.returncode != 0 and "--import MODULE" in bad.stderr


@pytest.mark.slow
def test_pipeline_resumes_a_killed_stage_from_its_checkpoint(setup):
    tmp, args = setup
    out = tmp / "killed"
    # Stage 1 of 3 iterations checkpoints every 2; kill the pipeline once the checkpoint of
    # iteration 2 exists and before the stage finishes.
    cmd = [sys.executable, DISTILL_NET, *args, "--output", str(out)]
    cmd += ["--tokens-opts", "SOLVER.MAX_ITER 40 TEST.EVAL_PERIOD 0"]
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(
            [os.path.join(ROOT, "tests"), os.path.join(ROOT, "projects", "MasKD")]
        ),
    )
    proc = subprocess.Popen(
        cmd,
        cwd=tmp,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # the checkpoint file appears just before last_checkpoint names it: wait for the name
    last = out / "tokens" / "last_checkpoint"

    def named_checkpoint():
        name = last.read_text().strip() if last.exists() else ""
        return name.startswith("model_") and (out / "tokens" / name).exists()

    deadline = time.time() + 300
    while not named_checkpoint() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert named_checkpoint(), "stage 1 wrote no checkpoint"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "tokens" / "stage.json").exists()  # not marked finished
    assert not (out / "tokens" / "model_final.pth").exists()

    resumed = run(
        [DISTILL_NET, *args, "--output", str(out), "--stages", "tokens"]
        + ["--tokens-opts", "SOLVER.MAX_ITER 40 TEST.EVAL_PERIOD 0"],
        tmp,
    )
    log = resumed.stdout + resumed.stderr
    assert "tokens: resuming the killed run" in log
    assert "--resume" in log
    assert "[Checkpointer] Loading from" in log and "model_0000" in log
    assert (out / "tokens" / "stage.json").exists()
    records = [json.loads(ln) for ln in open(out / "tokens" / "metrics.json")]
    iters = [r["iteration"] for r in records if "total_loss" in r]
    assert iters[-1] == 39


@pytest.mark.slow
def test_pipeline_with_lazyconfig_configs(setup, tmp_path):
    import torch
    from detectron2.config import instantiate
    from test_train_net import LAZY
    from tiny import TEACHER_DEPTH, TEACHER_FPN, calibrate_bn, tiny_fcos

    tmp, args = setup
    register = args[args.index("--register-coco") :]
    torch.manual_seed(0)
    teacher = instantiate(tiny_fcos(TEACHER_DEPTH, TEACHER_FPN, "BN"))
    calibrate_bn(teacher)
    torch.save({"model": teacher.state_dict()}, tmp_path / "fcos_teacher.pth")
    (tmp_path / "fcos_teacher.py").write_text(
        f"from tiny import tiny_fcos\nmodel = tiny_fcos({TEACHER_DEPTH}, {TEACHER_FPN}, 'BN')\n"
    )
    # the configs name a teacher that does not exist: the pipeline's arguments replace it
    fmt = dict(weights="missing.pth", teacher_cfg="missing.py", out=tmp_path / "unused")
    fmt.update(train=DATASETS[0], val=DATASETS[1])
    (tmp_path / "tokens.py").write_text(
        LAZY.format(cls="MasKDTokenLearner", extra=", num_tokens=3", **fmt)
    )
    (tmp_path / "student.py").write_text(
        LAZY.format(cls="MasKD", extra="", **fmt)
        + 'model.student = tiny_fcos(18, 16, "GN")\n'
        + 'model.tokens = L(tokens_from_file)(weights="missing.pth")\n'
    )
    out = tmp_path / "run"
    run(
        [DISTILL_NET, "--tokens-config", "tokens.py", "--student-config", "student.py"]
        + ["--teacher-config", "fcos_teacher.py", "--teacher-weights", "fcos_teacher.pth"]
        + ["--output", str(out), *register],
        tmp_path,
    )
    stages = _summary(out)["stages"]
    assert list(stages) == ["tokens", "student", "export", "evaluate"]
    assert "bbox" in stages["evaluate"]["results"]
    student_cfg = (out / "export" / "student.yaml").read_text()
    assert "MasKD" not in student_cfg and "FCOS" in student_cfg


# A module of a user's own, outside the package: a head-level KD term (a made-up one: a small
# penalty on the student's box-predictor weights) registered when the module is imported.
USER_TERM = """
from maskd.modeling.head_kd import HEAD_KD_REGISTRY, HeadKD


@HEAD_KD_REGISTRY.register()
class BoxWeightKD(HeadKD):
    CONFIG_KEY = "BOX_WEIGHT_KD"
    LOSS_NAME = "loss_box_weight_kd"

    @classmethod
    def add_config(cls, node):
        node.WEIGHT = 0.0

    @classmethod
    def from_config(cls, node):
        return {"weight": node.WEIGHT}

    def check(self, student, teacher):
        if not hasattr(student, "roi_heads"):
            raise ValueError("MODEL.MASKD.BOX_WEIGHT_KD needs an R-CNN student")

    def wrap(self, student):
        pass

    def forward(self, student, teacher, teacher_features):
        params = student.roi_heads.box_predictor.parameters()
        return self.weight * sum(p.pow(2).mean() for p in params)
"""


def test_per_stage_overrides_never_absorb_those_of_both_stages(setup, monkeypatch):
    import distill_net
    from maskd.cli import distill

    tmp, args = setup
    calls = []
    monkeypatch.setattr(distill, "run_pipeline", lambda *a, **k: calls.append(k))
    argv = [*args, "--output", str(tmp / "x")]
    # per-stage overrides as separate words would swallow the rest: refused
    with pytest.raises(SystemExit, match="one quoted string"):
        distill_net.main(argv + ["--student-opts", "SEED", "0", "DATASETS.TRAIN", "('x',)"])
    distill_net.main(argv + ["--student-opts", "SEED 1", "--tokens-opts", "SEED 2", "SEED", "3"])
    assert calls[-1]["opts"] == ["SEED", "3"]
    assert calls[-1]["student_opts"] == ["SEED", "1"] and calls[-1]["tokens_opts"] == ["SEED", "2"]
    distill_net.main(argv + ["--student-opts", "SEED 1", "--", "SEED", "4"])
    assert calls[-1]["opts"] == ["SEED", "4"] and calls[-1]["student_opts"] == ["SEED", "1"]
    with pytest.raises(SystemExit, match="unknown options"):
        distill_net.main(argv + ["--no-such-flag"])


@pytest.mark.parametrize("kind", ["py", "yaml"])
def test_a_finished_stage_whose_config_changed_is_refused(tmp_path, kind):
    """The marker keeps the digest of every config file the stage's arguments name, LazyConfig
    .py files and a yacs file's local _BASE_ included: an edited one is refused before anything
    runs."""
    from maskd.engine.pipeline import StageRunner, input_digests, mark

    if kind == "py":
        config = tmp_path / "student.py"
        config.write_text("from maskd.model_zoo import get_config\nLR = 0.01\n")
        edited = config
    else:
        (tmp_path / "base.yaml").write_text("SOLVER:\n  BASE_LR: 0.01\n")
        config = tmp_path / "student.yaml"
        config.write_text('_BASE_: "base.yaml"\n')
        edited = tmp_path / "base.yaml"
    out_dir = tmp_path / "stage"
    out_dir.mkdir()
    args = ["--config-file", str(config), "SEED", "0"]
    assert str(edited) in input_digests(args)
    mark(str(out_dir), "student", args, 1.0)
    runner = StageRunner(python="/the/command/must/not/run")
    assert runner.run("student", str(out_dir), args) == str(out_dir)  # unchanged: kept
    edited.write_text(edited.read_text().replace("0.01", "0.02"))
    with pytest.raises(ValueError, match=rf"contents of {edited} changed since.*--restart student"):
        runner.run("student", str(out_dir), args)


@pytest.mark.parametrize("key", ["MODEL.MASKD.TEACHER.WEIGHTS", "MODEL.MASKD.TOKENS_WEIGHTS"])
def test_a_finished_stage_whose_weights_were_replaced_is_refused(tmp_path, key):
    """The teacher's weights or the tokens replaced at the same path by other weights: the
    stage that read them is refused, naming the file, not kept."""
    from maskd.engine.pipeline import StageRunner, input_digests, mark

    config = tmp_path / "student.yaml"
    config.write_text("SEED: 0\n")
    weights = tmp_path / "weights.pth"
    torch.save({"model": {"w": torch.zeros(3)}}, weights)
    args = ["--config-file", str(config), key, str(weights)]
    assert str(weights) in input_digests(args)
    out_dir = tmp_path / "stage"
    out_dir.mkdir()
    mark(str(out_dir), "student", args, 1.0)
    runner = StageRunner(python="/the/command/must/not/run")
    assert runner.run("student", str(out_dir), args) == str(out_dir)  # unchanged: kept
    torch.save({"model": {"w": torch.ones(3)}}, weights)  # other weights, the same path
    with pytest.raises(ValueError, match=rf"contents of {weights} changed since"):
        runner.run("student", str(out_dir), args)


def test_a_stage_marker_that_is_not_a_file_is_refused_by_name(tmp_path):
    """stage.json made a directory was taken for a killed stage and retrained; random bytes in
    metrics.json gave a raw UnicodeDecodeError."""
    from maskd.engine.pipeline import MARKER, StageRunner, last_metrics

    out_dir = tmp_path / "stage"
    (out_dir / MARKER).mkdir(parents=True)
    runner = StageRunner(python="/the/command/must/not/run")
    with pytest.raises(ValueError, match=rf"{MARKER}' is a directory, not a regular file"):
        runner.run("student", str(out_dir), ["--config-file", "x.yaml"])
    (out_dir / MARKER).rmdir()
    os.symlink(tmp_path / "elsewhere.json", out_dir / MARKER)
    with pytest.raises(ValueError, match="is a symbolic link"):
        StageRunner.finished(str(out_dir))
    (out_dir / "metrics.json").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match="metrics.json' is not a JSON-lines text file"):
        last_metrics(str(out_dir))


def _fake_runs(monkeypatch, register=()):
    """A StageRunner whose commands are recorded instead of run."""
    from maskd.engine import pipeline as stages

    calls = []
    monkeypatch.setattr(stages.subprocess, "run", lambda cmd, check: calls.append(cmd) or None)
    return stages.StageRunner(register=list(register)), calls


def test_a_finished_stage_is_refused_when_its_dataset_is_other_data(tmp_path, monkeypatch):
    """--register-coco is part of a stage's command: the same dataset name pointed at another
    annotation file, or the same file with other contents, is refused, not reused."""
    config = tmp_path / "student.yaml"
    config.write_text("SEED: 0\n")
    for name in ("a.json", "b.json"):
        (tmp_path / name).write_text('{"images": [], "annotations": [], "categories": []}')
    args = ["--config-file", str(config)]
    out_dir = str(tmp_path / "stage")
    register = ["--register-coco", "my_train", str(tmp_path / "a.json"), str(tmp_path)]
    runner, calls = _fake_runs(monkeypatch, register)
    runner.run("student", out_dir, args)
    assert len(calls) == 1
    runner.run("student", out_dir, args)  # same command and data: kept
    assert len(calls) == 1
    other_file = ["--register-coco", "my_train", str(tmp_path / "b.json"), str(tmp_path)]
    runner, _ = _fake_runs(monkeypatch, other_file)
    with pytest.raises(
        ValueError, match=r"other datasets \(--register-coco\)(.|\n)*--restart student"
    ):
        runner.run("student", out_dir, args)
    (tmp_path / "a.json").write_text('{"images": [{"id": 1}], "annotations": [], "categories": []}')
    runner, calls = _fake_runs(monkeypatch, register)
    with pytest.raises(ValueError, match=r"contents of .*a\.json changed since"):
        runner.run("student", out_dir, args)
    assert calls == []


def test_a_killed_stage_resumes_only_under_the_command_it_was_started_with(tmp_path, monkeypatch):
    config = tmp_path / "tokens.yaml"
    config.write_text("SEED: 0\n")
    out_dir = tmp_path / "stage"
    args = ["--config-file", str(config), "MODEL.MASKD.LOSS_WEIGHT", "1.0"]
    runner, calls = _fake_runs(monkeypatch)

    def killed(cmd, check):  # the run checkpoints, then is killed: no marker
        calls.append(cmd)
        (out_dir / "last_checkpoint").write_text("model_0000003.pth")
        raise subprocess.CalledProcessError(-9, cmd)

    from maskd.engine import pipeline as stages

    monkeypatch.setattr(stages.subprocess, "run", killed)
    with pytest.raises(subprocess.CalledProcessError):
        runner.run("tokens", str(out_dir), args)
    assert "--resume" not in calls[-1] and (out_dir / "started.json").exists()
    changed = ["--config-file", str(config), "MODEL.MASKD.LOSS_WEIGHT", "2.0"]
    runner, calls = _fake_runs(monkeypatch)
    with pytest.raises(
        ValueError, match=r"was started with other arguments(.|\n)*LOSS_WEIGHT 1\.0"
    ):
        runner.run("tokens", str(out_dir), changed)
    assert calls == []
    config.write_text("SEED: 1\n")  # same command, the config file edited
    with pytest.raises(ValueError, match=r"was started, but the contents of .*tokens\.yaml"):
        runner.run("tokens", str(out_dir), args)
    config.write_text("SEED: 0\n")
    runner.run("tokens", str(out_dir), args)  # the command it was started with: resumed
    assert "--resume" in calls[-1]
    record = json.loads((out_dir / "stage.json").read_text())
    assert record["args"] == args


@pytest.mark.parametrize("content", ["", "{}", '{"args": "SEED 1"}', '{"stage": "tok'])
def test_a_broken_stage_marker_is_named(tmp_path, monkeypatch, content):
    out_dir = tmp_path / "stage"
    out_dir.mkdir()
    (out_dir / "stage.json").write_text(content)
    runner, calls = _fake_runs(monkeypatch)
    with pytest.raises(ValueError, match=r"stage\.json' is not the marker of a finished stage"):
        runner.run("tokens", str(out_dir), ["--config-file", "x.yaml"])
    assert calls == []


def test_metrics_cut_short_by_a_kill_are_read_up_to_the_last_whole_record(tmp_path):
    from maskd.engine.pipeline import last_metrics

    good = {"iteration": 9, "bbox/AP": 12.5, "retention/bbox/AP": 0.9}
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps(good) + "\n" + '{"iteration": 10, "total_lo')
    assert last_metrics(str(tmp_path)) == {"bbox/AP": 12.5, "retention/bbox/AP": 0.9}
    path.write_text('{"iteration": 1, "bbox/A\n' + json.dumps(good) + "\n")
    with pytest.raises(ValueError, match=r"metrics\.json', line 1, is not a JSON record"):
        last_metrics(str(tmp_path))
