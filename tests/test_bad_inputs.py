"""Bad inputs through the command lines, one case each: train_net.py, tools/export.py,
tools/visualize_masks.py and distill_net.py, called in this process with the arguments a user
would type. Every case is refused before any long work starts, by an error that names the file
and the key or argument (or, where marked, is accepted and behaves correctly).

The cases are listed, with their outcome, in docs/reliability.md; a test checks that the two
agree."""

import importlib.util
import io
import json
import os
import pickle
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model
from tiny import ROOT, maskd_cfg, tiny_training, write_coco_dataset, write_teacher

import train_net
from maskd.checkpoint import MasKDCheckpointer
from maskd.checkpoint.provenance import FINGERPRINT_KEY, fingerprint, fingerprint_text
from maskd.modeling.teacher import build_teacher

CASES = {}  # name -> function(ws, tmp)


def case(fn):
    CASES[fn.__name__] = fn
    return fn


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def refused(call, *fragments, exc=Exception):
    """Run ``call``; assert that it raises ``exc`` whose message holds every fragment."""
    with pytest.raises(exc) as info:
        call()
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in: {message}"
    return message


# --- the workspace: two teachers, stage-1 and stage-2 checkpoints, a dataset ------------------


class _RunsCode:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def ws(datasets, teachers):
    tmp, teacher = datasets.tmp, teachers.teacher
    torch.manual_seed(1)  # other random tokens, same teacher
    MasKDCheckpointer(build_model(stage1_cfg(teacher)), save_dir=str(tmp)).save("tokens_a2")
    s2 = build_model(maskd_cfg("MasKD", "rcnn", *teacher, str(tmp / "tokens_a2.pth")))
    MasKDCheckpointer(s2, save_dir=str(tmp)).save("stage2_tokens_a2")
    return {
        "tmp": tmp,
        "register": datasets.register,
        "dataset": datasets.train,
        "teacher": teacher,
        "other": teachers.other,
        "tokens": teachers.tokens,
        "stage2": str(tmp / "stage2_tokens_a2.pth"),
    }


def stage1_cfg(teacher):
    return maskd_cfg("MasKDTokenLearner", "rcnn", *teacher)


def stage2(ws, tmp, **keys):
    """A tiny stage-2 training config on the workspace's files, ``keys`` set (dotted names)."""
    cfg = tiny_training(maskd_cfg("MasKD", "rcnn", *ws["teacher"], ws["tokens"]), tmp / "out")
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = ("bad_inputs_train",), ("bad_inputs_val",)
    cfg.merge_from_list([x for k, v in keys.items() for x in (k.replace("__", "."), v)])
    return cfg


def write(cfg, path):
    path.write_text(cfg.dump())
    return str(path)


def train(ws, config_file, *extra):
    return train_net.cli(["--config-file", str(config_file), *ws["register"], *extra])


def train_cfg(ws, tmp, cfg, *extra):
    return lambda: train(ws, write(cfg, tmp / "config.yaml"), *extra)


def pkl(path, data: bytes):
    path.write_bytes(data)
    return str(path)


# hand-written pickles: the attacks the guarded unpickler refuses
def _const(obj):
    buf = io.BytesIO()
    pickler = pickle._Pickler(buf, 2)
    pickler.fast = True  # no memo entries: the pieces can be put together
    pickler.dump(obj)
    return buf.getvalue()[2:-1]


def _global(module, name):
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _put(i):
    return b"r" + i.to_bytes(4, "little")


def _get(i):
    return b"j" + i.to_bytes(4, "little")


def dtype_to_object_pickle():
    """A void dtype made a struct, an array of 8 raw bytes, then the dtype's field made an
    object: numpy would read the bytes as a pointer (a crash, or worse)."""
    s = b"\x80\x02}" + _const("model") + b"]"
    s += _global("numpy", "dtype") + _const(("V8", False, True)) + b"R" + _put(900)
    s += _const((3, "|", None, ("f0",), {"f0": (np.dtype("V8"), 0)}, 8, 1, 16)) + b"ba"
    s += _global("numpy.core.multiarray", "_reconstruct") + _const((np.ndarray, (0,), "b"))
    s += b"R(" + _const(1) + _const((1,)) + _get(900) + b"\x89" + _const(b"\0" * 8) + b"tba"
    s += _get(900) + _const((3, "|", None, ("f0",), {"f0": (np.dtype("O"), 0)}, 8, 63, 16))
    return s + b"bas."


def second_dtype_state_pickle():
    """A float64 dtype whose state is set twice (the second time could make it anything)."""
    s = b"\x80\x02}" + _const("model") + b"}" + _const("w")
    s += _global("numpy", "dtype") + _const(("f8", False, True)) + b"R" + _put(900)
    s += _const((3, "<", None, None, None, -1, -1, 0)) + b"b"
    s += _get(900) + _const((3, "<", None, None, None, -1, -1, 0)) + b"b"
    return s + b"ss."


def struct_after_build_pickle():
    """A float64 dtype whose (first) state makes it a structured dtype with an object field."""
    s = b"\x80\x02}" + _const("model") + _global("numpy", "dtype")
    s += _const(("f8", False, True)) + b"R"
    s += _const((3, "|", None, ("a",), {"a": (np.dtype("O"), 0)}, 8, 63, 16)) + b"bs."
    return s


def huge_array_pickle():
    """300 bytes that ask numpy for a 1.5 GB array."""
    s = b"\x80\x02}" + _const("model") + _global("numpy.core.multiarray", "_reconstruct")
    return s + _const((np.ndarray, (1_500_000_000,), "b")) + b"Rs."


def runstring_pickle(marker):
    """A numpy global that executes a string of code: it would create the file ``marker``."""
    s = b"\x80\x02" + _global("numpy.testing._private.utils", "runstring")
    return s + _const((f"open({str(marker)!r}, 'w').close()", {})) + b"R."


# --- weights files ---------------------------------------------------------------------------


@case
def pkl_calling_open_in_each_weights_key(ws, tmp):
    for key in ("MODEL.MASKD.TEACHER.WEIGHTS", "MODEL.MASKD.TOKENS_WEIGHTS", "MODEL.WEIGHTS"):
        marker = tmp / f"ran_{key}"
        path = tmp / f"evil_{key.replace('.', '_')}.pkl"
        with open(path, "wb") as f:
            pickle.dump({"model": {"w": _RunsCode(str(marker))}, "__author__": "x"}, f)
        cfg = stage2(ws, tmp, **{key.replace(".", "__"): str(path)})
        refused(train_cfg(ws, tmp, cfg), key, path.name, "io.open", "refused")
        assert not marker.exists(), key


@case
def pkl_dtype_turned_object_as_teacher_weights(ws, tmp):
    path = pkl(tmp / "crash.pkl", dtype_to_object_pickle())
    cfg = stage2(ws, tmp, MODEL__MASKD__TEACHER__WEIGHTS=path)
    refused(train_cfg(ws, tmp, cfg), "MODEL.MASKD.TEACHER.WEIGHTS", "crash.pkl", "dtype '|V8'")


@case
def pkl_second_dtype_state_as_model_weights(ws, tmp):
    path = pkl(tmp / "twice.pkl", second_dtype_state_pickle())
    cfg = stage2(ws, tmp, MODEL__WEIGHTS=path)
    refused(train_cfg(ws, tmp, cfg), "twice.pkl", "state of a numpy dtype a second time")


@case
def pkl_dtype_state_makes_a_struct_as_tokens_weights(ws, tmp):
    path = pkl(tmp / "struct.pkl", struct_after_build_pickle())
    cfg = stage2(ws, tmp, MODEL__MASKD__TOKENS_WEIGHTS=path)
    refused(train_cfg(ws, tmp, cfg), "MODEL.MASKD.TOKENS_WEIGHTS", "struct.pkl", "numpy dtype")


@case
def pkl_dtype_state_with_a_negative_item_size_as_teacher_weights(ws, tmp):
    """A string dtype whose state gives it item size -5, then a numpy scalar of it: numpy's
    C code would read out of bounds (the process died)."""
    s = b"\x80\x02}" + _const("model") + _global("numpy.core.multiarray", "scalar")
    s += _global("numpy", "dtype") + _const(("S1", False, True)) + b"R"
    s += _const((3, "|", None, None, None, -5, 1, 0)) + b"b" + _const(b"abcd") + b"\x86Rs."
    path = pkl(tmp / "itemsize.pkl", s)
    cfg = stage2(ws, tmp, MODEL__MASKD__TEACHER__WEIGHTS=path)
    refused(train_cfg(ws, tmp, cfg), "MODEL.MASKD.TEACHER.WEIGHTS", "itemsize.pkl", "-5, 1, 0)")


@case
def pkl_bytearray_declaring_2_gb_as_tokens_weights(ws, tmp):
    """12 bytes of protocol 5 whose BYTEARRAY8 declares 2 GB (pickle would zero-fill them)."""
    path = pkl(
        tmp / "bytearray.pkl", b"\x80\x05\x96" + (2_000_000_000).to_bytes(8, "little") + b"."
    )
    cfg = stage2(ws, tmp, MODEL__MASKD__TOKENS_WEIGHTS=path)
    refused(train_cfg(ws, tmp, cfg), "MODEL.MASKD.TOKENS_WEIGHTS", "bytearray of 2000000000 bytes")


@case
def pkl_declaring_a_huge_array(ws, tmp):
    path = pkl(tmp / "huge.pkl", huge_array_pickle())
    assert os.path.getsize(path) < 400
    cfg = stage2(ws, tmp, MODEL__MASKD__TEACHER__WEIGHTS=path)
    refused(train_cfg(ws, tmp, cfg), "huge.pkl", "more bytes (1500000000", "than the file holds")


@case
def pkl_numpy_runstring_global(ws, tmp):
    marker = tmp / "ran"
    path = pkl(tmp / "runstring.pkl", runstring_pickle(marker))
    cfg = stage2(ws, tmp, MODEL__MASKD__TEACHER__WEIGHTS=path)
    error = None
    try:
        train_cfg(ws, tmp, cfg)()
    except Exception as e:
        error = str(e)
    assert not marker.exists(), "the pickle's code ran"  # first of all: no code ran
    assert error and "runstring.pkl" in error
    assert "numpy.testing._private.utils.runstring" in error


@case
def pkl_attack_in_visualize_masks(ws, tmp):
    path = pkl(tmp / "crash.pkl", dtype_to_object_pickle())
    config = write(stage1_cfg(ws["teacher"]), tmp / "s1.yaml")
    tool = _tool("visualize_masks")
    argv = ["--config-file", config, "--checkpoint", path, "--output", str(tmp / "png")]
    argv += ["--dataset", "bad_inputs_train", *ws["register"]]
    refused(lambda: tool.main(argv), "--checkpoint", "crash.pkl")


@case
def pth_code_payload_with_torch_weights_only_disabled(ws, tmp):
    marker = tmp / "ran"
    torch.save({"model": {"w": _RunsCode(str(marker))}}, tmp / "evil.pth")
    os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        cfg = stage2(ws, tmp, MODEL__MASKD__TEACHER__WEIGHTS=str(tmp / "evil.pth"))
        refused(train_cfg(ws, tmp, cfg), "MODEL.MASKD.TEACHER.WEIGHTS", "evil.pth", "Weights only")
    finally:
        del os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"]
    assert not marker.exists()


@case
def teacher_weights_file_missing(ws, tmp):
    cfg = stage2(ws, tmp, MODEL__MASKD__TEACHER__WEIGHTS=str(tmp / "nope.pth"))
    refused(train_cfg(ws, tmp, cfg), "MODEL.MASKD.TEACHER.WEIGHTS", "nope.pth", "not found")


@case
def teacher_weights_file_truncated(ws, tmp):
    data = open(ws["teacher"][1], "rb").read()
    (tmp / "cut.pth").write_bytes(data[: len(data) // 2])
    cfg = stage2(ws, tmp, MODEL__MASKD__TEACHER__WEIGHTS=str(tmp / "cut.pth"))
    refused(train_cfg(ws, tmp, cfg), "MODEL.MASKD.TEACHER.WEIGHTS", "cut.pth", "could not read")


@case
def pth_inflating_a_thousandfold_as_teacher_weights(ws, tmp):
    """A 66 KB .pth whose deflated record holds 64 MB of zeros (torch reads it whole)."""
    import zipfile

    torch.save({"model": {"w": torch.zeros(2**24)}}, tmp / "plain.pth")
    with (
        zipfile.ZipFile(tmp / "plain.pth") as zin,
        zipfile.ZipFile(tmp / "deflated.pth", "w", zipfile.ZIP_DEFLATED) as zout,
    ):
        for name in zin.namelist():
            zout.writestr(name, zin.read(name))
    assert os.path.getsize(tmp / "deflated.pth") < 2**17
    cfg = stage2(ws, tmp, MODEL__MASKD__TEACHER__WEIGHTS=str(tmp / "deflated.pth"))
    refused(train_cfg(ws, tmp, cfg), "TEACHER.WEIGHTS", "deflated.pth", "inflate to 67")


@case
def pth_of_a_list_as_teacher_weights(ws, tmp):
    torch.save([torch.zeros(3)], tmp / "list.pth")
    cfg = stage2(ws, tmp, MODEL__MASKD__TEACHER__WEIGHTS=str(tmp / "list.pth"))
    refused(train_cfg(ws, tmp, cfg), "TEACHER.WEIGHTS", "list.pth", '"model" entry is a list')


@case
def pth_with_a_list_under_model_as_model_weights(ws, tmp):
    torch.save({"model": [torch.zeros(3)]}, tmp / "list.pth")
    cfg = stage2(ws, tmp, MODEL__WEIGHTS=str(tmp / "list.pth"))
    refused(train_cfg(ws, tmp, cfg), "MODEL.WEIGHTS", "list.pth", '"model" entry is a list')


@case
def pth_with_integer_keys_as_tokens_weights(ws, tmp):
    state = torch.load(ws["tokens"], weights_only=True)["model"]
    torch.save({"model": {i: v for i, v in enumerate(state.values())}}, tmp / "ints.pth")
    cfg = stage2(ws, tmp, MODEL__MASKD__TOKENS_WEIGHTS=str(tmp / "ints.pth"))
    refused(train_cfg(ws, tmp, cfg), "TOKENS_WEIGHTS", "ints.pth", "named by ints")


@case
def pth_with_a_string_for_a_token_tensor(ws, tmp):
    ckpt = torch.load(ws["tokens"], weights_only=True)
    key = next(k for k in ckpt["model"] if k.startswith("teacher.backbone.tokens."))
    ckpt["model"][key] = "tokens"
    torch.save(ckpt, tmp / "str.pth")
    cfg = stage2(ws, tmp, MODEL__MASKD__TOKENS_WEIGHTS=str(tmp / "str.pth"))
    refused(train_cfg(ws, tmp, cfg), "TOKENS_WEIGHTS", "str.pth", f"{key} (str)")


@case
def pth_with_nan_weights_as_teacher_weights(ws, tmp):
    ckpt = torch.load(ws["teacher"][1], weights_only=True)
    key = sorted(k for k, v in ckpt["model"].items() if v.is_floating_point())[0]
    ckpt["model"][key] = ckpt["model"][key].clone().fill_(float("nan"))
    torch.save(ckpt, tmp / "nan.pth")
    cfg = stage2(ws, tmp, MODEL__MASKD__TEACHER__WEIGHTS=str(tmp / "nan.pth"))
    refused(train_cfg(ws, tmp, cfg), "TEACHER.WEIGHTS", "nan.pth", "NaN or inf", key)


@case
def pth_with_complex_weights_as_teacher_weights(ws, tmp):
    """The teacher's weights + 1j: loading keeps the real part, so the file would pass as
    the teacher its real part is (its fingerprint too)."""
    ckpt = torch.load(ws["teacher"][1], weights_only=True)
    keys = sorted(k for k, v in ckpt["model"].items() if v.is_floating_point())
    for key in keys:
        ckpt["model"][key] = ckpt["model"][key] + 1j
    torch.save(ckpt, tmp / "complex.pth")
    cfg = stage2(ws, tmp, MODEL__MASKD__TEACHER__WEIGHTS=str(tmp / "complex.pth"))
    refused(
        train_cfg(ws, tmp, cfg),
        "TEACHER.WEIGHTS",
        "complex.pth",
        "not dense real numbers",
        f"{keys[0]} (torch.complex64)",
    )


@case
def pth_with_a_sparse_tensor_as_teacher_weights(ws, tmp):
    """One of the teacher's weights stored as a sparse tensor (loading failed with a message
    about ``aten::ne.Scalar``)."""
    ckpt = torch.load(ws["teacher"][1], weights_only=True)
    key = sorted(k for k, v in ckpt["model"].items() if v.is_floating_point() and v.dim() == 4)[0]
    ckpt["model"][key] = ckpt["model"][key].to_sparse()
    torch.save(ckpt, tmp / "sparse.pth")
    cfg = stage2(ws, tmp, MODEL__MASKD__TEACHER__WEIGHTS=str(tmp / "sparse.pth"))
    refused(
        train_cfg(ws, tmp, cfg),
        "TEACHER.WEIGHTS",
        "sparse.pth",
        "not dense real numbers",
        f"{key} (sparse torch.float32)",
    )


@case
def pkl_with_a_complex_array_as_model_weights(ws, tmp):
    """A .pkl (detectron2's format) whose array under a weight's key is complex."""
    state = torch.load(ws["stage2"], weights_only=True)["model"]
    arrays = {k: v.numpy() for k, v in state.items() if k.startswith("student.")}
    key = sorted(k for k, v in arrays.items() if v.dtype.kind == "f")[0]
    arrays[key] = arrays[key] + 2j
    path = pkl(tmp / "complex.pkl", pickle.dumps({"model": arrays, "__author__": "x"}, 2))
    cfg = stage2(ws, tmp, MODEL__WEIGHTS=path)
    refused(train_cfg(ws, tmp, cfg), "MODEL.WEIGHTS", "complex.pkl", f"{key} (complex64)", "real")


@case
def model_weights_truncated_in_training(ws, tmp):
    data = open(ws["stage2"], "rb").read()
    (tmp / "cut.pth").write_bytes(data[: len(data) // 2])
    cfg = stage2(ws, tmp, MODEL__WEIGHTS=str(tmp / "cut.pth"))
    refused(train_cfg(ws, tmp, cfg), "MODEL.WEIGHTS", "cut.pth", "could not")


@case
def model_weights_of_garbage_pkl_in_training(ws, tmp):
    pkl(tmp / "garbage.pkl", os.urandom(64))
    cfg = stage2(ws, tmp, MODEL__WEIGHTS=str(tmp / "garbage.pkl"))
    refused(train_cfg(ws, tmp, cfg), "MODEL.WEIGHTS", "garbage.pkl")


@case
def model_weights_file_missing_in_training(ws, tmp):
    cfg = stage2(ws, tmp, MODEL__WEIGHTS=str(tmp / "nowhere.pth"))
    refused(train_cfg(ws, tmp, cfg), "MODEL.WEIGHTS", "nowhere.pth", "file not found")


@case
def resume_with_an_empty_last_checkpoint(ws, tmp):
    cfg = stage2(ws, tmp)
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    open(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint"), "w").close()
    refused(train_cfg(ws, tmp, cfg, "--resume"), "last_checkpoint", "not a checkpoint file")


@case
def resume_with_last_checkpoint_linked_to_dev_zero(ws, tmp):
    """last_checkpoint a link to /dev/zero: fvcore read it to the end (3 GB, MemoryError)."""
    cfg = stage2(ws, tmp)
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    os.symlink("/dev/zero", os.path.join(cfg.OUTPUT_DIR, "last_checkpoint"))
    refused(train_cfg(ws, tmp, cfg, "--resume"), "last_checkpoint", "is a symbolic link")


@case
def resume_from_a_checkpoint_linked_elsewhere(ws, tmp):
    """last_checkpoint names a file of the folder that is a link (to /dev/zero)."""
    cfg = stage2(ws, tmp)
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    os.symlink("/dev/zero", os.path.join(cfg.OUTPUT_DIR, "model_0000003.pth"))
    with open(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint"), "w") as f:
        f.write("model_0000003.pth")
    refused(train_cfg(ws, tmp, cfg, "--resume"), "model_0000003.pth", "is a symbolic link")


def _planted_lock(ws, tmp, plant):
    """A training in a folder whose lock file a test planted: refused, naming it."""
    cfg = stage2(ws, tmp)
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    lock = os.path.join(cfg.OUTPUT_DIR, ".maskd.lock")
    plant(lock)
    return train_cfg(ws, tmp, cfg), lock


@case
def lock_file_planted_as_a_link_to_another_file(ws, tmp):
    """.maskd.lock a link to a file of the user's: a training truncated it and wrote into it."""
    victim = tmp / "victim.txt"
    victim.write_text("the user's file\n")
    call, lock = _planted_lock(ws, tmp, lambda path: os.symlink(victim, path))
    refused(call, ".maskd.lock", "is a symbolic link")
    assert victim.read_text() == "the user's file\n"


@case
def lock_file_planted_as_a_dangling_link(ws, tmp):
    """A dangling link: the training created its target, outside the folder."""
    target = tmp / "outside" / "created.txt"
    (tmp / "outside").mkdir()
    call, lock = _planted_lock(ws, tmp, lambda path: os.symlink(target, path))
    refused(call, ".maskd.lock", "is a symbolic link")
    assert not target.exists()


@case
def lock_file_planted_as_a_directory_or_fifo(ws, tmp):
    for plant, kind in ((os.mkdir, "a directory"), (os.mkfifo, "a FIFO")):
        call, lock = _planted_lock(ws, tmp, plant)
        refused(call, ".maskd.lock", f"is {kind}")
        (os.rmdir if kind == "a directory" else os.remove)(lock)


@case
def output_dir_that_is_a_file(ws, tmp):
    cfg = stage2(ws, tmp)
    os.makedirs(os.path.dirname(cfg.OUTPUT_DIR), exist_ok=True)
    with open(cfg.OUTPUT_DIR, "w") as f:
        f.write("a file where the output folder goes")
    refused(train_cfg(ws, tmp, cfg), "OUTPUT_DIR", "is not a folder")


@case
def resume_with_a_changed_student(ws, tmp):
    """The folder's checkpoint is of a student with a wider FPN: detectron2 would skip those
    weights and the optimizer would fail mid-training with a raw size error."""
    cfg = stage2(ws, tmp, MODEL__FPN__OUT_CHANNELS="48")
    MasKDCheckpointer(build_model(cfg), save_dir=cfg.OUTPUT_DIR).save("model_0000003")
    refused(train_cfg(ws, tmp, stage2(ws, tmp), "--resume"), "--resume", "shape mismatches")


@case
def pth_of_torchs_legacy_format_declaring_8_gb(ws, tmp):
    """torch's pre-zip format: a 400-byte file whose storage declares 2e9 floats. torch sizes
    the storage from the file (pages never touched) and fails at once: no memory is taken."""
    import struct

    buffer = io.BytesIO()
    torch.save({"model": {"w": torch.zeros(4)}}, buffer, _use_new_zipfile_serialization=False)
    data = bytearray(buffer.getvalue())
    at = data.find(b"X\x03\x00\x00\x00cpu") + 10  # the storage's element count follows
    assert data[at : at + 2] == b"K\x04"
    data[at : at + 2] = b"J" + struct.pack("<i", 2_000_000_000)
    (tmp / "legacy.pth").write_bytes(bytes(data))
    cfg = stage2(ws, tmp, MODEL__MASKD__TEACHER__WEIGHTS=str(tmp / "legacy.pth"))
    refused(train_cfg(ws, tmp, cfg), "TEACHER.WEIGHTS", "legacy.pth", "could not read")


@case
def tokens_export_given_as_teacher_weights(ws, tmp):
    export = _tool("export")
    export.main(["tokens", "--checkpoint", ws["tokens"], "--output", str(tmp / "tok.pth")])
    cfg = stage2(ws, tmp, MODEL__MASKD__TEACHER__WEIGHTS=str(tmp / "tok.pth"))
    message = refused(
        train_cfg(ws, tmp, cfg), "MODEL.MASKD.TEACHER.WEIGHTS", "tok.pth", "a tokens export"
    )
    assert "a a " not in message


@case
def teacher_weights_of_integers(ws, tmp):
    state = torch.load(ws["teacher"][1], weights_only=True)["model"]
    torch.save({"model": {k: (v * 100).long() for k, v in state.items()}}, tmp / "ints.pth")
    cfg = stage2(ws, tmp, MODEL__MASKD__TEACHER__WEIGHTS=str(tmp / "ints.pth"))
    refused(
        train_cfg(ws, tmp, cfg), "MODEL.MASKD.TEACHER.WEIGHTS", "ints.pth", "another kind of number"
    )


@case
def teacher_weights_in_half_precision_accepted(ws, tmp):
    """Accepted: an fp16 teacher file loads exactly, and its tokens stay bound to it."""
    state = torch.load(ws["teacher"][1], weights_only=True)["model"]
    half = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    torch.save({"model": half}, tmp / "half.pth")
    teacher = (ws["teacher"][0], str(tmp / "half.pth"))
    model = build_model(stage1_cfg(teacher))
    assert fingerprint_text(model.teacher_fingerprint) == fingerprint(half)
    MasKDCheckpointer(model, save_dir=str(tmp)).save("tokens_half")
    build_model(maskd_cfg("MasKD", "rcnn", *teacher, str(tmp / "tokens_half.pth")))


@case
def teacher_weights_of_another_architecture(ws, tmp):
    other = write_teacher(tmp, "rcnn", seed=0, opts=["MODEL.FPN.OUT_CHANNELS", "64"], name="wide")
    cfg = stage2(ws, tmp, MODEL__MASKD__TEACHER__WEIGHTS=other[1])
    refused(train_cfg(ws, tmp, cfg), "MODEL.MASKD.TEACHER.WEIGHTS", "wide.pth", "does not fit")


# --- config files ----------------------------------------------------------------------------

PYTHON_TAG = 'MODEL:\n  WEIGHTS: !!python/object/apply:os.system ["touch {marker}"]\n'


@case
def python_tag_in_the_config_file(ws, tmp):
    marker = tmp / "ran"
    (tmp / "evil.yaml").write_text(PYTHON_TAG.format(marker=marker))
    refused(lambda: train(ws, tmp / "evil.yaml"), "evil.yaml", "Python tag", "(line 2)")
    assert not marker.exists()


@case
def python_tag_in_the_teacher_config(ws, tmp):
    marker = tmp / "ran"
    (tmp / "evil_teacher.yaml").write_text(PYTHON_TAG.format(marker=marker))
    cfg = stage2(ws, tmp, MODEL__MASKD__TEACHER__CONFIG_FILE=str(tmp / "evil_teacher.yaml"))
    refused(train_cfg(ws, tmp, cfg), "evil_teacher.yaml", "Python tag")
    assert not marker.exists()


@case
def python_tag_in_the_config_of_a_student_export(ws, tmp):
    marker = tmp / "ran"
    (tmp / "evil.yaml").write_text(PYTHON_TAG.format(marker=marker))
    argv = ["student", "--checkpoint", ws["stage2"], "--output", str(tmp / "student.pth")]
    export = _tool("export")
    refused(lambda: export.main(argv + ["--config-file", str(tmp / "evil.yaml")]), "evil.yaml")
    assert not marker.exists() and not (tmp / "student.pth").exists()


@case
def python_tag_in_a_lazyconfig_yaml(ws, tmp):
    marker = tmp / "ran"
    text = "model:\n  _target_: !!python/object/apply:os.system ['touch {marker}']\ntrain: {{}}\n"
    (tmp / "lazy.yaml").write_text(text.format(marker=marker))
    refused(lambda: train(ws, tmp / "lazy.yaml"), "lazy.yaml", "Python tag")
    assert not marker.exists()


@case
def empty_config_file(ws, tmp):
    (tmp / "empty.yaml").write_text("")
    refused(lambda: train(ws, tmp / "empty.yaml"), "empty.yaml", "is empty")


@case
def config_file_of_a_list(ws, tmp):
    (tmp / "list.yaml").write_text("- MODEL\n- SOLVER\n")
    refused(lambda: train(ws, tmp / "list.yaml"), "list.yaml", "not a mapping")


@case
def config_file_not_yaml(ws, tmp):
    (tmp / "broken.yaml").write_text("MODEL: {WEIGHTS: [\n")
    refused(lambda: train(ws, tmp / "broken.yaml"), "broken.yaml", "not valid YAML")


@case
def config_file_missing(ws, tmp):
    refused(lambda: train(ws, tmp / "nope.yaml"), "nope.yaml", "not found")


@case
def teacher_config_neither_file_nor_zoo_name(ws, tmp):
    cfg = stage2(ws, tmp, MODEL__MASKD__TEACHER__CONFIG_FILE="my/teacher.yaml")
    refused(train_cfg(ws, tmp, cfg), "MODEL.MASKD.TEACHER.CONFIG_FILE", "my/teacher.yaml")


@case
def zoo_base_that_does_not_exist(ws, tmp):
    (tmp / "zoo.yaml").write_text('_BASE_: "zoo:COCO-Detection/no_such_model.yaml"\n')
    refused(lambda: train(ws, tmp / "zoo.yaml"), "zoo.yaml", "no_such_model.yaml")


@case
def base_cycle(ws, tmp):
    """a.yaml -> b.yaml -> a.yaml: detectron2 recursed a thousand frames deep."""
    (tmp / "a.yaml").write_text('_BASE_: "b.yaml"\n')
    (tmp / "b.yaml").write_text('_BASE_: "a.yaml"\n')
    refused(lambda: train(ws, tmp / "a.yaml"), "_BASE_ form a cycle", "a.yaml -> ", "b.yaml")


def _alias_bomb(levels=8):
    """A few hundred bytes of YAML whose aliases expand to 10^(levels+1) list items."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


@case
def yaml_alias_bomb_in_a_yacs_config(ws, tmp):
    """~550 bytes that yacs would expand to 10^9 items (minutes, gigabytes)."""
    (tmp / "bomb.yaml").write_text(_alias_bomb() + "MODEL:\n  META_ARCHITECTURE: MasKD\n")
    refused(lambda: train(ws, tmp / "bomb.yaml"), "bomb.yaml", "aliases expand", "to 2345679068")


@case
def yaml_alias_bomb_in_a_saved_lazyconfig(ws, tmp):
    text = "model:\n" + "".join(f"  {line}\n" for line in _alias_bomb().splitlines())
    (tmp / "bomb.yaml").write_text(text + "train: {output_dir: out}\n")
    refused(lambda: train(ws, tmp / "bomb.yaml"), "bomb.yaml", "aliases expand")


@case
def python_name_tag_in_a_saved_lazyconfig_imports_nothing(ws, tmp):
    """A ``!!python/name:`` tag naming a module beside the config (importable, as with
    ``python -m``): resolving it while reading would import the module and run its code; the
    name is kept for instantiation, and the file is refused for its unregistered dataset with
    the module unimported."""
    import sys

    marker = tmp / "ran"
    (tmp / "bi_evil_module.py").write_text(f"open({str(marker)!r}, 'w').close()\ndef f(): pass\n")
    text = (
        "model: {_target_: detectron2.modeling.GeneralizedRCNN, "
        "norm: !!python/name:bi_evil_module.f ''}\n"
        "dataloader: {test: {dataset: {names: bi_no_such_dataset}}}\n"
        f"train: {{output_dir: {str(tmp / 'out')!r}, init_checkpoint: ''}}\n"
    )
    (tmp / "lazy.yaml").write_text(text)
    sys.path.insert(0, str(tmp))
    try:
        refused(lambda: train(ws, tmp / "lazy.yaml", "--eval-only"), "bi_no_such_dataset")
    finally:
        sys.path.remove(str(tmp))
    assert not marker.exists() and "bi_evil_module" not in sys.modules


@case
def functools_partial_tag_without_its_function(ws, tmp):
    text = (
        "model:\n  act: !!python/object/apply:functools.partial\n    args: []\n"
        "    state: !!python/tuple [1, 2]\ntrain: {output_dir: out}\n"
    )
    (tmp / "lazy.yaml").write_text(text)
    refused(lambda: train(ws, tmp / "lazy.yaml"), "lazy.yaml", "line 2", "functools.partial")


@case
def base_given_as_a_list(ws, tmp):
    write(stage2(ws, tmp), tmp / "base.yaml")
    (tmp / "c.yaml").write_text('_BASE_: ["base.yaml", "zoo:COCO-Detection/x.yaml"]\n')
    refused(lambda: train(ws, tmp / "c.yaml"), "c.yaml", "_BASE_ must name one config file")


@case
def base_given_as_a_url(ws, tmp):
    (tmp / "c.yaml").write_text('_BASE_: "https://example.com/base.yaml"\n')
    refused(lambda: train(ws, tmp / "c.yaml"), "c.yaml", "is a URL", "not fetched")


@case
def base_file_missing(ws, tmp):
    (tmp / "c.yaml").write_text('_BASE_: "no_such_base.yaml"\n')
    refused(lambda: train(ws, tmp / "c.yaml"), "c.yaml", "no_such_base.yaml", "is not a file")


@case
def teacher_opts_of_odd_length(ws, tmp):
    cfg = stage2(ws, tmp)
    cfg.MODEL.MASKD.TEACHER.OPTS = ["MODEL.PIXEL_MEAN"]
    refused(train_cfg(ws, tmp, cfg), "MODEL.MASKD.TEACHER.OPTS", "teacher_a", "odd number")


@case
def teacher_opts_with_an_unknown_key(ws, tmp):
    cfg = stage2(ws, tmp)
    cfg.MODEL.MASKD.TEACHER.OPTS = ["MODEL.FPN.NO_SUCH_KEY", "1"]
    refused(train_cfg(ws, tmp, cfg), "MODEL.MASKD.TEACHER.OPTS", "MODEL.FPN.NO_SUCH_KEY")


@case
def maskd_config_as_its_own_teacher_config(ws, tmp):
    """The stage-2 config names itself as its teacher's: each teacher would build a teacher."""
    cfg = stage2(ws, tmp, MODEL__MASKD__TEACHER__CONFIG_FILE=str(tmp / "config.yaml"))
    refused(train_cfg(ws, tmp, cfg), "config.yaml", "TEACHER.CONFIG_FILE) is a MasKD config")


@case
def duplicate_yaml_key(ws, tmp):
    """A second LOSS_WEIGHT further down: YAML keeps the last, distillation would be off."""
    write(stage2(ws, tmp), tmp / "base.yaml")
    text = "MODEL:\n  MASKD:\n    LOSS_WEIGHT: 1.0\n    ROI_REG_KD:\n      WEIGHT: 1.0\n"
    (tmp / "dup.yaml").write_text('_BASE_: "base.yaml"\n' + text + "    LOSS_WEIGHT: 0.0\n")
    refused(
        lambda: train(ws, tmp / "dup.yaml"),
        "dup.yaml",
        "'LOSS_WEIGHT' appears twice",
        "lines 4 and 7",
    )


@case
def yaml_alias_repeating_a_long_string(ws, tmp):
    """A 20 KB string repeated 900 times through an alias: 24 KB of file, an 18 MB config."""
    write(stage2(ws, tmp), tmp / "base.yaml")
    text = f"_BASE_: base.yaml\nNOTE: &n '{'x' * 20000}'\nNOTES: [" + ", ".join(["*n"] * 900)
    (tmp / "long.yaml").write_text(text + "]\n")
    refused(lambda: train(ws, tmp / "long.yaml"), "long.yaml", "expand", "10 times its own")


@case
def yaml_nested_thousands_deep(ws, tmp):
    """5,000 nested lists: PyYAML's composer failed with a raw RecursionError."""
    (tmp / "deep.yaml").write_text("MODEL: " + "[" * 5000 + "]" * 5000 + "\n")
    refused(lambda: train(ws, tmp / "deep.yaml"), "deep.yaml", "nested more than 100 levels")


@case
def config_file_that_is_dev_zero(ws, tmp):
    os.symlink("/dev/zero", tmp / "zero.yaml")
    refused(lambda: train(ws, tmp / "zero.yaml"), "zero.yaml", "not a regular file")


@case
def two_merge_keys_in_one_yaml_mapping(ws, tmp):
    """Two `<<` in one mapping: PyYAML keeps one of them, so one LOSS_WEIGHT goes unseen."""
    write(stage2(ws, tmp), tmp / "base.yaml")
    text = "MODEL:\n  MASKD:\n    <<: {LOSS_WEIGHT: 3.0}\n    <<: {LOSS_WEIGHT: 0.0}\n"
    (tmp / "merge.yaml").write_text('_BASE_: "base.yaml"\n' + text)
    refused(
        lambda: train(ws, tmp / "merge.yaml"),
        "merge.yaml",
        "merge key '<<' appears 2 times",
        "lines 4, 5",
    )


@case
def yaml_mixing_yacs_and_lazyconfig_keys(ws, tmp):
    """`model:` beside `SOLVER:`: read as a LazyConfig, its `_target_` entries would run."""
    (tmp / "mixed.yaml").write_text("model:\n  _target_: builtins.print\nSOLVER:\n  BASE_LR: 0.1\n")
    refused(lambda: train(ws, tmp / "mixed.yaml"), "mixed.yaml", "SOLVER", "model", "mixes")


@case
def unknown_config_key(ws, tmp):
    cfg = stage2(ws, tmp)
    call = train_cfg(ws, tmp, cfg, "MODEL.MASKD.TOKEN_WEIGHTS", "x.pth")
    refused(call, "MODEL.MASKD.TOKEN_WEIGHTS")


@case
def max_iter_zero(ws, tmp):
    refused(train_cfg(ws, tmp, stage2(ws, tmp, SOLVER__MAX_ITER="0")), "SOLVER.MAX_ITER", "got 0")


@case
def max_iter_negative(ws, tmp):
    cfg = stage2(ws, tmp, SOLVER__MAX_ITER="-5")
    refused(train_cfg(ws, tmp, cfg), "SOLVER.MAX_ITER", "got -5")


@case
def negative_loss_weight(ws, tmp):
    cfg = stage2(ws, tmp, MODEL__MASKD__LOSS_WEIGHT="-1.0")
    refused(train_cfg(ws, tmp, cfg), "MODEL.MASKD.LOSS_WEIGHT", "-1.0")


@case
def negative_dice_weight(ws, tmp):
    cfg = tiny_training(stage1_cfg(ws["teacher"]), tmp / "out")
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = ("bad_inputs_train",), ("bad_inputs_val",)
    cfg.MODEL.MASKD.DICE_WEIGHT = -0.5
    refused(train_cfg(ws, tmp, cfg), "MODEL.MASKD.DICE_WEIGHT", "-0.5")


@case
def negative_head_kd_weight(ws, tmp):
    cfg = stage2(ws, tmp, MODEL__MASKD__ROI_REG_KD__WEIGHT="-2.0")
    refused(train_cfg(ws, tmp, cfg), "MODEL.MASKD.ROI_REG_KD.WEIGHT", "-2.0")


@case
def nan_head_kd_weight(ws, tmp):
    """`.nan` in the YAML: `nan > 0` is False, so the term was switched off without a word."""
    cfg = stage2(ws, tmp)
    cfg.MODEL.MASKD.ROI_REG_KD.WEIGHT = float("nan")
    refused(train_cfg(ws, tmp, cfg), "MODEL.MASKD.ROI_REG_KD.WEIGHT", "finite", "nan")


@case
def nan_area_weight(ws, tmp):
    cfg = tiny_training(stage1_cfg(ws["teacher"]), tmp / "out")
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = ("bad_inputs_train",), ("bad_inputs_val",)
    cfg.MODEL.MASKD.AREA_WEIGHT = float("nan")
    refused(train_cfg(ws, tmp, cfg), "MODEL.MASKD.AREA_WEIGHT", "finite", "nan")


@case
def inf_loss_weight(ws, tmp):
    cfg = stage2(ws, tmp)
    cfg.MODEL.MASKD.LOSS_WEIGHT = float("inf")
    refused(train_cfg(ws, tmp, cfg), "MODEL.MASKD.LOSS_WEIGHT", "finite", "inf")


@case
def inf_base_lr(ws, tmp):
    cfg = stage2(ws, tmp)
    cfg.SOLVER.BASE_LR = float("inf")
    refused(train_cfg(ws, tmp, cfg), "SOLVER.BASE_LR", "inf")


# --- tokens and their teacher ----------------------------------------------------------------


@case
def tokens_of_another_teacher(ws, tmp):
    cfg = stage2(ws, tmp, MODEL__MASKD__TEACHER__WEIGHTS=ws["other"][1])
    ours = fingerprint(build_teacher(ws["other"][0], weights=ws["other"][1]).state_dict())
    theirs = fingerprint_text(torch.load(ws["tokens"], weights_only=True)["model"][FINGERPRINT_KEY])
    call = train_cfg(ws, tmp, cfg)
    refused(call, "tokens_a.pth", "were learned for another teacher", ours[:16], theirs[:16])
    # the explicit override, for experiments: this teacher's fingerprint is the model's
    cfg.MODEL.MASKD.ALLOW_TOKENS_OF_OTHER_TEACHER = True
    assert fingerprint_text(getattr(build_model(cfg), FINGERPRINT_KEY)) == ours


@case
def tokens_of_the_teacher_with_other_preprocessing(ws, tmp):
    cfg = stage2(ws, tmp)
    cfg.MODEL.MASKD.TEACHER.OPTS = ["MODEL.PIXEL_MEAN", "[100.0, 110.0, 120.0]"]
    refused(train_cfg(ws, tmp, cfg), "tokens_a.pth", "preprocessing and backbone settings")


@case
def tokens_of_the_teacher_with_another_pixel_std(ws, tmp):
    cfg = stage2(ws, tmp)
    cfg.MODEL.MASKD.TEACHER.OPTS = ["MODEL.PIXEL_STD", "[57.0, 57.0, 57.0]"]
    refused(train_cfg(ws, tmp, cfg), "tokens_a.pth", "preprocessing and backbone settings")


@case
def tokens_of_the_teacher_with_another_fpn_fuse_type(ws, tmp):
    cfg = stage2(ws, tmp)
    cfg.MODEL.MASKD.TEACHER.OPTS = ["MODEL.FPN.FUSE_TYPE", "avg"]
    refused(train_cfg(ws, tmp, cfg), "tokens_a.pth", "preprocessing and backbone settings")


def _laundered(ws, tmp):
    """A stage-2 checkpoint of teacher B that used teacher A's tokens (allowed once)."""
    cfg = maskd_cfg("MasKD", "rcnn", *ws["other"], ws["tokens"])
    cfg.MODEL.MASKD.ALLOW_TOKENS_OF_OTHER_TEACHER = True
    MasKDCheckpointer(build_model(cfg), save_dir=str(tmp)).save("laundered")
    return str(tmp / "laundered.pth")


@case
def stage2_checkpoint_laundering_tokens_to_another_teacher(ws, tmp):
    laundered = _laundered(ws, tmp)
    cfg = stage2(ws, tmp, MODEL__MASKD__TEACHER__WEIGHTS=ws["other"][1])
    cfg.MODEL.MASKD.TOKENS_WEIGHTS = laundered
    refused(train_cfg(ws, tmp, cfg), "laundered.pth", "were learned for another teacher")


@case
def tokens_export_of_a_laundering_stage2_checkpoint(ws, tmp):
    laundered = _laundered(ws, tmp)
    _tool("export").main(["tokens", "--checkpoint", laundered, "--output", str(tmp / "t.pth")])
    cfg = stage2(ws, tmp, MODEL__MASKD__TEACHER__WEIGHTS=ws["other"][1])
    cfg.MODEL.MASKD.TOKENS_WEIGHTS = str(tmp / "t.pth")
    refused(train_cfg(ws, tmp, cfg), "t.pth", "were learned for another teacher")


@case
def model_weights_with_other_tokens_than_configured(ws, tmp):
    cfg = stage2(ws, tmp, MODEL__WEIGHTS=ws["stage2"])
    refused(train_cfg(ws, tmp, cfg), "MODEL.WEIGHTS", "not the configured ones", "tokens_a.pth")


@case
def checkpoint_with_tokens_of_another_teacher_into_untrained_tokens(ws, tmp):
    laundered = _laundered(ws, tmp)
    cfg = stage2(ws, tmp, MODEL__MASKD__TEACHER__WEIGHTS=ws["other"][1], MODEL__WEIGHTS=laundered)
    cfg.MODEL.MASKD.TOKENS_WEIGHTS = ""
    cfg.MODEL.MASKD.ALLOW_RANDOM_TOKENS = True
    refused(train_cfg(ws, tmp, cfg), "laundered.pth", "were learned for another teacher")


@case
def resume_from_a_checkpoint_with_other_tokens(ws, tmp):
    cfg = stage2(ws, tmp)
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    with (
        open(ws["stage2"], "rb") as f,
        open(os.path.join(cfg.OUTPUT_DIR, "model_x.pth"), "wb") as g,
    ):
        g.write(f.read())
    with open(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint"), "w") as f:
        f.write("model_x.pth")
    refused(train_cfg(ws, tmp, cfg, "--resume"), "not the configured ones", "tokens_a.pth")


@case
def stage1_checkpoint_with_a_swapped_teacher_as_tokens(ws, tmp):
    ckpt = torch.load(ws["tokens"], weights_only=True)
    other = torch.load(ws["other"][1], weights_only=True)["model"]
    for k, v in other.items():
        if f"teacher.{k}" in ckpt["model"]:
            ckpt["model"][f"teacher.{k}"] = v
    torch.save(ckpt, tmp / "swapped.pth")
    cfg = stage2(ws, tmp, MODEL__MASKD__TOKENS_WEIGHTS=str(tmp / "swapped.pth"))
    refused(train_cfg(ws, tmp, cfg), "MODEL.MASKD.TOKENS_WEIGHTS", "swapped.pth", "altered")


@case
def tokens_file_missing_weight_head_keys(ws, tmp):
    ckpt = torch.load(ws["tokens"], weights_only=True)
    key = "teacher.backbone.tokens.p3.weight_head.2.weight"
    del ckpt["model"][key]
    torch.save(ckpt, tmp / "nohead.pth")
    cfg = stage2(ws, tmp, MODEL__MASKD__TOKENS_WEIGHTS=str(tmp / "nohead.pth"))
    refused(train_cfg(ws, tmp, cfg), "nohead.pth", "p3.weight_head.2.weight missing from the file")


@case
def tokens_file_with_another_number_of_tokens(ws, tmp):
    cfg = stage2(ws, tmp, MODEL__MASKD__NUM_TOKENS="6")
    refused(train_cfg(ws, tmp, cfg), "MODEL.MASKD.TOKENS_WEIGHTS", "has 4 tokens", "6 were asked")


@case
def teacher_checkpoint_given_as_tokens(ws, tmp):
    cfg = stage2(ws, tmp, MODEL__MASKD__TOKENS_WEIGHTS=ws["teacher"][1])
    refused(train_cfg(ws, tmp, cfg), "MODEL.MASKD.TOKENS_WEIGHTS", "holds no receptive tokens")


@case
def stage1_checkpoint_evaluated_with_a_stage2_config(ws, tmp):
    call = train_cfg(ws, tmp, stage2(ws, tmp), "--eval-only", "MODEL.WEIGHTS", ws["tokens"])
    refused(
        call, "MODEL.WEIGHTS", "tokens_a.pth", "stage 1 (MasKDTokenLearner) checkpoint", "stage 2"
    )


@case
def plain_teacher_checkpoint_evaluated_with_a_stage1_config(ws, tmp):
    """A stage-1 model loads nothing from a non-MasKD checkpoint: it evaluated its random init."""
    cfg = tiny_training(stage1_cfg(ws["teacher"]), tmp / "out")
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = ("bad_inputs_train",), ("bad_inputs_val",)
    call = train_cfg(ws, tmp, cfg, "--eval-only", "MODEL.WEIGHTS", ws["teacher"][1])
    refused(call, "MODEL.WEIGHTS", "is not a MasKD checkpoint", "stage-1 checkpoints")


@case
def plain_teacher_checkpoint_in_visualize_masks_with_a_stage1_config(ws, tmp):
    config = write(stage1_cfg(ws["teacher"]), tmp / "s1.yaml")
    argv = ["--config-file", config, "--checkpoint", ws["teacher"][1], "--output", str(tmp / "png")]
    argv += ["--dataset", "bad_inputs_train", *ws["register"]]
    refused(lambda: _tool("visualize_masks").main(argv), "teacher_a.pth", "not a MasKD checkpoint")
    assert not (tmp / "png").exists() or not os.listdir(tmp / "png")


# --- folders held by a live run --------------------------------------------------------------


@case
def second_training_on_the_output_dir_of_a_live_run(ws, tmp):
    """The live run is this process holding the folder (as a training's launcher does)."""
    from maskd.utils.files import FolderHeldError, hold_folder

    cfg = stage2(ws, tmp)
    with hold_folder(cfg.OUTPUT_DIR, "OUTPUT_DIR"):
        before = sorted(os.listdir(cfg.OUTPUT_DIR))
        refused(
            train_cfg(ws, tmp, cfg),
            "OUTPUT_DIR",
            cfg.OUTPUT_DIR,
            "held by a live run",
            f"pid {os.getpid()}",
            exc=FolderHeldError,
        )
        assert sorted(os.listdir(cfg.OUTPUT_DIR)) == before  # nothing written
    train_cfg(ws, tmp, cfg, "--eval-only", "MODEL.WEIGHTS", ws["stage2"])()  # evaluation: runs


@case
def pipeline_on_the_output_of_a_live_pipeline(ws, tmp):
    import distill_net
    from maskd.utils.files import FolderHeldError, hold_folder

    student = write(stage2(ws, tmp), tmp / "s2.yaml")
    argv = ["--tokens-weights", ws["tokens"], "--student-config", student]
    with hold_folder(str(tmp / "pipe"), "--output"):
        refused(
            lambda: distill_net.main(argv + ["--output", str(tmp / "pipe")]),
            "--output",
            "pipe",
            "held by a live run",
            exc=FolderHeldError,
        )


# --- datasets --------------------------------------------------------------------------------


def _dataset(tmp, name, edit=None):
    json_file, images = write_coco_dataset(str(tmp / name), n_images=2, seed=3)
    if edit is not None:
        with open(json_file) as f:
            data = json.load(f)
        edit(data, images)
        with open(json_file, "w") as f:
            json.dump(data, f)
    return ["--register-coco", name, json_file, images], json_file


def _train_on(ws, tmp, name, register):
    cfg = stage2(ws, tmp)
    cfg.DATASETS.TRAIN = (name,)
    return train_cfg(ws, tmp, cfg, *register)


@case
def dataset_json_malformed(ws, tmp):
    register, json_file = _dataset(tmp, "bi_malformed")
    with open(json_file, "w") as f:
        f.write('{"images": [')
    refused(_train_on(ws, tmp, "bi_malformed", register), "annotations.json", "not valid JSON")


@case
def dataset_json_not_coco(ws, tmp):
    register, json_file = _dataset(tmp, "bi_notcoco")
    with open(json_file, "w") as f:
        json.dump({"pictures": []}, f)
    refused(_train_on(ws, tmp, "bi_notcoco", register), "annotations.json", "bi_notcoco")


@case
def dataset_box_of_negative_size(ws, tmp):
    def edit(data, images):
        data["annotations"][0]["bbox"][2] = -10

    register, _ = _dataset(tmp, "bi_negative", edit)
    refused(_train_on(ws, tmp, "bi_negative", register), "negative width or height", "0000.png")


@case
def dataset_box_with_a_nan(ws, tmp):
    def edit(data, images):
        data["annotations"][0]["bbox"][1] = float("nan")  # json writes NaN, and reads it

    register, _ = _dataset(tmp, "bi_nan_box", edit)
    refused(_train_on(ws, tmp, "bi_nan_box", register), "is not 4 finite numbers", "0000.png")


@case
def dataset_image_missing(ws, tmp):
    register, _ = _dataset(tmp, "bi_missing", lambda d, im: os.remove(os.path.join(im, "0001.png")))
    refused(_train_on(ws, tmp, "bi_missing", register), "image missing", "0001.png")


@case
def dataset_image_empty(ws, tmp):
    register, _ = _dataset(
        tmp, "bi_empty", lambda d, im: open(os.path.join(im, "0000.png"), "w").close()
    )
    refused(_train_on(ws, tmp, "bi_empty", register), "image empty", "0000.png")


@case
def dataset_with_duplicate_image_ids(ws, tmp):
    """Two images with id 1: pycocotools kept one and put the other's boxes on it."""

    def edit(data, images):
        data["images"][1]["id"] = data["images"][0]["id"]

    register, _ = _dataset(tmp, "bi_dup_ids", edit)
    refused(_train_on(ws, tmp, "bi_dup_ids", register), "annotations.json", "the same id ([1])")


@case
def dataset_json_nested_100000_deep(ws, tmp):
    """Python's JSON parser raised a raw RecursionError."""
    register, json_file = _dataset(tmp, "bi_deep_json")
    with open(json_file, "w") as f:
        f.write('{"images": ' + "[" * 100_000 + "]" * 100_000 + "}")
    refused(_train_on(ws, tmp, "bi_deep_json", register), "annotations.json", "nests its JSON")


@case
def dataset_annotation_of_an_image_not_in_the_file(ws, tmp):
    """An annotation whose image_id matches no image: detectron2 dropped it without a word."""

    def edit(data, images):
        data["annotations"][0]["image_id"] = 999

    register, _ = _dataset(tmp, "bi_orphan", edit)
    refused(_train_on(ws, tmp, "bi_orphan", register), "images the file does not have", "999")


@case
def dataset_image_id_that_is_a_list(ws, tmp):
    def edit(data, images):
        data["images"][0]["id"] = [1]

    register, _ = _dataset(tmp, "bi_list_id", edit)
    refused(_train_on(ws, tmp, "bi_list_id", register), "an image's id is [1]")


@case
def dataset_with_duplicate_annotation_ids(ws, tmp):
    """Two annotations with id 1: pycocotools kept one of them."""

    def edit(data, images):
        data["annotations"][1]["id"] = data["annotations"][0]["id"]

    register, _ = _dataset(tmp, "bi_dup_ann", edit)
    refused(_train_on(ws, tmp, "bi_dup_ann", register), "annotations with the same id ([1])")


@case
def dataset_with_a_malformed_polygon(ws, tmp):
    """A polygon of one and a half points: detectron2 dropped the whole object, box too, with a
    log warning only, even in a box-only training."""

    def edit(data, images):
        data["annotations"][0]["segmentation"] = [[1, 2, 3]]

    register, _ = _dataset(tmp, "bi_polygon", edit)
    refused(
        _train_on(ws, tmp, "bi_polygon", register), "not lists of at least three", "annotation 1"
    )


@case
def dataset_boxes_outside_their_images(ws, tmp):
    """Coordinates x10 (a unit mistake): detectron2 dropped every box and trained on
    background only."""

    def edit(data, images):
        for ann in data["annotations"]:
            ann["bbox"] = [v * 10 for v in ann["bbox"]]

    register, _ = _dataset(tmp, "bi_outside", edit)
    refused(_train_on(ws, tmp, "bi_outside", register), "lies outside the 64x64 image")


@case
def dataset_box_at_1e30(ws, tmp):
    def edit(data, images):
        data["annotations"][0]["bbox"][0] = 1e30

    register, _ = _dataset(tmp, "bi_far_box", edit)
    refused(_train_on(ws, tmp, "bi_far_box", register), "lies outside", "0000.png")


@case
def dataset_image_not_an_image(ws, tmp):
    """A PNG of garbage bytes: detectron2 failed when it first sampled it, mid-training."""

    def edit(data, images):
        with open(os.path.join(images, "0001.png"), "wb") as f:
            f.write(b"\x89PNG\r\n\x1a\n" + os.urandom(200))

    register, _ = _dataset(tmp, "bi_corrupt", edit)
    refused(_train_on(ws, tmp, "bi_corrupt", register), "0001.png", "cannot be read")


@case
def dataset_image_of_another_size_than_the_json(ws, tmp):
    def edit(data, images):
        data["images"][0]["width"] = 80

    register, _ = _dataset(tmp, "bi_size", edit)
    refused(_train_on(ws, tmp, "bi_size", register), "0000.png", "is 64x64", "says 80x64")


@case
def dataset_image_decompression_bomb(ws, tmp):
    """A 60 KB PNG whose header declares 20000 x 20000 pixels (PIL's limit: 89 M)."""
    import zlib

    def chunk(kind, data):
        crc = zlib.crc32(kind + data).to_bytes(4, "big")
        return len(data).to_bytes(4, "big") + kind + data + crc

    side = 20000
    header = side.to_bytes(4, "big") * 2 + bytes([1, 0, 0, 0, 0])  # 1-bit grey
    rows = zlib.compress(b"\x00" * ((side // 8 + 1) * side), 9)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows)
    png += chunk(b"IEND", b"")

    def edit(data, images):
        with open(os.path.join(images, "0001.png"), "wb") as f:
            f.write(png)
        data["images"][1]["width"] = data["images"][1]["height"] = side

    register, _ = _dataset(tmp, "bi_bomb", edit)
    refused(_train_on(ws, tmp, "bi_bomb", register), "0001.png", "decompression-bomb limit")


@case
def dataset_annotation_file_missing(ws, tmp):
    register = ["--register-coco", "bi_nojson", str(tmp / "none.json"), str(tmp)]
    refused(_train_on(ws, tmp, "bi_nojson", register), "bi_nojson", "none.json")


@case
def dataset_not_registered(ws, tmp):
    cfg = stage2(ws, tmp)
    cfg.DATASETS.TRAIN = ("my_data",)
    refused(train_cfg(ws, tmp, cfg), "my_data", "not registered", "bad_inputs_train")
    assert not os.path.exists(os.path.join(cfg.OUTPUT_DIR, "model_final.pth"))


@case
def stage1_teacher_with_other_classes_than_the_data(ws, tmp):
    teacher = write_teacher(tmp, "rcnn", opts=["MODEL.ROI_HEADS.NUM_CLASSES", "5"])[:2]
    cfg = tiny_training(stage1_cfg(teacher), tmp / "out")
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = ("bad_inputs_train",), ("bad_inputs_val",)
    refused(train_cfg(ws, tmp, cfg), "teacher", "predicts 5 classes", "'bad_inputs_train' has 3")
    assert not os.path.exists(os.path.join(cfg.OUTPUT_DIR, "model_final.pth"))


@case
def stage2_student_with_other_classes_than_the_data(ws, tmp):
    cfg = stage2(ws, tmp, MODEL__ROI_HEADS__NUM_CLASSES="5")
    refused(train_cfg(ws, tmp, cfg), "student predicts 5 classes", "'bad_inputs_train' has 3")


@case
def roi_kd_teacher_with_other_classes_than_the_student(ws, tmp):
    teacher = write_teacher(tmp, "rcnn", opts=["MODEL.ROI_HEADS.NUM_CLASSES", "5"])[:2]
    cfg = stage2(ws, tmp, MODEL__MASKD__ROI_REG_KD__WEIGHT="1.0")
    cfg.MODEL.MASKD.TEACHER.CONFIG_FILE, cfg.MODEL.MASKD.TEACHER.WEIGHTS = teacher
    cfg.MODEL.MASKD.TOKENS_WEIGHTS, cfg.MODEL.MASKD.ALLOW_RANDOM_TOKENS = "", True
    refused(train_cfg(ws, tmp, cfg), "ROI_REG_KD", "student has 3 classes", "teacher 5")


@case
def eval_only_with_other_classes_than_the_data(ws, tmp):
    cfg = stage2(ws, tmp, MODEL__ROI_HEADS__NUM_CLASSES="5")
    call = train_cfg(ws, tmp, cfg, "--eval-only", "MODEL.WEIGHTS", ws["stage2"])
    refused(call, "predicts 5 classes", "bad_inputs_val", "has 3")
    assert not os.path.exists(os.path.join(cfg.OUTPUT_DIR, "results.json"))


# --- exports ---------------------------------------------------------------------------------


def _export_student(ws, tmp, cfg, output, *extra):
    config = write(cfg, tmp / "stage2.yaml")
    argv = ["student", "--config-file", config, "--checkpoint", ws["stage2"]]
    return lambda: _tool("export").main(argv + ["--output", str(output), *extra])


@case
def student_export_with_a_config_of_another_student(ws, tmp):
    cfg = stage2(ws, tmp)
    call = _export_student(ws, tmp, cfg, tmp / "student.pth", "MODEL.FPN.OUT_CHANNELS", "24")
    refused(call, "does not describe the student", "stage2_tokens_a2.pth", "fpn")
    assert not (tmp / "student.pth").exists() and not (tmp / "student.yaml").exists()


@case
def student_export_over_its_own_config_with_force(ws, tmp):
    cfg = stage2(ws, tmp)
    before = cfg.dump()
    call = _export_student(ws, tmp, cfg, tmp / "stage2.pth", "--force")
    refused(call, "stage2.yaml", "the config file it reads")
    assert (tmp / "stage2.yaml").read_text() == before


@case
def student_export_over_a_base_of_its_config_with_force(ws, tmp):
    """``--output base.pth --force`` where ``base.yaml`` is the _BASE_ of the config read."""
    before = write(stage2(ws, tmp), tmp / "base.yaml") and (tmp / "base.yaml").read_text()
    (tmp / "c.yaml").write_text('_BASE_: "base.yaml"\n')
    argv = ["student", "--config-file", str(tmp / "c.yaml"), "--checkpoint", ws["stage2"]]
    call = lambda: _tool("export").main(argv + ["--output", str(tmp / "base.pth"), "--force"])
    refused(call, "base.yaml", "the config's _BASE_ it reads")
    assert (tmp / "base.yaml").read_text() == before and not (tmp / "base.pth").exists()


def _stage2_checkpoint_with_pixel_mean(ws, tmp, mean):
    cfg = stage2(ws, tmp, MODEL__PIXEL_MEAN=mean)
    MasKDCheckpointer(build_model(cfg), save_dir=str(tmp)).save("s2_mean")
    return str(tmp / "s2_mean.pth")


@case
def student_export_without_the_trainings_preprocessing(ws, tmp):
    """The student trained with a PIXEL_MEAN override, exported with the config alone: the
    release config would normalise images otherwise than the weights were trained for."""
    checkpoint = _stage2_checkpoint_with_pixel_mean(ws, tmp, "[10.0, 20.0, 30.0]")
    config = write(stage2(ws, tmp), tmp / "stage2.yaml")
    argv = ["student", "--config-file", config, "--checkpoint", checkpoint]
    call = lambda: _tool("export").main(argv + ["--output", str(tmp / "student.pth")])
    refused(call, "s2_mean.pth", "MODEL.PIXEL_MEAN [10.0, 20.0, 30.0]")
    assert not (tmp / "student.pth").exists() and not (tmp / "student.yaml").exists()


@case
def resume_with_other_preprocessing(ws, tmp):
    cfg = stage2(ws, tmp, MODEL__PIXEL_MEAN="[10.0, 20.0, 30.0]")
    MasKDCheckpointer(build_model(cfg), save_dir=cfg.OUTPUT_DIR).save("model_0000003")
    refused(train_cfg(ws, tmp, stage2(ws, tmp), "--resume"), "--resume", "MODEL.PIXEL_MEAN")


@case
def untrained_tokens_export_as_tokens_weights(ws, tmp):
    """Tokens exported from a random-token run (ALLOW_RANDOM_TOKENS): learned for no teacher."""
    cfg = stage2(ws, tmp, MODEL__MASKD__ALLOW_RANDOM_TOKENS="True")
    cfg.MODEL.MASKD.TOKENS_WEIGHTS = ""
    MasKDCheckpointer(build_model(cfg), save_dir=str(tmp)).save("random_run")
    argv = ["tokens", "--checkpoint", str(tmp / "random_run.pth"), "--output", str(tmp / "t.pth")]
    _tool("export").main(argv)
    for teacher in (ws["teacher"][1], ws["other"][1]):
        cfg = stage2(ws, tmp, MODEL__MASKD__TOKENS_WEIGHTS=str(tmp / "t.pth"))
        cfg.MODEL.MASKD.TEACHER.WEIGHTS = teacher
        refused(train_cfg(ws, tmp, cfg), "t.pth", "are untrained")


@case
def student_export_over_an_existing_release_config(ws, tmp):
    (tmp / "release.yaml").write_text("# a release config of another run\n")
    call = _export_student(ws, tmp, stage2(ws, tmp), tmp / "release.pth")
    refused(call, "release.yaml", "exists; pass --force")
    assert (tmp / "release.yaml").read_text() == "# a release config of another run\n"
    assert not (tmp / "release.pth").exists()


@case
def export_over_its_own_checkpoint_with_force(ws, tmp):
    data = open(ws["tokens"], "rb").read()
    (tmp / "s1.pth").write_bytes(data)
    argv = ["tokens", "--checkpoint", str(tmp / "s1.pth"), "--output", str(tmp / "s1.pth")]
    refused(lambda: _tool("export").main(argv + ["--force"]), "s1.pth", "the checkpoint it reads")
    assert (tmp / "s1.pth").read_bytes() == data


@case
def student_export_of_a_stage1_checkpoint(ws, tmp):
    argv = ["student", "--checkpoint", ws["tokens"], "--output", str(tmp / "s.pth")]
    refused(lambda: _tool("export").main(argv), "tokens_a.pth", "holds no student weights")


@case
def tokens_export_of_a_plain_checkpoint(ws, tmp):
    argv = ["tokens", "--checkpoint", ws["teacher"][1], "--output", str(tmp / "t.pth")]
    refused(lambda: _tool("export").main(argv), "teacher_a.pth", "holds no receptive tokens")


# --- the pipeline ----------------------------------------------------------------------------


@case
def pipeline_config_changed_after_a_finished_stage(ws, tmp):
    import distill_net
    from maskd.engine import pipeline as stages

    s1 = tiny_training(stage1_cfg(ws["teacher"]), tmp / "unused")
    tokens_config, student_config = write(s1, tmp / "s1.yaml"), write(
        stage2(ws, tmp), tmp / "s2.yaml"
    )
    argv = ["--tokens-config", tokens_config, "--student-config", student_config]
    argv += ["--output", str(tmp / "pipe"), "--stages", "tokens"]
    original = stages.subprocess.run
    stages.subprocess.run = lambda cmd, check: subprocess.CompletedProcess(cmd, 0)
    try:
        distill_net.main(argv)  # "runs" stage 1 and marks it finished
        s1.SOLVER.BASE_LR = 0.5
        write(s1, tmp / "s1.yaml")  # same command, other contents
        refused(lambda: distill_net.main(argv), "s1.yaml", "changed since", "--restart tokens")
    finally:
        stages.subprocess.run = original


def _pipeline_without_training(fn):
    """Run ``fn`` with the stage commands recorded as successes instead of run."""
    from maskd.engine import pipeline as stages

    original = stages.subprocess.run
    stages.subprocess.run = lambda cmd, check: subprocess.CompletedProcess(cmd, 0)
    try:
        fn()
    finally:
        stages.subprocess.run = original


@case
def pipeline_dataset_changed_after_a_finished_stage(ws, tmp):
    """The same dataset name registered with other annotations: the finished stage was kept."""
    import distill_net

    s1 = tiny_training(stage1_cfg(ws["teacher"]), tmp / "unused")
    argv = ["--tokens-config", write(s1, tmp / "s1.yaml"), "--student-config"]
    argv += [write(stage2(ws, tmp), tmp / "s2.yaml"), "--output", str(tmp / "pipe")]
    argv += ["--stages", "tokens"]
    json_file, images = write_coco_dataset(str(tmp / "data"), n_images=2, seed=0)
    register = ["--register-coco", "bi_pipe_train", json_file, images]

    def check():
        distill_net.main(argv + register)  # "runs" stage 1 and marks it finished
        other, _ = write_coco_dataset(str(tmp / "other"), n_images=3, seed=1)
        refused(
            lambda: distill_net.main(argv + ["--register-coco", "bi_pipe_train", other, images]),
            "tokens",
            "other datasets (--register-coco)",
            "--restart tokens",
        )
        write_coco_dataset(str(tmp / "data"), n_images=3, seed=2)  # same file, other contents
        refused(lambda: distill_net.main(argv + register), "annotations.json", "changed since")

    _pipeline_without_training(check)


@case
def pipeline_resumed_under_a_changed_command(ws, tmp):
    """A killed stage (a checkpoint, no marker) run again with another loss weight: it resumed
    with the new one and recorded only that."""
    import distill_net

    student = write(stage2(ws, tmp), tmp / "s2.yaml")
    argv = ["--tokens-weights", ws["tokens"], "--student-config", student]
    argv += ["--output", str(tmp / "pipe"), "--stages", "student"]

    def killed(cmd, check):
        with open(tmp / "pipe" / "student" / "last_checkpoint", "w") as f:
            f.write("model_0000003.pth")
        raise subprocess.CalledProcessError(-9, cmd)

    from maskd.engine import pipeline as stages

    original = stages.subprocess.run
    stages.subprocess.run = killed
    try:
        with pytest.raises(subprocess.CalledProcessError):
            distill_net.main(argv + ["--student-opts", "MODEL.MASKD.LOSS_WEIGHT 1.0"])
    finally:
        stages.subprocess.run = original
    changed = argv + ["--student-opts", "MODEL.MASKD.LOSS_WEIGHT 2.0"]
    _pipeline_without_training(
        lambda: refused(
            lambda: distill_net.main(changed),
            "student",
            "was started with other arguments",
            "LOSS_WEIGHT 1.0",
            "--restart student",
        )
    )


@case
def pipeline_stage_marker_empty(ws, tmp):
    import distill_net

    student = write(stage2(ws, tmp), tmp / "s2.yaml")
    os.makedirs(tmp / "pipe" / "student")
    (tmp / "pipe" / "student" / "stage.json").write_text("")
    argv = ["--tokens-weights", ws["tokens"], "--student-config", student]
    argv += ["--output", str(tmp / "pipe"), "--stages", "student"]
    refused(lambda: distill_net.main(argv), "stage.json", "is not the marker of a finished stage")


@case
def checkpoint_path_with_the_matching_heuristics_query(ws, tmp):
    """Accepted: ``?matching_heuristics=True`` after a local path, as read_checkpoint documents."""
    from maskd.checkpoint import read_checkpoint

    data = read_checkpoint(ws["teacher"][1] + "?matching_heuristics=True", what="MODEL.WEIGHTS")
    assert data["matching_heuristics"] is True and data["model"]


# --- the runner ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input(ws, tmp_path, name):
    CASES[name](ws, tmp_path)


def test_the_docs_list_every_case_with_its_outcome():
    with open(os.path.join(ROOT, "docs", "reliability.md")) as f:
        text = f.read()
    rows = re.findall(r"^\| `([a-z0-9_]+)` \|", text, re.M)
    assert sorted(rows) == sorted(CASES), set(rows) ^ set(CASES)
    assert f"\n{len(CASES)} cases." in text


def test_image_headers_are_read_once_per_run_and_again_after_an_edit(tmp_path, monkeypatch):
    """The checked loader reads every image header on a run's first load; later loads in the
    process (evaluations) and the workers it starts (the environment carries the mark) only
    parse the annotation file, until that file or the image folder changes."""
    import PIL.Image

    from maskd.data import datasets

    monkeypatch.delenv(datasets.CHECKED_IMAGES_ENV, raising=False)
    json_file, images = write_coco_dataset(str(tmp_path / "data"), n_images=3)
    opened = []
    real_open = PIL.Image.open

    def counted_open(path, *args, **kwargs):
        opened.append(path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(PIL.Image, "open", counted_open)

    def load():
        opened.clear()
        return datasets.load_checked_coco_json(json_file, images, "once")

    assert len(load()) == 3 and len(opened) == 3
    assert len(load()) == 3 and opened == []  # checked: the headers are not read again
    # a worker started now inherits the mark
    worker = subprocess.run(
        [sys.executable, "-c", f"import os; print(os.environ['{datasets.CHECKED_IMAGES_ENV}'])"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(worker.stdout) == json.loads(os.environ[datasets.CHECKED_IMAGES_ENV])
    # an image removed: the folder changed, the check runs again and names it
    os.remove(os.path.join(images, "0001.png"))
    with pytest.raises(ValueError, match="image missing: .*0001.png"):
        load()
    # an edited annotation file (the image put back) is checked again, and passes
    write_coco_dataset(str(tmp_path / "data"), n_images=3)
    assert len(load()) == 3 and len(opened) == 3
    # a box outside its stated image is refused on every load, checked images or not
    data = json.loads(open(json_file).read())
    data["annotations"][0]["bbox"] = [-50, 10, 20, 20]
    with open(json_file, "w") as f:
        json.dump(data, f)
    for _ in range(2):
        with pytest.raises(ValueError, match="lies outside the 64x64 image"):
            load()


def test_a_multi_process_run_checks_the_image_headers_before_it_launches(ws, tmp_path, monkeypatch):
    """``train_net.py --num-gpus 2`` checks the datasets of --register-coco in the launching
    process (one read of every header), so that each worker only parses the annotation files."""
    import maskd.cli.train as train

    seen = {}

    def fake_launch(main, num_gpus, **kwargs):
        seen["checked"] = dict(os.environ).get("MASKD_CHECKED_IMAGES", "[]")
        seen["gpus"] = num_gpus

    monkeypatch.delenv("MASKD_CHECKED_IMAGES", raising=False)
    monkeypatch.setattr(train, "launch", fake_launch)
    config = write(stage2(ws, tmp_path), tmp_path / "config.yaml")
    train.cli(["--config-file", config, "--num-gpus", "2", "--eval-only", *ws["register"]])
    checked = [json.loads(key)[0] for key in json.loads(seen["checked"])]
    assert seen["gpus"] == 2 and os.path.realpath(ws["dataset"][0]) in checked
