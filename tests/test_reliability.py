"""Reliability of runs: resume after a kill, multi-process and multi-machine training, non-finite
losses named, the frozen teacher across evaluation, live runs left unharmed, and every file
written whole or not at all (atomic, synced, with the umask's mode, temporaries that never pass
for results and are removed only when provably stale)."""

import fnmatch
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from tiny import (
    ROOT,
    TRAIN_NET,
    maskd_cfg,
    run,
    tiny_batch,
    tiny_training,
)

import maskd.modeling.meta_arch.token_learner
import maskd.utils.files
from maskd.checkpoint import MasKDCheckpointer
from maskd.checkpoint.export import export_student, export_tokens
from maskd.cli import train as train_net
from maskd.engine import MasKDTrainer

# the names that the datasets fixture (conftest.py) gives this module's datasets
DATASETS = ("reliability_train", "reliability_val")


@pytest.fixture(scope="module")
def ws(datasets, teachers):
    """Datasets, a teacher, and a stage-1 checkpoint to distil from."""
    return {
        "tmp": datasets.tmp,
        "register": datasets.register,
        "datasets": [*(DATASETS[0], *datasets.train), *(DATASETS[1], *datasets.val)],
        "teacher": teachers.teacher,
        "tokens": teachers.tokens,
    }


def stage_cfg(ws, stage, out, **solver):
    cfg = maskd_cfg(stage, "rcnn", *ws["teacher"], ws["tokens"] if stage == "MasKD" else "")
    cfg = tiny_training(cfg, ws["tmp"] / out, DATASETS)
    cfg.SOLVER.IMS_PER_BATCH = 2
    for k, v in solver.items():
        setattr(cfg.SOLVER, k, v)
    return cfg


def write_cfg(ws, cfg, name):
    path = ws["tmp"] / name
    path.write_text(cfg.dump())
    return str(path)


def metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.json")) as f:
        return [json.loads(line) for line in f if line.strip()]


def _tagged(out_dir) -> int:
    """The iteration number in the name last_checkpoint holds (-1 without one)."""
    try:
        name = (out_dir / "last_checkpoint").read_text().strip()
    except FileNotFoundError:
        return -1
    digits = "".join(c for c in name if c.isdigit())
    return int(digits) if name.startswith("model_") and digits else -1


def _start_training(ws, config):
    """train_net.py on ``config`` in a process group of its own (a kill reaches its workers)."""
    return subprocess.Popen(
        [sys.executable, TRAIN_NET, "--config-file", config, *ws["register"]],
        cwd=ws["tmp"],
        env=dict(os.environ, PYTHONPATH=os.path.join(ROOT, "projects", "MasKD")),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------ resume
@pytest.mark.parametrize("stage", ["MasKDTokenLearner", "MasKD"])
def test_resume_after_kill(ws, stage):
    """A run killed (SIGKILL) after a checkpoint and restarted with --resume continues from the
    checkpoint's iteration with its weights, optimizer and LR schedule; stage 2's warm-up of
    the student-customised masks follows the iteration, not a restarted counter.

    Final weights are not compared with an uninterrupted run: detectron2's TrainingSampler and
    the RPN/ROI sampling draw from random streams that a checkpoint does not hold, so after a
    resume the batches and samples differ. The test checks iteration, schedule and state.
    """
    out = f"resume_{stage}"
    cfg = stage_cfg(
        ws, stage, out, MAX_ITER=400, CHECKPOINT_PERIOD=2, LR_SCHEDULER_NAME="WarmupCosineLR"
    )
    cfg.MODEL.MASKD.CUSTOM_MASK_WARMUP = 3
    cfg.TEST.EVAL_PERIOD = 0
    config = write_cfg(ws, cfg, f"{out}.yaml")
    out_dir = ws["tmp"] / out
    proc = _start_training(ws, config)
    deadline = time.time() + 300
    # kill once last_checkpoint names the checkpoint of iteration 3 or later (the checkpoint
    # file appears just before last_checkpoint is updated)
    while _tagged(out_dir) < 3:
        assert proc.poll() is None, "training ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out_dir / "model_final.pth").exists()
    last = (out_dir / "last_checkpoint").read_text().strip()
    ckpt = torch.load(out_dir / last, weights_only=False)
    k = ckpt["iteration"]
    assert k >= 3
    assert ckpt["trainer"]["_trainer"]["optimizer"]["state"]  # SGD momentum / Adam moments
    assert "LRScheduler" in ckpt["trainer"]["hooks"]
    # A kill during a save may leave a temporary file, never a truncated checkpoint.
    for f in os.listdir(out_dir):
        if f.endswith(".pth"):
            torch.load(out_dir / f, weights_only=False)

    # Resume, and stop after two more iterations to look at what was restored.
    resumed = stage_cfg(
        ws, stage, out, MAX_ITER=k + 3, CHECKPOINT_PERIOD=1000, LR_SCHEDULER_NAME="WarmupCosineLR"
    )
    resumed.MODEL.MASKD.CUSTOM_MASK_WARMUP = 3
    trainer = MasKDTrainer(resumed)
    trainer.resume_or_load(resume=True)
    assert trainer.start_iter == k + 1
    model = trainer.model
    saved = ckpt["model"]
    for name, value in model.state_dict().items():
        assert torch.equal(value, saved[name]), f"{name} not restored"
    assert trainer.optimizer.state_dict()["state"], "optimizer state not restored"
    assert trainer.scheduler.last_epoch == k + 1
    trainer.train()
    assert trainer.iter == k + 3  # ran iterations k+1 and k+2 (detectron2 ends at max_iter)
    if stage == "MasKD":
        with EventStorage(k + 1):
            assert model.custom_masks_active()


# ------------------------------------------------------------------------------ DDP
@pytest.mark.slow
@pytest.mark.parametrize("stage", ["MasKDTokenLearner", "MasKD"])
def test_two_process_ddp(ws, stage):
    out = f"ddp_{stage}"
    cfg = stage_cfg(ws, stage, out, MAX_ITER=3)
    cfg.TEST.EVAL_PERIOD = 0
    cfg.DATASETS.TEST = ()
    config = write_cfg(ws, cfg, f"{out}.yaml")
    out_dir = str(ws["tmp"] / out)
    os.makedirs(out_dir, exist_ok=True)
    run(
        [os.path.join(ROOT, "tests", "dist_worker.py"), config, out_dir, "2"]
        + [f"tcp://127.0.0.1:{free_port()}", *ws["datasets"]],
        ws["tmp"],
    )
    rank0 = torch.load(os.path.join(out_dir, "rank0.pt"))
    rank1 = torch.load(os.path.join(out_dir, "rank1.pt"))
    assert rank0.keys() == rank1.keys() and rank0
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), f"ranks differ in {name}"
    initial = build_model(cfg).state_dict()
    trained = [n for n in rank0 if n in initial and not torch.equal(rank0[n], initial[n])]
    assert trained, "nothing was trained"


@pytest.mark.slow
def test_two_machines_on_localhost(ws):
    cfg = stage_cfg(ws, "MasKD", "two_machines", MAX_ITER=2)
    cfg.TEST.EVAL_PERIOD = 0
    cfg.DATASETS.TEST = ()
    config = write_cfg(ws, cfg, "two_machines.yaml")
    url = f"tcp://127.0.0.1:{free_port()}"
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "projects", "MasKD"))
    procs = [
        subprocess.Popen(
            [sys.executable, TRAIN_NET, "--config-file", config, *ws["register"]]
            + ["--num-machines", "2", "--machine-rank", str(rank), "--dist-url", url],
            cwd=ws["tmp"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, text in zip(procs, outputs):
        assert p.returncode == 0, text[-4000:]
    assert os.path.isfile(ws["tmp"] / "two_machines" / "model_final.pth")


def test_the_collective_timeout_is_a_flag(monkeypatch, tmp_path):
    # NCCL ranks on other machines may notice a dead peer only after the collective timeout;
    # train_net.py makes it a flag.
    import train_net
    from maskd.cli import train

    seen = {}
    monkeypatch.setattr(train, "launch", lambda *a, **k: seen.update(k))
    config = tmp_path / "x.yaml"
    config.write_text(f"OUTPUT_DIR: {tmp_path / 'out'}\n")
    train_net.cli(["--config-file", str(config), "--num-gpus", "8", "--dist-timeout", "5"])
    assert seen["timeout"].total_seconds() == 300
    train_net.cli(["--config-file", str(config)])
    assert seen["timeout"].total_seconds() == 1800  # detectron2's default
    with pytest.raises(SystemExit, match="must be positive"):
        train_net.cli(["--config-file", str(config), "--dist-timeout", "0"])


# ------------------------------------------------------------------------------ non-finite


def test_non_finite_losses_name_the_term(ws, monkeypatch):
    model = build_model(stage_cfg(ws, "MasKD", "nan"))
    model.train()
    batch = tiny_batch(2, 64)
    with torch.no_grad():
        model.align["p3"].weight.fill_(float("nan"))
    with (
        EventStorage(7),
        pytest.raises(FloatingPointError, match=r"iteration 7 in loss_maskd.*'p3'"),
    ):
        model(batch)
    model = build_model(stage_cfg(ws, "MasKD", "nan"))
    with torch.no_grad():
        model.student.roi_heads.box_predictor.cls_score.weight.fill_(float("nan"))
    with (
        EventStorage(0),
        pytest.raises(FloatingPointError, match="student's task losses.*loss_cls"),
    ):
        model.train()(batch)

    learner = build_model(stage_cfg(ws, "MasKDTokenLearner", "nan"))
    monkeypatch.setattr(
        maskd.modeling.meta_arch.token_learner,
        "dice_diversity_loss",
        lambda m, weights: m.sum() * float("nan"),
    )
    with EventStorage(0), pytest.raises(FloatingPointError, match="loss_dice"):
        learner.train()(batch)


# ------------------------------------------------------------------------------ frozen
def test_frozen_teacher_across_evaluation_during_training(ws):
    cfg = stage_cfg(ws, "MasKD", "frozen_eval", MAX_ITER=4)
    cfg.TEST.EVAL_PERIOD = 2  # evaluation rounds in the middle of training
    trainer = MasKDTrainer(cfg)
    trainer.resume_or_load(resume=False)
    model = trainer.model
    teacher = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    tokens = {k: v.clone() for k, v in model.tokens.state_dict().items()}
    seen = []

    from detectron2.engine import HookBase

    class Watch(HookBase):
        def after_step(self):
            seen.append((model.teacher.training, any(m.training for m in model.teacher.modules())))

    trainer.register_hooks([Watch()])
    trainer.train()
    assert len(seen) == 4 and not any(a or b for a, b in seen)
    assert any("bbox" in str(k) for k in trainer.storage.latest())  # evaluations happened
    for k, v in model.teacher.state_dict().items():
        assert torch.equal(v, teacher[k]), k
    for k, v in model.tokens.state_dict().items():
        assert torch.equal(v, tokens[k]), k


# ------------------------------------------------------------------------------ live runs
@pytest.mark.slow
def test_no_live_run_is_harmed_by_a_second_command_on_its_folder(ws):
    """While a training runs, a second training on its OUTPUT_DIR is refused before it writes
    anything, naming the live run; --eval-only with the training's config (a common habit)
    evaluates and removes none of the live run's files (a checkpoint being written included);
    the training then ends normally."""
    out = "live_run"
    # long enough to outlast the evaluation below on a loaded machine (it may still end first:
    # then it ended by itself, with status 0, which is what the test asks of it)
    cfg = stage_cfg(ws, "MasKDTokenLearner", out, MAX_ITER=200, CHECKPOINT_PERIOD=1000)
    cfg.TEST.EVAL_PERIOD = 0
    config = write_cfg(ws, cfg, f"{out}.yaml")
    out_dir = ws["tmp"] / out
    proc = _start_training(ws, config)
    try:
        deadline = time.time() + 300
        while not (out_dir / "metrics.json").exists():  # the live run is training
            assert proc.poll() is None, "the training ended before the test could run"
            assert time.time() < deadline
            time.sleep(0.05)
        # the live run's checkpoint write in progress, as atomic_write names it
        host = maskd.utils.files._HOST
        writing = out_dir / f".model_0000009.pth.{proc.pid}@{host}.abcd1234.tmp"
        writing.write_bytes(b"half a checkpoint")
        config_before = (out_dir / "config.yaml").read_bytes()

        with pytest.raises(maskd.utils.files.FolderHeldError) as e:
            train_net.cli(["--config-file", config, *ws["register"]])
        assert f"pid {proc.pid}" in str(e.value) and "OUTPUT_DIR" in str(e.value), e.value
        assert str(out_dir) in str(e.value)
        assert (out_dir / "config.yaml").read_bytes() == config_before  # nothing written

        stage1_weights = ws["tokens"]
        train_net.cli(
            ["--config-file", config, *ws["register"], "--eval-only"]
            + ["MODEL.WEIGHTS", stage1_weights]
        )
        assert writing.exists()  # the live writer's file stays
        assert proc.poll() in (None, 0), "the evaluation ended the training"
        assert proc.wait(timeout=600) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert (out_dir / "model_final.pth").exists()
    # once the writer is gone its file is provably stale: the next run's checkpointer removes it
    model = build_model(cfg)
    MasKDCheckpointer(model, save_dir=str(out_dir))
    assert not writing.exists()


# ------------------------------------------------------------------------------ files
def test_checkpoints_are_written_atomically(ws, monkeypatch):
    model = build_model(stage_cfg(ws, "MasKD", "atomic"))
    folder = ws["tmp"] / "atomic_ckpt"
    checkpointer = MasKDCheckpointer(model, save_dir=str(folder))
    checkpointer.save("model_0000")
    assert (folder / "last_checkpoint").read_text() == "model_0000.pth"

    names = []

    def killed_mid_write(obj, f):
        names.append(os.path.basename(f))
        with open(f, "wb") as out:
            out.write(b"partial")
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(torch, "save", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        checkpointer.save("model_0001")
    assert (folder / "last_checkpoint").read_text() == "model_0000.pth"
    # what was cut short is a temporary that no reader takes for a checkpoint or config
    (name,) = names
    assert "model_0001" in name
    for pattern in ("*.pth", "model_*", "*.pkl", "*.yaml"):
        assert not fnmatch.fnmatch(name, pattern), (name, pattern)
    assert sorted(os.listdir(folder)) == ["last_checkpoint", "model_0000.pth"]  # and it is gone


def test_files_get_the_umask_mode_and_reach_the_disk_before_the_rename(ws, tmp_path, monkeypatch):
    model = build_model(maskd_cfg("MasKDTokenLearner", "rcnn", *ws["teacher"]))
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(
        os,
        "replace",
        lambda a, b: (events.append(f"replace {os.path.basename(b)}"), real_replace(a, b))[1],
    )
    old = os.umask(0o022)
    try:
        MasKDCheckpointer(model, save_dir=str(tmp_path)).save("model_final")
        export_tokens(str(tmp_path / "model_final.pth"), str(tmp_path / "tokens.pth"))
        os.chmod(tmp_path / "tokens.pth", 0o600)  # --force writes a new file with the umask mode
        export_tokens(str(tmp_path / "model_final.pth"), str(tmp_path / "tokens.pth"), True)
    finally:
        os.umask(old)
    for name in ("model_final.pth", "last_checkpoint", "tokens.pth"):
        assert os.stat(tmp_path / name).st_mode & 0o777 == 0o644, name
    # each file is synced before it is renamed into place
    assert events[:2] == ["fsync", "replace model_final.pth"], events
    assert events[events.index("replace last_checkpoint") - 1] == "fsync"


def test_stale_temporary_files_are_removed_when_a_run_starts(ws, tmp_path):
    """Only provably stale temporaries go: written on this host by a process that has ended.
    A live writer's (another run's, mid-write) and another host's stay."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    host = maskd.utils.files._HOST
    try:
        stale = [
            tmp_path / f".model_0000099.pth.{dead.pid}@{host}.k2j4h5g6.tmp",
            tmp_path / f".last_checkpoint.{dead.pid}@{host}.abcdefgh.tmp",
        ]
        keep = [
            tmp_path / "model_0000099.pth",
            tmp_path / "notes.tmp",
            tmp_path / ".hidden",
            tmp_path / f".model_0000199.pth.{live.pid}@{host}.k2j4h5g6.tmp",  # being written
            tmp_path / f".model_0000299.pth.{dead.pid}@other-host.k2j4h5g6.tmp",
        ]
        for path in stale + keep:
            path.write_bytes(b"x" * 100)
        model = build_model(maskd_cfg("MasKDTokenLearner", "rcnn", *ws["teacher"]))
        MasKDCheckpointer(model, save_dir=str(tmp_path))
        assert not any(p.exists() for p in stale) and all(p.exists() for p in keep)
        # a checkpointer that does not save (the other ranks) leaves the folder alone
        stale[0].write_bytes(b"x")
        MasKDCheckpointer(model, save_dir=str(tmp_path), save_to_disk=False)
        assert stale[0].exists()
        # and the next write of a file removes its own stale temporaries
        export_tokens(ws["tokens"], str(tmp_path / "model_0000099.pth"), overwrite=True)
        assert not stale[0].exists()
        assert all(p.exists() for p in keep)
    finally:
        live.kill()
        live.wait()


def test_student_export_is_complete_or_absent(ws, tmp_path, monkeypatch):
    cfg = maskd_cfg("MasKD", "rcnn", *ws["teacher"], ws["tokens"])
    MasKDCheckpointer(build_model(cfg), save_dir=str(tmp_path)).save("s2")
    with pytest.raises(ValueError, match=r"ends in \.yaml"):
        export_student(str(tmp_path / "s2.pth"), str(tmp_path / "student.yaml"), cfg)
    assert not (tmp_path / "student.yaml").exists()

    def failing(obj, f):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing)
    with pytest.raises(OSError):
        export_student(str(tmp_path / "s2.pth"), str(tmp_path / "rel" / "student.pth"), cfg)
    assert not (tmp_path / "rel" / "student.pth").exists()  # no weights: not a release
    monkeypatch.undo()
    export_student(str(tmp_path / "s2.pth"), str(tmp_path / "rel" / "student.pth"), cfg, True)
    assert (tmp_path / "rel" / "student.pth").exists() and (
        tmp_path / "rel" / "student.yaml"
    ).exists()
