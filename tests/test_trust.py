"""Trust and provenance, in the library: no code runs from a weights file (the guarded
unpickler, its fuzz included), tokens stay bound to their teacher, checkpoints of the wrong stage
or pair are refused, a teacher of the other channel order gets its own. The same refusals as a
user meets them on the command lines are cases of test_bad_inputs.py; how files are written is
in test_reliability.py."""

import collections
import fractions
import os
import pickle
import struct

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model
from tiny import (
    ROOT,
    maskd_cfg,
    run,
    tiny_batch,
    tiny_training,
    write_teacher,
)

from maskd.checkpoint import MasKDCheckpointer, load_weights_strict, read_checkpoint
from maskd.checkpoint.export import export_tokens
from maskd.checkpoint.provenance import FINGERPRINT_KEY, fingerprint, fingerprint_text
from maskd.checkpoint.safe_pickle import UNSAFE_PICKLE_ENV, UnsafePickleError, load_pkl
from maskd.engine import check_input_format
from maskd.modeling.teacher import build_teacher
from maskd.utils.visualize import receptive_masks

EXPORT = os.path.join(ROOT, "tools", "export.py")


class _CreatesAFile:
    """Unpickling this calls open(path, "w"): the file exists afterwards if the code ran."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _evil_pkl(folder, name="evil.pkl"):
    marker = os.path.join(folder, f"{name}.ran")
    path = os.path.join(folder, name)
    with open(path, "wb") as f:
        pickle.dump({"model": {"w": _CreatesAFile(marker)}, "__author__": "x"}, f)
    return path, marker


# the names that the datasets fixture (conftest.py) gives this module's datasets
DATASETS = ("trust_train", "trust_val")


@pytest.fixture(scope="module")
def ws(datasets, teachers):
    return {
        "tmp": datasets.tmp,
        "register": datasets.register,
        "teacher": teachers.teacher,
        "other": teachers.other,
        "tokens": teachers.tokens,
    }


def _write(ws, cfg, name):
    path = ws["tmp"] / name
    path.write_text(cfg.dump())
    return name


def _train_net_error(ws, config_file, *extra):
    """The message of the error that train_net.py (its cli, in this process) stops with. The
    datasets are registered in this process already (by the fixture, or by another test module
    with the same generated content)."""
    import train_net

    with pytest.raises(Exception) as info:
        train_net.cli(["--config-file", str(ws["tmp"] / config_file), *extra])
    return str(info.value)


# --- no code from weights files -------------------------------------------------------------


def test_a_pickle_that_would_run_code_is_refused_before_it_runs(tmp_path):
    path, marker = _evil_pkl(str(tmp_path))
    with pytest.raises(UnsafePickleError, match=r"evil\.pkl.*io\.open"):
        load_pkl(path)
    assert not os.path.exists(marker)
    with pytest.raises(UnsafePickleError, match=r"MODEL\.MASKD\.TEACHER\.WEIGHTS: .*io\.open"):
        read_checkpoint(path, what="MODEL.MASKD.TEACHER.WEIGHTS")
    assert not os.path.exists(marker)


def test_model_zoo_pickles_still_load(tmp_path):
    state = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.float64(2.5)}
    with open(tmp_path / "d2.pkl", "wb") as f:
        pickle.dump({"model": state, "__author__": "Detectron2 Model Zoo"}, f)
    with open(tmp_path / "caffe2.pkl", "wb") as f:
        pickle.dump({"blobs": {"conv1_w": np.ones(3), "conv1_w_momentum": np.ones(3)}}, f)
    d2 = read_checkpoint(str(tmp_path / "d2.pkl"))
    assert np.array_equal(d2["model"]["a"], state["a"]) and d2["model"]["b"] == 2.5
    c2 = read_checkpoint(str(tmp_path / "caffe2.pkl"))
    assert list(c2["model"]) == ["conv1_w"] and c2["matching_heuristics"]


def test_arbitrary_pickles_only_with_the_opt_in(tmp_path, monkeypatch):
    with open(tmp_path / "odd.pkl", "wb") as f:
        pickle.dump({"model": {}, "__author__": "me", "ratio": fractions.Fraction(1, 3)}, f)
    with pytest.raises(UnsafePickleError, match="fractions.Fraction"):
        load_pkl(str(tmp_path / "odd.pkl"))
    monkeypatch.setenv(UNSAFE_PICKLE_ENV, "1")
    assert load_pkl(str(tmp_path / "odd.pkl"))["ratio"] == fractions.Fraction(1, 3)


def test_a_model_zoo_style_teacher_pkl_loads_strictly(ws, tmp_path):
    config, weights = ws["teacher"]
    state = torch.load(weights, weights_only=True)["model"]
    with open(tmp_path / "teacher.pkl", "wb") as f:
        pickle.dump({"model": {k: v.numpy() for k, v in state.items()}, "__author__": "zoo"}, f)
    teacher = build_teacher(config, weights=str(tmp_path / "teacher.pkl"))
    assert fingerprint(teacher.state_dict()) == fingerprint(state)


# --- provenance of the tokens ---------------------------------------------------------------


def test_stage1_checkpoints_record_their_teacher(ws):
    """The recorded fingerprint is that of the teacher's weights as its file holds them (and as
    the built model holds them), not another teacher's; building reads the file, never writes."""
    state = torch.load(ws["tokens"], weights_only=True)["model"]
    before = open(ws["teacher"][1], "rb").read()
    model = build_model(maskd_cfg("MasKDTokenLearner", "rcnn", *ws["teacher"]))
    recorded = fingerprint_text(state[FINGERPRINT_KEY])
    assert recorded == fingerprint(model.teacher.state_dict())
    assert recorded == fingerprint(torch.load(ws["teacher"][1], weights_only=True)["model"])
    assert recorded != fingerprint(
        build_teacher(ws["other"][0], weights=ws["other"][1]).state_dict()
    )
    assert open(ws["teacher"][1], "rb").read() == before


def test_token_export_keeps_the_fingerprint_and_checks_it(ws, tmp_path):
    state = export_tokens(ws["tokens"], str(tmp_path / "tokens.pth"))
    recorded = torch.load(ws["tokens"], weights_only=True)["model"][FINGERPRINT_KEY]
    assert torch.equal(state[FINGERPRINT_KEY], recorded)
    # the export is accepted by stage 2 with the same teacher, refused with the other
    cfg = maskd_cfg("MasKD", "rcnn", *ws["teacher"], str(tmp_path / "tokens.pth"))
    build_model(cfg)
    cfg = maskd_cfg("MasKD", "rcnn", *ws["other"], str(tmp_path / "tokens.pth"))
    with pytest.raises(ValueError, match="learned for another teacher"):
        build_model(cfg)
    # a stage-1 checkpoint whose teacher was swapped is refused by tools/export.py
    ckpt = torch.load(ws["tokens"], weights_only=False)
    other = torch.load(ws["other"][1], weights_only=True)["model"]
    for k, v in other.items():
        if f"teacher.{k}" in ckpt["model"]:
            ckpt["model"][f"teacher.{k}"] = v
    torch.save(ckpt, tmp_path / "swapped.pth")
    from maskd.cli.export import main as export_main  # what tools/export.py runs

    argv = ["tokens", "--checkpoint", str(tmp_path / "swapped.pth")]
    with pytest.raises(ValueError, match="not those its tokens were learned for"):
        export_main(argv + ["--output", str(tmp_path / "t2.pth")])
    assert not (tmp_path / "t2.pth").exists()


# --- checkpoints of the wrong stage or pair -------------------------------------------------


def test_a_stage2_checkpoint_is_refused_by_a_stage1_model(ws, tmp_path):
    stage2 = build_model(maskd_cfg("MasKD", "rcnn", *ws["teacher"], ws["tokens"]))
    MasKDCheckpointer(stage2, save_dir=str(tmp_path)).save("s2")
    stage1 = build_model(maskd_cfg("MasKDTokenLearner", "rcnn", *ws["teacher"]))
    with pytest.raises(ValueError, match=r"stage 2 \(MasKD\) checkpoint.*stage 1"):
        MasKDCheckpointer(stage1).load(str(tmp_path / "s2.pth"))


def test_resume_keeps_the_configured_teacher_and_checks_the_checkpoints_copy(ws, tmp_path):
    cfg = maskd_cfg("MasKD", "rcnn", *ws["teacher"], ws["tokens"])
    model = build_model(cfg)
    teacher_before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    MasKDCheckpointer(model, save_dir=str(tmp_path)).save("s2")
    # a checkpoint whose teacher copy was changed: refused, naming the fingerprints
    ckpt = torch.load(tmp_path / "s2.pth", weights_only=False)
    key = next(k for k in ckpt["model"] if k.startswith("teacher.") and k.endswith("weight"))
    ckpt["model"][key] = ckpt["model"][key] + 1
    torch.save(ckpt, tmp_path / "changed.pth")
    with pytest.raises(ValueError, match="not the configured teacher.*fingerprints"):
        MasKDCheckpointer(model).load(str(tmp_path / "changed.pth"))
    # the matching checkpoint loads; the teacher stays the configured one, bit for bit
    MasKDCheckpointer(model).load(str(tmp_path / "s2.pth"))
    for k, v in model.teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k


# --- channel order --------------------------------------------------------------------------


def test_teacher_of_another_channel_order_gets_the_batch_in_its_order(ws, tmp_path):
    # An RGB teacher on a BGR run (the case that once trained silently on swapped channels):
    # stage 1 hands the teacher every image with its channels reversed, in training and in
    # evaluation; the data themselves are left as loaded.
    config, weights, _ = write_teacher(tmp_path, "semantic", opts=["INPUT.FORMAT", "RGB"])
    cfg = maskd_cfg("MasKDTokenLearner", "semantic", config, weights)
    assert cfg.INPUT.FORMAT == "BGR"
    model = build_model(cfg)
    assert (model.input_format, model.teacher.input_format) == ("BGR", "RGB")
    seen = []
    original = model.teacher.backbone.forward

    def spy(x):
        seen.append(x.clone())
        return original(x)

    model.teacher.backbone.forward = spy
    batch = tiny_batch(2, 64, seed=3, with_sem_seg=True)
    originals = [x["image"].clone() for x in batch]
    model.eval()
    with torch.no_grad():
        model(batch)
    mean, std = model.teacher.pixel_mean, model.teacher.pixel_std
    for i, image in enumerate(originals):
        expected = (image.flip(0).float() - mean) / std  # RGB, the teacher's normalisation
        torch.testing.assert_close(seen[0][i, :, :64, :64], expected)
        assert torch.equal(batch[i]["image"], image)  # the batch itself is not changed
    # tools/visualize_masks.py draws the masks the teacher makes on its own channel order too
    inner = model.teacher.backbone.inner
    inner_forward = inner.forward
    inner.forward = lambda x: seen.append(x.clone()) or inner_forward(x)
    receptive_masks(model, batch[0])
    expected = (originals[0].flip(0).float() - mean) / std
    torch.testing.assert_close(seen[-1][0, :, :64, :64], expected)
    # A run whose data are in neither RGB nor BGR order cannot be converted: refused by name.
    cfg.INPUT.FORMAT = "YUV-BT.601"
    with pytest.raises(ValueError, match="teacher reads RGB images but the data are YUV-BT.601"):
        build_model(cfg)


def test_model_built_for_another_channel_order_than_the_run_is_refused(ws, tmp_path):
    # LazyConfig runs name the data's order twice (model.input_format, the mapper's
    # image_format); the trainer refuses a run where they differ.
    cfg = tiny_training(
        maskd_cfg("MasKDTokenLearner", "rcnn", *ws["teacher"]), tmp_path / "f", DATASETS
    )
    model = build_model(cfg)
    check_input_format(model, "BGR", "INPUT.FORMAT")
    with pytest.raises(ValueError, match="built for BGR images.*feeds RGB \\(image_format\\)"):
        check_input_format(model, "RGB", "image_format")


# --- reading weights ------------------------------------------------------------------------


def test_weights_are_read_with_weights_only_explicitly(ws, monkeypatch):
    seen = []
    real = torch.load
    monkeypatch.setattr(
        torch, "load", lambda *a, **k: (seen.append(k.get("weights_only")), real(*a, **k))[1]
    )
    read_checkpoint(ws["tokens"])
    model = build_model(maskd_cfg("MasKDTokenLearner", "rcnn", *ws["teacher"]))
    MasKDCheckpointer(model).load(ws["tokens"])
    assert seen and all(v is True for v in seen), seen


def test_a_failed_download_names_the_config_key(ws):
    with pytest.raises(RuntimeError, match=r"MODEL\.MASKD\.TEACHER\.WEIGHTS: could not download"):
        load_weights_strict(
            torch.nn.Linear(1, 1), "http://127.0.0.1:9/teacher.pkl", "MODEL.MASKD.TEACHER.WEIGHTS"
        )


@pytest.mark.parametrize(
    "module,name",
    [("numpy.testing._private.utils", "runstring"), ("numpy", "load"), ("os", "system")],
)
def test_a_pickle_that_only_names_a_global_outside_the_allow_list_is_refused(
    tmp_path, module, name
):
    """Not called, only stored: a weights file must still never hand back a function (the
    allow-list holds the few numpy and torch globals weights need, not numpy at large)."""
    key = b"model"
    data = b"\x80\x02}X" + len(key).to_bytes(4, "little") + key
    data += b"c" + module.encode() + b"\n" + name.encode() + b"\n" + b"s."
    path = tmp_path / "names_a_global.pkl"
    path.write_bytes(data)
    with pytest.raises(UnsafePickleError):
        result = load_pkl(str(path))
        assert not callable(result.get("model")), "the loader handed back a function"


# --- numpy dtype states ---------------------------------------------------------------------

# A subprocess loads pickles of a numpy dtype built from a plain descriptor, given a state by
# BUILD, then made a scalar of (numpy's own pickles of scalars do exactly this). A state numpy
# never writes can make numpy's C code read out of bounds: the process would die, so it runs
# apart from the tests, and prints one line per pickle.
_DTYPE_STATES = r"""
import pickle, random, sys
import numpy as np
from maskd.checkpoint.safe_pickle import UnsafePickleError, load_pkl

def const(obj):
    return pickle.dumps(obj, protocol=2)[2:-1]

def dtype_scalar(descr, state, data):
    s = b"\x80\x02cnumpy.core.multiarray\nscalar\ncnumpy\ndtype\n"
    s += const((descr, False, True)) + b"R" + const(state) + b"b" + const(data) + b"\x86R."
    return s

cases = [  # (descr, state): states numpy's pickles never write
    ("S1", (3, "|", None, None, None, -5, 1, 0)),    # a negative item size
    ("S4", (3, "|", None, None, None, 4, 1, 0x20)),  # NPY_USE_GETITEM on a string type
    ("U1", (3, "<", None, None, None, 4, 4, 0x20)),
    ("S1", (3, "|", None, None, None, 4, 1, 0)),     # another item size than the descriptor's
    ("f8", (3, "<", None, None, None, 4, -1, 0)),
    ("f8", (4, "<", None, None, None, -1, -1, 0, {"a": 1})),  # metadata
    ("f8", (3, "<", None, None, None, -1, -1)),      # a state of another length
    ("f8", (3, "<", None, None, None, True, -1, 0)), # a bool where numpy writes an int
    ("f8", (3, "=", None, None, None, -1, -1, 0)),
]
rng = random.Random(int(sys.argv[2]))
for _ in range(int(sys.argv[1])):  # random states around numpy's own
    descr = rng.choice(["S1", "S3", "U1", "U2", "f4", "f8", "i2", "u1", "b1", "c8"])
    state = list(np.dtype(descr).__reduce__()[2])
    for _ in range(rng.randint(1, 3)):
        i = rng.choice([1, 5, 6, 7])
        state[i] = rng.choice(["<", ">", "|"]) if i == 1 else rng.choice(
            [-(2 ** 31), -8, -1, 0, 1, 2, 3, 4, 8, 12, 16, 2 ** 31, 0x20, 0x3F, 0x7F]
        )
    cases.append((descr, tuple(state)))
for descr, state in cases:
    data = b"\0" * 16
    with open(sys.argv[3], "wb") as f:
        f.write(dtype_scalar(descr, state, data[: np.dtype(descr).itemsize]))
    try:
        value = load_pkl(sys.argv[3])
    except UnsafePickleError as e:
        print("refused", descr, state, str(e).split(",")[0])
    else:  # loaded: the state must be the one numpy writes for the descriptor and byte order
        plain = np.dtype(descr)
        own = (plain if state[1] == "|" else plain.newbyteorder(state[1])).__reduce__()[2]
        print("loaded", descr, state, own == state and type(value) is plain.type, flush=True)
"""


def test_dtype_states_other_than_numpys_own_are_refused_and_never_crash(tmp_path):
    """Crafted and random dtype states of allowed globals only: each is refused, or it is the
    state numpy writes for a plain dtype; the process never dies."""
    script = tmp_path / "states.py"
    script.write_text(_DTYPE_STATES)
    out = run([str(script), "600", "0", str(tmp_path / "state.pkl")], tmp_path, check=False)
    assert out.returncode == 0, f"exit {out.returncode}: " + out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert len(lines) == 9 + 600
    assert all(ln.startswith("refused") for ln in lines[:9]), lines[:9]
    assert all(
        "state of the numpy dtype" in ln or "state of a numpy dtype" in ln for ln in lines[:9]
    )
    loaded = [ln for ln in lines if ln.startswith("loaded")]
    assert all(ln.endswith("True") for ln in loaded), loaded
    assert loaded and len(loaded) < 100  # the fuzz reaches both outcomes


def test_python2_era_pickles_of_plain_dtypes_still_load(tmp_path):
    """Protocol-0 text as Python 2's numpy wrote it (Caffe2 / Detectron ImageNet models):
    dtype arguments ('f4', 0, 1) and the version-3 state, byte order as a str."""

    def array(descr, order, elsize, align, shape, raw):
        s = b"cnumpy.core.multiarray\n_reconstruct\n(cnumpy\nndarray\n(I0\ntS'b'\ntR"
        s += b"(I1\n(" + b"".join(b"L%dL\n" % n for n in shape) + b"tcnumpy\ndtype\n"
        s += b"(S'%s'\nI0\nI1\ntR(I3\nS'%s'\nNNNI%d\nI%d\nI0\ntb" % (descr, order, elsize, align)
        return s + b"I00\nS'" + raw + b"'\ntb"

    text = b"(dp0\nS'blobs'\n(dp1\nS'w'\n" + array(b"f4", b"<", -1, -1, (2,), b"\\x00" * 8)
    text += b"sS'b'\n" + array(b"b1", b"|", -1, -1, (3,), b"\\x01" * 3)
    text += b"sS'be'\n" + array(b"f8", b">", -1, -1, (1,), b"?\\xf0" + b"\\x00" * 6)
    text += b"sS'name'\n" + array(b"S5", b"|", 5, 1, (1,), b"conv1")
    text += b"ss."
    path = tmp_path / "py2.pkl"
    path.write_bytes(text)
    blobs = load_pkl(str(path))["blobs"]
    assert blobs["w"].dtype == np.dtype("<f4") and not blobs["w"].any()
    assert blobs["b"].dtype == np.bool_ and blobs["b"].all()
    assert blobs["be"].dtype.str[1:] == "f8" and blobs["be"][0] == 1.0  # read big-endian
    assert blobs["name"][0] == b"conv1"


@pytest.mark.parametrize(
    "name,fmt",
    [
        ("BINSTRING", "<i"),
        ("BINUNICODE", "<I"),
        ("BINUNICODE8", "<Q"),
        ("BINBYTES", "<I"),
        ("BINBYTES8", "<Q"),
        ("BYTEARRAY8", "<Q"),
        ("LONG4", "<i"),
        ("FRAME", "<Q"),
    ],
)
def test_an_opcode_that_declares_more_bytes_than_the_file_is_refused(tmp_path, name, fmt):
    """A few bytes that declare 2 GB: pickle would allocate (and zero-fill) them before reading."""
    path = tmp_path / "declares.pkl"
    opcode = getattr(pickle, name)
    path.write_bytes(b"\x80\x05" + opcode + struct.pack(fmt, 2_000_000_000) + b".")
    with pytest.raises(UnsafePickleError, match=r"declares a \w+( object)? of 2000000000 bytes"):
        load_pkl(str(path))
    # the same opcodes with their true lengths load (protocol 5: frames, bytearrays)
    state = {"s": "é" * 300, "b": b"x" * 300, "a": bytearray(b"y" * 300), "n": 1 << 3000}
    path.write_bytes(pickle.dumps(state, protocol=5))
    assert load_pkl(str(path)) == state


# --- a fuzz of the guarded unpickler ----------------------------------------------------------

# A subprocess loads thousands of pickles built from the allowed globals only (dtypes of random
# descriptors and states, scalars of them with data of random length, arrays of random shapes,
# dtypes, flags and data; OrderedDicts), and valid pickles with random bytes changed, inserted
# or cut. For each it prints the outcome and the memory it took at its peak (tracemalloc, which
# numpy's allocations report to). An alarm stops a load that hangs; an address-space limit
# keeps a runaway allocation from reaching the machine.
_FUZZ = r"""
import collections, io, pickle, random, resource, signal, sys, tracemalloc
import numpy as np
from maskd.checkpoint.safe_pickle import DamagedPickleError, UnsafePickleError, load_pkl

n, seed, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
rng = random.Random(seed)
DESCRS = ["S0", "S1", "S7", "U0", "U3", "f2", "f4", "f8", "i1", "i8", "u2", "b1", "c16",
          "V4", "O", "M8", "m8[s]", "a", "x", "f4,f4", "(2,)f4", "<f4", ">i2", "|S2"]
NUMBERS = [-(2 ** 63), -(2 ** 31), -5, -1, 0, 1, 2, 3, 4, 7, 8, 16, 2 ** 31, 2 ** 62, 0x20, 0x3F]

def const(obj):
    return pickle.dumps(obj, protocol=2)[2:-1]

def g(module, name):
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"

def anything(depth=0):
    pick = rng.randrange(9 if depth < 2 else 6)
    if pick == 0: return rng.choice(NUMBERS)
    if pick == 1: return rng.choice(["<", ">", "|", "=", "", "f8", "S3"])
    if pick == 2: return None
    if pick == 3: return bool(rng.randrange(2))
    if pick == 4: return bytes(rng.randrange(256) for _ in range(rng.randrange(24)))
    if pick == 5: return rng.random() * rng.choice([1, 1e300, -1])
    if pick == 6: return tuple(anything(depth + 1) for _ in range(rng.randrange(10)))
    if pick == 7: return [anything(depth + 1) for _ in range(rng.randrange(4))]
    return {anything(depth + 1) if rng.randrange(3) else "names": anything(depth + 1)}

def dtype_op():
    descr = rng.choice(DESCRS)
    s = g("numpy", "dtype") + const((descr, bool(rng.randrange(2)), True)) + b"R"
    if rng.randrange(4):
        try:
            state = list(np.dtype(descr).__reduce__()[2])
        except TypeError:
            state = [3, "|", None, None, None, -1, -1, 0]
        for _ in range(rng.randrange(4)):
            if rng.randrange(6) == 0:
                fresh = [anything(1) for _ in range(rng.randrange(10))]
                state = fresh if rng.randrange(2) else state + [anything(1)]
            elif state:
                state[rng.randrange(len(state))] = anything(1)
        s += const(tuple(state)) + b"b"
    return s

def scalar_op():
    data = bytes(rng.randrange(256) for _ in range(rng.choice([0, 1, 2, 4, 8, 16, 33])))
    return g("numpy.core.multiarray", "scalar") + dtype_op() + const(data) + b"\x86R"

def array_op():
    shape = tuple(rng.choice([0, 1, 2, 3, 5, 2 ** 20, 2 ** 40, -1]) for _ in range(rng.randrange(4)))
    s = g("numpy.core.multiarray", "_reconstruct") + g("numpy", "ndarray")
    s += const((0,)) + const(b"b") + b"\x87R"
    size = rng.choice([0, 1, 4, 8, 64, 1000])
    raw = bytes(rng.randrange(256) for _ in range(size))
    if rng.randrange(5):
        state = b"(" + const(rng.choice([1, 0, 2, -1])) + const(shape) + dtype_op()
        state += const(bool(rng.randrange(2))) + const(raw if rng.randrange(4) else [1, 2]) + b"t"
    else:
        state = const(anything(1))
    return s + state + b"b"

def odict_op():
    s = g("collections", "OrderedDict") + b")R"
    for _ in range(rng.randrange(3)):
        s += b"(" + const("k") + rng.choice([array_op, scalar_op, dtype_op])() + b"u"
    return s

def built():
    ops = [rng.choice([dtype_op, scalar_op, array_op, odict_op])() for _ in range(rng.randint(1, 3))]
    return b"\x80\x02" + b"(" + b"".join(ops) + b"l."

def mutated():
    base = {"model": collections.OrderedDict(
        w=np.arange(rng.randrange(1, 20), dtype=rng.choice(["<f4", "<i8", "|u1", ">f8"])),
        s=np.float32(1.5), n=np.array([b"ab", b"c"]))}
    data = bytearray(pickle.dumps(base, protocol=rng.choice([0, 2, 4, 5])))
    for _ in range(rng.randint(1, 4)):
        i, kind = rng.randrange(len(data)), rng.randrange(3)
        if kind == 0: data[i] = rng.randrange(256)
        elif kind == 1: data[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        else: del data[i : i + rng.randint(1, 8)]
    return bytes(data)

# every opcode of protocol 5 but the globals outside the allow-list, with arguments of the
# right form, some repeated in long runs (memory), in random order (most streams are damaged)
ARGS = {b"K": 1, b"M": 2, b"J": 4, b"G": 8, b"h": 1, b"q": 1, b"j": 4, b"r": 4}
BARE = [b"N", b"\x88", b"\x89", b"}", b"]", b")", b"\x8f", b"(", b"0", b"1", b"2", b"t", b"l",
        b"d", b"\x85", b"\x86", b"\x87", b"a", b"e", b"s", b"u", b"\x90", b"\x91", b"\x94",
        b"R", b"b", b"\x81", b"\x92", b"\x93", b"\x97", b"\x98", b"\x99"]

def opcode():
    pick = rng.randrange(6)
    if pick < 3:
        return rng.choice(BARE)
    if pick == 3:
        code = rng.choice(list(ARGS))
        return code + bytes(rng.randrange(256) for _ in range(ARGS[code]))
    if pick == 4:
        data = bytes(rng.randrange(256) for _ in range(rng.choice([0, 1, 3, 40])))
        return rng.choice([
            b"X" + len(data).to_bytes(4, "little") + data.hex().encode(),
            b"\x8c" + bytes([len(data)]) + data.hex()[:len(data)].encode(),
            b"C" + bytes([len(data)]) + data,
            b"B" + len(data).to_bytes(4, "little") + data,
            b"\x8a" + bytes([len(data)]) + data,
        ])
    return rng.choice([g("numpy", "dtype"), g("collections", "OrderedDict"),
                       g("numpy.core.multiarray", "_reconstruct"), g("numpy", "ndarray"),
                       g("numpy.core.multiarray", "scalar")])

def streamed():
    out = [b"\x80" + bytes([rng.choice([2, 4, 5])])]
    for _ in range(rng.randint(1, 30)):
        out.append(opcode() * rng.choice([1, 1, 1, 2, 10, 1000, 100000]))
    return b"".join(out) + b"."

def on_alarm(*_):
    raise TimeoutError("hung")

signal.signal(signal.SIGALRM, on_alarm)
soft, hard = resource.getrlimit(resource.RLIMIT_AS)
with open("/proc/self/statm") as f:
    vm = int(f.read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (vm + 2 * 2 ** 30, hard))
tracemalloc.start()
opcodes = len(sys.argv) > 4 and sys.argv[4] == "opcodes"
for i in range(n):
    data = streamed() if opcodes else built() if i % 2 else mutated()
    with open(path, "wb") as f:
        f.write(data)
    tracemalloc.reset_peak()
    start = tracemalloc.get_traced_memory()[0]
    signal.alarm(10)
    try:
        load_pkl(path)
        outcome = "loaded"
    except UnsafePickleError:
        outcome = "refused"
    except DamagedPickleError as e:
        outcome = "damaged" if str(e).startswith(repr(path)) else "unnamed"
    except (MemoryError, TimeoutError) as e:
        outcome = type(e).__name__
    except Exception as e:  # a raw error is not a crash, but is reported as such
        outcome = "raw:" + type(e).__name__
    finally:
        signal.alarm(0)
    peak = tracemalloc.get_traced_memory()[1] - start
    unusual = outcome not in ("loaded", "refused", "damaged") or peak > 10 * len(data) + 2**18
    print(outcome, len(data), peak, data.hex() if unusual else "", flush=True)
"""


def test_the_guarded_unpickler_survives_a_fuzz_of_its_allowed_globals(tmp_path):
    """3000 pickles of allowed globals only, and valid pickles damaged at random: every one is
    loaded, refused (UnsafePickleError) or named damaged (DamagedPickleError, the file named);
    none crashes the process, hangs, raises another error, or takes more than ten times its
    own size (plus 256 KB) in memory."""
    script = tmp_path / "fuzz.py"
    script.write_text(_FUZZ)
    out = run([str(script), "3000", "7", str(tmp_path / "fuzz.pkl")], tmp_path, check=False)
    assert out.returncode == 0, f"exit {out.returncode}: " + out.stderr[-2000:]
    rows = [line.split(" ") for line in out.stdout.splitlines()]
    assert len(rows) == 3000
    bad = [r for r in rows if r[0] not in ("loaded", "refused", "damaged")]
    assert not bad, bad[:5]
    heavy = [r for r in rows if int(r[2]) > 10 * int(r[1]) + 2**18]
    assert not heavy, heavy[:5]
    outcomes = collections.Counter(r[0] for r in rows)
    assert min(outcomes["loaded"], outcomes["damaged"]) >= 100, outcomes
    assert outcomes["refused"] >= 1000, outcomes


def test_the_guarded_unpickler_bounds_memory_over_the_whole_opcode_set(tmp_path):
    """120 streams of random opcodes of every kind (the globals of the allow-list only), many
    repeated in runs of up to 100,000 (EMPTY_SET, MARK, memo puts and gets, ...): every one is
    loaded, refused or named damaged, none takes more than ten times its size plus 256 KB in
    memory (tracemalloc) or hangs, and runs that would build more are refused by the count."""
    script = tmp_path / "fuzz.py"
    script.write_text(_FUZZ)
    out = run([str(script), "120", "11", str(tmp_path / "f.pkl"), "opcodes"], tmp_path, False)
    assert out.returncode == 0, f"exit {out.returncode}: " + out.stderr[-2000:]
    rows = [line.split(" ") for line in out.stdout.splitlines()]
    assert len(rows) == 120
    bad = [r for r in rows if r[0] not in ("loaded", "refused", "damaged")]
    assert not bad, bad[:5]
    heavy = [r for r in rows if int(r[2]) > 10 * int(r[1]) + 2**18]
    assert not heavy, heavy[:5]
    outcomes = collections.Counter(r[0] for r in rows)
    assert outcomes["refused"] >= 6 and outcomes["damaged"] >= 60, outcomes
